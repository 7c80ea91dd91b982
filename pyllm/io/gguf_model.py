"""Llama-family models from GGUF files (llama.cpp's format): configuration from the metadata,
tensors decoded from F32, F16, BF16, Q8_0, Q4_0 and Q4_1, and the chat template.

Every tensor's byte range and size is checked against the file before it is read. The decoding
functions here are the numpy reference for the quantized formats (block layouts from ggml:
https://github.com/ggml-org/ggml/blob/master/docs/gguf.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from pyllm.io.gguf import GGUFFile, TensorInfo

F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q6_K, BF16 = 0, 1, 2, 3, 6, 7, 8, 12, 14, 30
QK = 32   # values per quantization block (the K-quants' super-blocks hold 256)
# ggml type -> (name, values per block, bytes per block); the float types' "blocks" are one value
TYPES = {F32: ("F32", 1, 4), F16: ("F16", 1, 2), BF16: ("BF16", 1, 2), Q8_0: ("Q8_0", QK, 2 + QK),
         Q4_0: ("Q4_0", QK, 2 + QK // 2), Q4_1: ("Q4_1", QK, 4 + QK // 2), Q5_0: ("Q5_0", QK, 6 + QK // 2),
         Q5_1: ("Q5_1", QK, 8 + QK // 2), Q4_K: ("Q4_K", 256, 144),
         Q6_K: ("Q6_K", 256, 210)}


def row_bytes(ggml_type: int, values: int) -> int:
    """Bytes of `values` consecutive values (whole blocks) of a type."""
    _, block_values, block_bytes = TYPES[ggml_type]
    return values // block_values * block_bytes


def tensor_nbytes(info: TensorInfo) -> int:
    if info.type not in TYPES:
        raise ValueError(f"tensor {info.name}: ggml type {info.type} is not supported "
                         f"(supported: {', '.join(t[0] for t in TYPES.values())})")
    name, block_values, _ = TYPES[info.type]
    if info.shape[0] % block_values:
        raise ValueError(f"tensor {info.name}: rows of {info.shape[0]} values are not whole {name} blocks "
                         f"of {block_values}")
    return row_bytes(info.type, int(np.prod(info.shape)))


def raw_tensor(f: GGUFFile, info: TensorInfo) -> np.ndarray:
    """The tensor's bytes (a uint8 view of the mapped file), after checking they lie inside it."""
    start = f.data_offset + info.offset
    end = start + tensor_nbytes(info)
    if info.offset < 0 or end > len(f._buf):
        raise ValueError(f"{f.path}: tensor {info.name} spans bytes {start}..{end}, past the end of the "
                         f"file ({len(f._buf)} bytes): truncated or corrupt")
    return np.frombuffer(f._buf, np.uint8, end - start, start)


def dequantize(raw: np.ndarray, ggml_type: int, count: int) -> np.ndarray:
    """float32 values of `count` elements stored as ggml_type in raw bytes."""
    if ggml_type == F32:
        return raw.view(np.float32)[:count].copy()
    if ggml_type == F16:
        return raw.view(np.float16)[:count].astype(np.float32)
    if ggml_type == BF16:
        return (raw.view(np.uint16)[:count].astype(np.uint32) << 16).view(np.float32)
    _, _, block_bytes = TYPES[ggml_type]
    blocks = raw.reshape(-1, block_bytes)
    if ggml_type == Q4_K:
        return _dequantize_q4_k(blocks).reshape(-1)
    if ggml_type == Q6_K:
        return _dequantize_q6_k(blocks).reshape(-1)
    if ggml_type in (Q5_0, Q5_1):
        return _dequantize_q5(blocks, ggml_type).reshape(-1)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)             # (n, 1) scale
    if ggml_type == Q8_0:
        q = blocks[:, 2:].view(np.int8).astype(np.float32)
        return (q * d).reshape(-1)
    packed = blocks[:, 4:] if ggml_type == Q4_1 else blocks[:, 2:]
    q = np.concatenate([packed & 0x0F, packed >> 4], axis=1).astype(np.float32)   # low nibbles first
    if ggml_type == Q4_0:
        return ((q - 8.0) * d).reshape(-1)
    m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    return (q * d + m).reshape(-1)


def _halves(blocks: np.ndarray, at: int) -> np.ndarray:
    return blocks[:, at:at + 2].copy().view(np.float16).astype(np.float32)       # (n, 1)


def _dequantize_q5(blocks: np.ndarray, ggml_type: int) -> np.ndarray:
    """(n, 22 or 24) Q5_0 / Q5_1 blocks -> (n, 32): (nibble | fifth bit << 4) * d, less 16 (Q5_0) or
    plus the minimum m (Q5_1); value j's fifth bit is bit j of a little-endian uint32."""
    d = _halves(blocks, 0)
    at = 4 if ggml_type == Q5_1 else 2
    high = blocks[:, at:at + 4].copy().view("<u4").astype(np.int64)             # (n, 1)
    fifth = ((high >> np.arange(32)) & 1).astype(np.int32) << 4                  # (n, 32)
    packed = blocks[:, at + 4:].astype(np.int32)
    q = (np.concatenate([packed & 0x0F, packed >> 4], axis=1) | fifth).astype(np.float32)
    if ggml_type == Q5_0:
        return (q - 16.0) * d
    return q * d + _halves(blocks, 2)


