"""Models in GGUF files (llama.cpp's format), architectures llama, qwen2, qwen3, gemma3 and gpt2: the config
from the metadata and every tensor under its Hugging Face name, quantized matrices kept in their blocks.

Every tensor's byte range is checked against the file before it is read (GGUFFile.raw). A reader
returns data (pyllm.io.tensors.ModelWeights) and never builds a model. The vocabulary and the chat
template are tokenizer_files.py's. Layouts: llama.cpp stores every matrix as (out, in) rows, and
llama's q/k projections with their rows permuted for its interleaved rope (undone here; qwen2,
qwen3 and gemma3 use llama.cpp's rotate-half rope and are stored as they are); gemma3's norms
hold 1 + w, as pyllm keeps them; GPT-2's Conv1D
weights are transposed back to Hugging Face's (in, out) when read as floats.
"""

from __future__ import annotations

import re
from typing import Optional

import numpy as np

from pyllm import kernels
from pyllm.io.gguf import GGUFFile, TensorInfo
from pyllm.io.tensors import LazyTensors, ModelWeights, check_sizes_against_file
from pyllm.models import ModelConfig, QuantizedWeight, parameter_specs, stored_in_out

_LAYER_OF = re.compile(r"blk\.(\d+)\.")
_ID = {t.name: t.id for t in kernels.GGML_TYPES.values()}
F32, F16, BF16 = _ID["F32"], _ID["F16"], _ID["BF16"]
Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q6_K = (_ID[n] for n in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q6_K"))
QK = kernels.GGML_TYPES[Q8_0].block_values    # values per block of the 32-value types
QUANTIZED = tuple(t.id for t in kernels.GGML_TYPES.values() if t.quantized)
row_bytes = kernels.row_bytes

# GGUF tensor name -> Hugging Face name: per layer ({i}) and global, per architecture.
_LLAMA_LAYER = {"attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
                "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
                "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
                "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
                "ffn_down.weight": "mlp.down_proj.weight"}
_LAYER_NAMES = {
    "llama": _LLAMA_LAYER,
    "qwen2": {**_LLAMA_LAYER, **{f"attn_{x}.bias": f"self_attn.{x}_proj.bias" for x in "qkv"}},
    "qwen3": {**_LLAMA_LAYER, **{f"attn_{x}_norm.weight": f"self_attn.{x}_norm.weight" for x in "qk"}},
    "gemma3": {**_LLAMA_LAYER, **{f"attn_{x}_norm.weight": f"self_attn.{x}_norm.weight" for x in "qk"},
               "post_attention_norm.weight": "post_attention_layernorm.weight",
               "ffn_norm.weight": "pre_feedforward_layernorm.weight",
               "post_ffw_norm.weight": "post_feedforward_layernorm.weight"},
    "gpt2": {f"{g}.{part}": f"{h}.{part}" for g, h in
             (("attn_norm", "ln_1"), ("attn_qkv", "attn.c_attn"), ("attn_output", "attn.c_proj"),
              ("ffn_norm", "ln_2"), ("ffn_up", "mlp.c_fc"), ("ffn_down", "mlp.c_proj")) for part in ("weight", "bias")},
}
LLAMA_LIKE = ("llama", "qwen2", "qwen3", "gemma3")   # the Llama-shaped block, named as Llama's
_LAYER_PREFIX = {**{a: "model.layers.{i}." for a in LLAMA_LIKE}, "gpt2": "transformer.h.{i}."}
ARCHITECTURES = tuple(_LAYER_NAMES)   # what this reader maps
_GLOBAL_NAMES = {
    **{a: {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"} for a in LLAMA_LIKE},
    "gpt2": {"token_embd.weight": "transformer.wte.weight", "position_embd.weight": "transformer.wpe.weight",
             "output_norm.weight": "transformer.ln_f.weight", "output_norm.bias": "transformer.ln_f.bias",
             "output.weight": "lm_head.weight"},
}


def hf_name(arch: str, gguf_name: str) -> Optional[str]:
    """The Hugging Face name of a GGUF tensor, or None for one pyllm does not use."""
    if gguf_name in _GLOBAL_NAMES[arch]:
        return _GLOBAL_NAMES[arch][gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES[arch]:
        return _LAYER_PREFIX[arch].format(i=int(parts[1])) + _LAYER_NAMES[arch][parts[2]]
    return None


def gguf_names(cfg: ModelConfig) -> dict[str, str]:
    """Hugging Face name -> GGUF tensor name, for every tensor of a model of this config (what a
    writer names them)."""
    arch = cfg.arch
    names = {hf: g for g, hf in _GLOBAL_NAMES[arch].items()}
    prefix = _LAYER_PREFIX[arch]
    for i in range(cfg.n_layer):
        for g, hf in _LAYER_NAMES[arch].items():
            names[prefix.format(i=i) + hf] = f"blk.{i}.{g}"
    return names


def dequantize(raw: np.ndarray, ggml_type: int, count: int) -> np.ndarray:
    """float32 values of `count` elements stored as ggml_type in raw bytes."""
    if ggml_type == F32:
        return raw.view(np.float32)[:count].copy()
    if ggml_type == F16:
        return raw.view(np.float16)[:count].astype(np.float32)
    if ggml_type == BF16:
        return (raw.view(np.uint16)[:count].astype(np.uint32) << 16).view(np.float32)
    return kernels.dequantize(raw[:row_bytes(ggml_type, count)], ggml_type, (1, count)).reshape(-1)


def tensor(f: GGUFFile, name: str) -> np.ndarray:
    """A tensor as float32 in numpy's order (GGUF lists the fastest dimension first)."""
    info = f.tensors.get(name)
    if info is None:
        raise ValueError(f"{f.path}: the tensor {name!r} is missing")
    values = dequantize(f.raw(info), info.type, int(np.prod(info.shape)))
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
    if kind is not None and (not isinstance(value, kind) or isinstance(value, bool)):
        raise ValueError(f"{f.path}: metadata key {key!r} is {value!r}, expected {kind.__name__}")
    return value


def config_from_gguf(f: GGUFFile) -> ModelConfig:
    arch = f.metadata.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{f.path}: architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})")
    n_embd = _meta(f, f"{arch}.embedding_length", kind=int)
    n_head = _meta(f, f"{arch}.attention.head_count", kind=int)
    for key, value in (("embedding_length", n_embd), ("attention.head_count", n_head)):
        if value < 1:
            raise ValueError(f"{f.path}: {arch}.{key} is {value}, not a positive integer")
    vocab = f.metadata.get(f"{arch}.vocab_size") or len(_meta(f, "tokenizer.ggml.tokens", kind=list))
    sizes = dict(vocab_size=int(vocab), block_size=_meta(f, f"{arch}.context_length", kind=int),
                 n_layer=_meta(f, f"{arch}.block_count", kind=int), n_head=n_head, n_embd=n_embd,
                 intermediate_size=_meta(f, f"{arch}.feed_forward_length", kind=int),
                 tie_word_embeddings="output.weight" not in f.tensors)
    if arch == "gpt2":
        return ModelConfig(arch="gpt2", norm_eps=float(_meta(f, "gpt2.attention.layer_norm_epsilon", 1e-5)),
                           **sizes)
    head_dim = _meta(f, f"{arch}.attention.key_length", n_embd // n_head, kind=int)
    if _meta(f, f"{arch}.attention.value_length", head_dim, kind=int) != head_dim:
        raise ValueError(f"{f.path}: keys and values of different lengths per head are not supported")
    rope_dims = f.metadata.get(f"{arch}.rope.dimension_count", head_dim)
    if rope_dims != head_dim:
        raise ValueError(f"{f.path}: partial rotary embeddings ({rope_dims} of {head_dim}) are not supported")
    scaling = None
    if "rope_freqs.weight" in f.tensors:   # Llama 3's scaled rope: what each frequency is divided by
        factors = tensor(f, "rope_freqs.weight").reshape(-1)
        if factors.size != head_dim // 2:
            raise ValueError(f"{f.path}: rope_freqs.weight has {factors.size} entries, the heads need {head_dim // 2}")
        scaling = {"rope_type": "freq_factors", "factors": [float(x) for x in factors]}
    kind = f.metadata.get(f"{arch}.rope.scaling.type")
    if kind not in (None, "none", "linear"):
        raise ValueError(f"{f.path}: {arch}.rope.scaling.type {kind!r} is not supported (linear is)")
    if kind == "linear":
        factor = _meta(f, f"{arch}.rope.scaling.factor", kind=float)
        if scaling is not None:
            raise ValueError(f"{f.path}: both rope_freqs.weight and linear rope scaling")
        scaling = {"rope_type": "linear", "factor": float(factor)}
    window = f.metadata.get(f"{arch}.attention.sliding_window")
    if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window < 1):
        raise ValueError(f"{f.path}: {arch}.attention.sliding_window is {window!r}, not a positive integer")
    extra = {}
    if arch == "gemma3":   # what llama.cpp fixes for gemma3 rather than reading it
        extra = gemma3_fixed(sizes["n_layer"], n_embd, n_head, head_dim, window)
        softcap = f.metadata.get("gemma3.final_logit_softcapping")
        if softcap:
            extra["final_logit_softcapping"] = float(_meta(f, "gemma3.final_logit_softcapping", kind=float))
    return ModelConfig(arch=arch, n_kv_head=int(f.metadata.get(f"{arch}.attention.head_count_kv", n_head)),
                       head_dim=head_dim, rope_scaling=scaling, sliding_window=window,
                       norm_eps=float(_meta(f, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
                       rope_theta=float(f.metadata.get(f"{arch}.rope.freq_base", 10000.0)), **extra, **sizes)


def gemma3_fixed(n_layer: int, n_embd: int, n_head: int, head_dim: int, window: Optional[int]) -> dict:
    """The gemma3 settings llama.cpp's loader fixes rather than reads from a file: every sixth layer
    global (the default layer_types), the sliding layers' rope base 10000, and scores scaled by
    1/sqrt(head_dim), or by 1/sqrt(n_embd / n_head) for the 62-layer 27B model."""
    fixed = {"query_pre_attn_scalar": float(n_embd // n_head if n_layer == 62 else head_dim)}
    if window:
        fixed["rope_local_theta"] = 10000.0
    return fixed


def _rows(f: GGUFFile, info: TensorInfo) -> np.ndarray:
    """The tensor's blocks as (rows, bytes per row) uint8, a view of the mapped file."""
    if len(info.shape) != 2:
        raise ValueError(f"{f.path}: tensor {info.name} has {len(info.shape)} dimensions, a matrix needs 2")
    return f.raw(info).reshape(info.shape[1], -1)


def _unpermute_rows(rows: np.ndarray, n_head: int) -> np.ndarray:
    """unpermute_rope on whole rows of blocks (each output row is quantized on its own)."""
    order = unpermute_rope(np.arange(rows.shape[0], dtype=np.float64)[:, None], n_head)[:, 0].astype(np.int64)
    return rows[order]


def read_weights(f: GGUFFile, dequantize: bool = False) -> ModelWeights:
    """The config, the float tensors (read lazily) and, unless dequantize, the quantized matrices
    (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q6_K) kept as views of the mapped file: inference only, a
    fraction of the memory. With dequantize=True every weight is float32 (trainable)."""
    cfg = config_from_gguf(f)
    check_sizes_against_file(cfg, f.tensors, _LAYER_OF, f.size, 0.5, str(f.path))   # Q4's 4.5 bits a weight
    arch = cfg.arch
    names = {}   # HF name -> GGUF tensor info
    for name, info in f.tensors.items():
        target = hf_name(arch, name)
        if target is not None:
            names[target] = info
    shapes = {s.name: s.shape for s in parameter_specs(cfg)}
    in_out = stored_in_out(cfg)     # GGUF stores every matrix (out, in); these are (in, out) as floats
    quantized: dict[str, QuantizedWeight] = {}
    if not dequantize:
        for target, info in names.items():
            if info.type not in QUANTIZED or len(info.shape) != 2 or target == "transformer.wpe.weight":
                continue   # float tensors, and GPT-2's position table (added, not multiplied), are read as floats
            if arch in LLAMA_LIKE and target.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
                continue   # fused below
            quantized[target] = QuantizedWeight(_rows(f, info), info.type, (info.shape[1], info.shape[0]))
        if arch in LLAMA_LIKE:
            _fuse_qkv(f, cfg, names, quantized)
    kept = set(quantized)
    permuted = arch == "llama"

    def read(target: str) -> np.ndarray:
        values = tensor(f, names[target].name)
        if permuted and target.endswith("q_proj.weight"):
            values = unpermute_rope(values, cfg.n_head)
        elif permuted and target.endswith("k_proj.weight"):
            values = unpermute_rope(values, cfg.n_kv_head)
        elif target in in_out:
            values = np.ascontiguousarray(values.T)
        if target in shapes and values.shape != tuple(shapes[target]):
            raise ValueError(f"{f.path}: tensor {names[target].name} has shape {values.shape}, the model needs "
                             f"{tuple(shapes[target])}")
        return values

    floats = [t for t in names if t not in kept and t in shapes]
    return ModelWeights(cfg, LazyTensors(floats, read), quantized)


def _fuse_qkv(f: GGUFFile, cfg: ModelConfig, names: dict, quantized: dict) -> None:
    """The q, k and v of each layer, quantized: rows unpermuted (llama), and as one fused block (one
    product for the three) when they share a type, the parts views of it."""
    HS = cfg.head_size
    nq, nkv = cfg.n_head * HS, cfg.n_kv_head * HS
    for i in range(cfg.n_layer):
        h = f"model.layers.{i}.self_attn."
        infos = [names.get(h + f"{x}_proj.weight") for x in "qkv"]
        if any(t is None or t.type not in QUANTIZED or len(t.shape) != 2 for t in infos):
            continue   # read as floats (and a missing one reported by the model)
        q, k = _rows(f, infos[0]), _rows(f, infos[1])
        if cfg.arch == "llama":
            q, k = _unpermute_rows(q, cfg.n_head), _unpermute_rows(k, cfg.n_kv_head)
        v = _rows(f, infos[2])
        if len({t.type for t in infos}) == 1:
            fused = np.ascontiguousarray(np.concatenate([q, k, v]))
            quantized[h + "qkv"] = QuantizedWeight(fused, infos[0].type, (nq + 2 * nkv, cfg.n_embd))
            q, k, v = fused[:nq], fused[nq:nq + nkv], fused[nq + nkv:]
        for x, rows, info, n in (("q", q, infos[0], nq), ("k", k, infos[1], nkv), ("v", v, infos[2], nkv)):
            quantized[h + f"{x}_proj.weight"] = QuantizedWeight(np.ascontiguousarray(rows), info.type,
                                                                (rows.shape[0], info.shape[0]))
