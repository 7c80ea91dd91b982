"""Writing GGUF files (llama.cpp's format) of the architectures pyllm runs: llama, qwen2, qwen3,
gemma3 and gpt2, with the tokenizer (byte-level BPE or SentencePiece), its special tokens and the chat
template in the metadata, so that
llama.cpp and Ollama load what pyllm trained.

The container is the `gguf` package's writer (the `export` extra); the blocks are pyllm's own
(kernels.quantize: llama.cpp's reference quantizers, bit for bit). Names and layouts are the inverse
of gguf_model.py's: every matrix (out, in), llama's q/k rows permuted for llama.cpp's interleaved
rope. Matrices whose rows are not whole blocks go to a smaller block (Q4_K's: Q8_0) or float16;
norms and biases stay float32.
Not a reader (gguf_model.py) and not quantization arithmetic (csrc/formats/quantize.cpp).
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from pyllm import kernels
from pyllm.io.atomic import atomic_path
from pyllm.io.gguf_model import ARCHITECTURES, gemma3_fixed, gguf_names
from pyllm.io.tokenizer_files import TokenizerData, gguf_vocabulary
from pyllm.models import ModelConfig, stored_in_out

try:   # the export extra: `pip install "pyllm[export]"`; pyllm imports without it
    import gguf
    MISSING = None
except ImportError as exc:
    gguf, MISSING = None, exc

# --type -> (ggml type of the matrices, GGUF general.file_type as llama.cpp numbers it)
TYPES = {"f32": (0, 0), "f16": (1, 1),
         "q8_0": (kernels.QUANT_TYPES["Q8_0"], 7), "q4_0": (kernels.QUANT_TYPES["Q4_0"], 2),
         "q4_1": (kernels.QUANT_TYPES["Q4_1"], 3), "q4_k": (kernels.QUANT_TYPES["Q4_K"], 14)}
# A matrix whose rows are not whole blocks of the file's type: stored in this one instead, where
# they are whole blocks of it (llama.cpp's quantizer falls back likewise), else float16.
FALLBACK = {kernels.QUANT_TYPES["Q4_K"]: kernels.QUANT_TYPES["Q8_0"]}


def permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face's rotate-half q/k rows in llama.cpp's interleaved order (gguf_model.unpermute_rope
    undoes it)."""
    out, cols = w.shape
    return w.reshape(n_head, 2, out // n_head // 2, cols).swapaxes(1, 2).reshape(out, cols)


def write_gguf(path, cfg: ModelConfig, state: dict, type: str = "f16", tokenizer: Optional[TokenizerData] = None,
               chat_template: Optional[str] = None, eos_id: Optional[int] = None, bos_id: Optional[int] = None,
               name: str = "pyllm", progress: Optional[Callable[[int, int], None]] = None) -> None:
    """A GGUF file of a model: `state` its float tensors under Hugging Face names (Model.state_dict()),
    matrices stored as `type` (TYPES), the tokenizer's vocabulary and the chat template in the
    metadata (llama.cpp needs a vocabulary to load a file). Written atomically."""
    if MISSING is not None:
        raise ImportError(f'writing GGUF files needs the gguf package: pip install "pyllm[export]" ({MISSING})')
    if type not in TYPES:
        raise ValueError(f"type {type!r} is not one of {', '.join(TYPES)}")
    if cfg.arch not in ARCHITECTURES:
        raise ValueError(f"architecture {cfg.arch!r} has no GGUF mapping")
    check_expressible(cfg)
    matrix_type, file_type = TYPES[type]
    names = gguf_names(cfg)
    unknown = sorted(set(state) - set(names))
    if unknown:
        raise ValueError(f"tensors with no GGUF name: {unknown[:5]}")
    with atomic_path(path) as tmp:
        w = gguf.GGUFWriter(str(tmp), cfg.arch)
        _metadata(w, cfg, name, file_type)
        if tokenizer is not None:
            _vocabulary(w, tokenizer, cfg.vocab_size, chat_template, eos_id, bos_id)
        in_out = stored_in_out(cfg)
        todo = list(state.items())
        for done, (hf, value) in enumerate(todo):
            value = np.asarray(value, np.float32)
            if hf in in_out:
                value = value.T   # GPT-2's Conv1D (in, out) -> (out, in)
            if cfg.arch == "llama" and hf.endswith(("q_proj.weight", "k_proj.weight")):
                value = permute_rope(value, cfg.n_head if hf.endswith("q_proj.weight") else cfg.n_kv_head)
            _tensor(w, names[hf], np.ascontiguousarray(value), matrix_type,
                    keep_float=hf.endswith("wpe.weight"))
            if progress is not None:
                progress(done + 1, len(todo))
        factors = cfg.rope_freq_factors()
        if factors is not None:
            w.add_tensor("rope_freqs.weight", factors.astype(np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()


def _metadata(w, cfg: ModelConfig, name: str, file_type: int) -> None:
    w.add_name(name)
    w.add_file_type(file_type)
    w.add_context_length(cfg.block_size)
    w.add_embedding_length(cfg.n_embd)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_block_count(cfg.n_layer)
    w.add_head_count(cfg.n_head)
    if cfg.arch == "gpt2":
        w.add_layer_norm_eps(cfg.norm_eps)
        return
    w.add_head_count_kv(cfg.n_kv_head)
    w.add_key_length(cfg.head_size)
    w.add_value_length(cfg.head_size)
    w.add_rope_dimension_count(cfg.head_size)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_vocab_size(cfg.vocab_size)
    if cfg.sliding_window:   # read back by pyllm; llama.cpp runs llama-arch files with full attention
        w.add_sliding_window(cfg.sliding_window)
    if cfg.rope_scaling is not None and cfg.rope_scaling.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(cfg.rope_scaling["factor"]))
    if cfg.arch == "gemma3":
        if cfg.final_logit_softcapping:
            w.add_final_logit_softcapping(float(cfg.final_logit_softcapping))


def check_expressible(cfg: ModelConfig) -> None:
    """Refuses what a GGUF file cannot say for this architecture (llama.cpp fixes some of gemma3's
    settings instead of reading them: gguf_model.gemma3_fixed)."""
    if cfg.arch != "gemma3":
        return
    if cfg.sliding_window is None:
        raise ValueError("llama.cpp's gemma3 needs a sliding window (it makes five of every six layers slide)")
    fixed = gemma3_fixed(cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.head_size, cfg.sliding_window)
    ours = ModelConfig(**{**cfg.to_dict(), "layer_types": None, **fixed})
    for name in ("layer_types", "rope_local_theta", "query_pre_attn_scalar"):
        if getattr(ours, name) != getattr(cfg, name):
            raise ValueError(f"a GGUF gemma3 file cannot hold {name}={getattr(cfg, name)!r}: llama.cpp fixes it at "
                             f"{getattr(ours, name)!r} (every sixth layer global, local rope base 10000, "
                             f"query scalar head_dim)")


def _vocabulary(w, data: TokenizerData, vocab_size: int, chat_template: Optional[str], eos_id: Optional[int],
                bos_id: Optional[int]) -> None:
    vocab = gguf_vocabulary(data, vocab_size)
    w.add_tokenizer_model(vocab.model)
    if vocab.pre is not None:
        w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    if vocab.merges is not None:
        w.add_token_merges(vocab.merges)
    if vocab.scores is not None:
        w.add_token_scores(vocab.scores)
    if vocab.add_space_prefix is not None:
        w.add_add_space_prefix(vocab.add_space_prefix)
    for name, tid in (("eos_id", eos_id), ("bos_id", bos_id)):
        if tid is not None and (isinstance(tid, bool) or not isinstance(tid, (int, np.integer))
                                or not 0 <= tid < len(vocab.tokens)):
            raise ValueError(f"{name} {tid!r} is not a token of the vocabulary (0 .. {len(vocab.tokens) - 1})")
    if eos_id is not None:
        w.add_eos_token_id(int(eos_id))
    if bos_id is not None:
        w.add_bos_token_id(int(bos_id))
    w.add_add_bos_token(bos_id is not None)
    if data.unk_token_id is not None:
        w.add_unk_token_id(int(data.unk_token_id))
    if chat_template:
        w.add_chat_template(chat_template)


def _tensor(w, name: str, value: np.ndarray, matrix_type: int, keep_float: bool) -> None:
    """One tensor: a matrix in the file's type where its rows are whole blocks, else float16 (or
    float32 for an f32 file); vectors and GPT-2's position table float32."""
    if value.ndim != 2 or keep_float or matrix_type == 0:
        w.add_tensor(name, value)
        return
    if matrix_type != 1 and value.shape[1] % kernels.GGML_TYPES[matrix_type].block_values:
        matrix_type = FALLBACK.get(matrix_type, 1)
        if matrix_type != 1 and value.shape[1] % kernels.GGML_TYPES[matrix_type].block_values:
            matrix_type = 1
    if matrix_type == 1:
        w.add_tensor(name, value.astype(np.float16))
    else:
        blocks = kernels.quantize(value, matrix_type)
        w.add_tensor(name, blocks, raw_dtype=gguf.GGMLQuantizationType(matrix_type))