def _dequantize_q4_k(blocks: np.ndarray) -> np.ndarray:
    """(n, 144) Q4_K super-blocks -> (n, 256): 8 sub-blocks of 32, each value d * scale * q - dmin * min
    with 6-bit scales and minima packed into 12 bytes."""
    d, dmin, s = _halves(blocks, 0), _halves(blocks, 2), blocks[:, 4:16].astype(np.int32)
    scale = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)], axis=1)
    minimum = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    q = blocks[:, 16:].reshape(-1, 4, 32)                        # 4 groups of 32 bytes: low then high nibbles
    q = np.stack([q & 0x0F, q >> 4], axis=2).reshape(-1, 8, 32).astype(np.float32)
    return ((d * scale.astype(np.float32))[:, :, None] * q - (dmin * minimum.astype(np.float32))[:, :, None]
            ).reshape(-1, 256)


def _dequantize_q6_k(blocks: np.ndarray) -> np.ndarray:
    """(n, 210) Q6_K super-blocks -> (n, 256): 6-bit values (4 low bits in ql, 2 high in qh) minus 32,
    times d and one signed scale per 16 values."""
    n = blocks.shape[0]
    ql = blocks[:, :128].reshape(n, 2, 64).astype(np.int32)
    qh = blocks[:, 128:192].reshape(n, 2, 32).astype(np.int32)
    scales = blocks[:, 192:208].view(np.int8).astype(np.float32)
    d = _halves(blocks, 208)
    low = [ql[:, :, :32] & 0x0F, ql[:, :, 32:] & 0x0F, ql[:, :, :32] >> 4, ql[:, :, 32:] >> 4]
    q = np.stack([low[i] | (((qh >> (2 * i)) & 3) << 4) for i in range(4)], axis=2) - 32   # (n, 2, 4, 32)
    values = q.reshape(n, 256).astype(np.float32)                # half, quarter, l: value 128 h + 32 i + l
    return d * np.repeat(scales, 16, axis=1) * values


def tensor(f: GGUFFile, name: str) -> np.ndarray:
    """A tensor as float32 in numpy's order (GGUF lists the fastest dimension first)."""
    info = f.tensors.get(name)
    if info is None:
        raise ValueError(f"{f.path}: the tensor {name!r} is missing")
    values = dequantize(raw_tensor(f, info), info.type, int(np.prod(info.shape)))
    return values.reshape(tuple(reversed(info.shape)))


def unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter reorders the rows of q/k projections for its interleaved rotary
    layout; this restores Hugging Face's rotate-half order."""
    out, cols = w.shape
    return w.reshape(n_head, out // n_head // 2, 2, cols).swapaxes(1, 2).reshape(out, cols)


def _meta(f: GGUFFile, key: str, default=None, kind=None):
    value = f.metadata.get(key, default)
    if value is None:
        raise ValueError(f"{f.path}: metadata key {key!r} is missing")
    if kind is not None and not isinstance(value, kind):
        raise ValueError(f"{f.path}: metadata key {key!r} is {value!r}, expected {kind.__name__}")
    return value


def config_from_gguf(f: GGUFFile):
    from pyllm.model import ModelConfig

    arch = f.metadata.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{f.path}: architecture {arch!r} is not supported (llama is)")
    n_embd = _meta(f, "llama.embedding_length", kind=int)
    n_head = _meta(f, "llama.attention.head_count", kind=int)
    rope_dims = f.metadata.get("llama.rope.dimension_count", n_embd // n_head)
    if rope_dims != n_embd // n_head:
        raise ValueError(f"{f.path}: partial rotary embeddings ({rope_dims} of {n_embd // n_head}) are not supported")
    vocab = f.metadata.get("llama.vocab_size") or len(_meta(f, "tokenizer.ggml.tokens", kind=list))
    return ModelConfig(arch="llama", vocab_size=int(vocab), block_size=_meta(f, "llama.context_length", kind=int),
                       n_layer=_meta(f, "llama.block_count", kind=int), n_head=n_head, n_embd=n_embd,
                       n_kv_head=int(f.metadata.get("llama.attention.head_count_kv", n_head)),
                       intermediate_size=_meta(f, "llama.feed_forward_length", kind=int),
                       norm_eps=float(_meta(f, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
                       rope_theta=float(f.metadata.get("llama.rope.freq_base", 10000.0)),
                       tie_word_embeddings="output.weight" not in f.tensors)


# GGUF tensor name -> Hugging Face name, per layer ({i}) and global
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def hf_name(gguf_name: str) -> Optional[str]:
    if gguf_name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if gguf_name == "output_norm.weight":
        return "model.norm.weight"
    if gguf_name == "output.weight":
        return "lm_head.weight"
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_NAMES and parts[3] == "weight":
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.weight"
    return None


QUANTIZED = (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q6_K)


def _quantized_rows(f: GGUFFile, info: TensorInfo) -> np.ndarray:
    """The tensor's blocks as (rows, bytes per row) uint8, a view of the mapped file."""
    rows = int(np.prod(info.shape[1:]))
    return raw_tensor(f, info).reshape(rows, -1)


def _unpermute_rows(rows: np.ndarray, n_head: int) -> np.ndarray:
    """unpermute_rope on whole rows of blocks (each output row is quantized on its own)."""
    order = unpermute_rope(np.arange(rows.shape[0], dtype=np.float64)[:, None], n_head)[:, 0].astype(np.int64)
    return rows[order]


def load_gguf(path, dequantize: bool = False) -> tuple:
    """(Model, Tokenizer, chat template or None, end-of-turn token id or None) from a GGUF file.

    Quantized matrices (Q8_0, Q4_0, Q4_1) stay quantized (inference only, a fraction of the
    memory) unless dequantize=True, which gives a float32 model that can be trained.
    """
    from pyllm.model import Model, QuantizedWeight
    from pyllm.tokenizer import Tokenizer

    path = Path(path)
    f = GGUFFile(path)
    quantized: dict[str, QuantizedWeight] = {}
    try:
        cfg = config_from_gguf(f)
        HS = cfg.head_size
        if not dequantize:
            for name, info in f.tensors.items():
                target = hf_name(name)
                if target is None or info.type not in QUANTIZED or len(info.shape) != 2:
                    continue
                if target.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
                    continue   # fused below
                quantized[target] = QuantizedWeight(_quantized_rows(f, info), info.type, tuple(reversed(info.shape)))
            for i in range(cfg.n_layer):
                infos = [f.tensors.get(f"blk.{i}.attn_{x}.weight") for x in "qkv"]
                if any(t is None or t.type not in QUANTIZED for t in infos):
                    continue
                q = _unpermute_rows(_quantized_rows(f, infos[0]), cfg.n_head)
                k = _unpermute_rows(_quantized_rows(f, infos[1]), cfg.n_kv_head)
                v = _quantized_rows(f, infos[2])
                h = f"model.layers.{i}.self_attn."
                nq, nkv = cfg.n_head * HS, cfg.n_kv_head * HS
                if len({t.type for t in infos}) == 1:   # one product for the three (views of one copy)
                    t = infos[0].type
                    fused = np.ascontiguousarray(np.concatenate([q, k, v]))
                    quantized[h + "qkv"] = QuantizedWeight(fused, t, (nq + 2 * nkv, cfg.n_embd))
                    q, k, v = fused[:nq], fused[nq:nq + nkv], fused[nq + nkv:]
                for name, rows, info, n in (("q", q, infos[0], nq), ("k", k, infos[1], nkv), ("v", v, infos[2], nkv)):
                    quantized[h + f"{name}_proj.weight"] = QuantizedWeight(np.ascontiguousarray(rows), info.type,
                                                                           (n, cfg.n_embd))
            from pyllm.model import parameter_specs

            shapes = {spec.name: spec.shape for spec in parameter_specs(cfg)}
            for name, weight in quantized.items():
                need = ((cfg.n_head + 2 * cfg.n_kv_head) * HS, cfg.n_embd) if name.endswith(".qkv") else shapes.get(name)
                if tuple(weight.shape) != tuple(need or ()):
                    raise ValueError(f"{path}: the tensor for {name} is {weight.shape}; the metadata's sizes "
                                     f"need {need}")
                if weight.shape[1] % TYPES[weight.ggml_type][1] or \
                        weight.data.shape[1] != row_bytes(weight.ggml_type, weight.shape[1]):
                    raise ValueError(f"{path}: quantized tensor for {name} has rows that do not fit its shape")
        model = Model(cfg, seed=None, quantized=quantized)
        expected = set(model.p)
        seen = set()
        for name, info in f.tensors.items():
            target = hf_name(name)
            if target is None or target not in expected:
                if name.startswith("rope_freqs"):
                    raise ValueError(f"{path}: {name} (scaled rotary frequencies) is not supported")
                continue
            values = tensor(f, name)
            if target.endswith("q_proj.weight"):
                values = unpermute_rope(values, cfg.n_head)
            elif target.endswith("k_proj.weight"):
                values = unpermute_rope(values, cfg.n_kv_head)
            if values.shape != model.p[target].shape:
                raise ValueError(f"{path}: tensor {name} has shape {values.shape}, the model needs "
                                 f"{model.p[target].shape}")
            model.p[target][...] = values
            seen.add(target)
        missing = sorted(expected - seen)
        if missing:
            raise ValueError(f"{path}: tensors missing for {missing[:4]}{' ...' if len(missing) > 4 else ''}")
        template = f.metadata.get("tokenizer.chat_template")
        eos = f.metadata.get("tokenizer.ggml.eos_token_id")
    except BaseException:
        quantized.clear()
        try:
            f.close()
        except BufferError:   # a view of the mapping is still referenced (by the traceback): let GC close it
            pass
        raise
    if not quantized:
        f.close()       # otherwise the quantized weights are views of the file's mapping: it stays open
    tokenizer = Tokenizer.from_gguf(path)
    return model, tokenizer, template if isinstance(template, str) else None, eos
