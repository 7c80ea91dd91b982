"""The Gemma 3 text family, as Qwen3 (an RMSNorm on each q and k head, an explicit head_dim) with
what Gemma adds: a GeGLU feed-forward (GELU's tanh form), a norm after attention and after the
feed-forward as well as before each, token embeddings scaled by sqrt(n_embd), sliding-window
layers between global ones with a rope base of their own, scores scaled by query_pre_attn_scalar,
and optionally soft-capped logits (the config says which; ModelConfig and blocks.py run them).

Hugging Face's Gemma3ForCausalLM names its parameters as Llama does, plus
self_attn.{q,k}_norm, pre_feedforward_layernorm and post_feedforward_layernorm (and its
post_attention_layernorm is the norm after attention, not the one before the feed-forward). Its
RMSNorms multiply by (1 + w); pyllm keeps the factor itself (1 + w), as llama.cpp's GGUF files
store it, so every norm runs the one kernel: NORM_OFFSET is what Hugging Face's files lack.
Not the block (blocks.py) nor the files (pyllm.io.hf adds and removes the offset).
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from pyllm.kernels import unchecked as fast
from pyllm.models.config import ModelConfig
from pyllm.models.llama import EMBED, Llama
from pyllm.models.layers import Weights, embed_tokens

NORM_OFFSET = 1.0   # Hugging Face's Gemma norm weight w is pyllm's 1 + w


class Gemma3(Llama):
    name = "gemma3"
    qk_norm = True
    activation = "geglu"
    norm2_name = "pre_feedforward_layernorm.weight"

    def post_norm_names(self, prefix: str) -> Optional[tuple]:
        return prefix + "post_attention_layernorm.weight", prefix + "post_feedforward_layernorm.weight"

    def embed_scale(self, n_embd: int) -> float:
        """sqrt(n_embd), rounded to float32 as transformers and llama.cpp compute it."""
        return float(np.float32(math.sqrt(n_embd)))

    def embed(self, model: Weights, out: np.ndarray, ids: np.ndarray) -> None:
        embed_tokens(model, EMBED, out, ids.reshape(-1))
        out *= np.float32(self.embed_scale(out.shape[1]))

    def embed_backward(self, model: Weights, grads, dx: np.ndarray, ids: np.ndarray) -> None:
        V, C = grads[EMBED].shape
        scaled = dx * np.float32(self.embed_scale(C))
        fast.embedding_backward(grads[EMBED], scaled, ids, ids.size, V, C)

    def norm_offsets(self, cfg: ModelConfig) -> dict[str, float]:
        """Parameter name -> what Hugging Face's files store less than pyllm keeps (every RMSNorm)."""
        return {spec.name: NORM_OFFSET for spec in self.parameter_specs(cfg) if spec.name.endswith("norm.weight")}
