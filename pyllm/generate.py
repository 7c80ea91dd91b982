"""Text generation: sample the next token from the model's probabilities, append it, repeat.

This first version recomputes the whole (windowed) forward pass for every new token and samples in
numpy; the KV cache and the C++ sampler replace both (see the generation issue).
"""

from __future__ import annotations

from typing import Optional

import numpy as np


def next_token_probs(logits: np.ndarray, temperature: float = 1.0, top_k: Optional[int] = None,
                     top_p: Optional[float] = None) -> np.ndarray:
    """The distribution sampled from: softmax(logits / temperature) cut to top_k and top_p, renormalised."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    logits = np.asarray(logits, np.float64)
    if temperature == 0:
        probs = np.zeros_like(logits)
        probs[np.argmax(logits)] = 1.0
        return probs
    z = logits / temperature
    if top_k is not None and top_k < z.size:
        kth = np.partition(z, -top_k)[-top_k]
        z = np.where(z < kth, -np.inf, z)
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    if top_p is not None and top_p < 1:
        order = np.argsort(-probs, kind="stable")
        keep = np.cumsum(probs[order]) - probs[order] < top_p   # the smallest prefix reaching top_p
        mask = np.zeros_like(probs, bool)
        mask[order[keep]] = True
        probs = np.where(mask, probs, 0.0)
        probs /= probs.sum()
    return probs


def generate(model, ids, max_new_tokens: int, temperature: float = 1.0, top_k: Optional[int] = None,
             top_p: Optional[float] = None, seed: Optional[int] = None) -> np.ndarray:
    """ids (T,) or (1, T) followed by max_new_tokens sampled tokens, as a 1-D int64 array."""
    ids = np.asarray(ids, np.int64).reshape(-1)
    if ids.size == 0:
        raise ValueError("generate needs at least one prompt token")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    rng = np.random.default_rng(seed)
    block = model.config.block_size
    out = list(ids)
    for _ in range(max_new_tokens):
        window = np.asarray(out[-block:], np.int64)[None, :]
        logits = model(window)[0, -1]
        probs = next_token_probs(logits, temperature, top_k, top_p)
        out.append(int(rng.choice(probs.size, p=probs)))
    return np.asarray(out, np.int64)
