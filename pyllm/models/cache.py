"""KVCache: the keys and values every layer has computed so far, per sequence of a batch.

Generation appends each new position's keys and values (kernels' kv_write) instead of recomputing
the whole history. Rows of a batch may hold different lengths (a ragged batch): `lengths[b]` says
how many positions row b holds. Not the attention over it (the decode step in blocks.py).
"""

from __future__ import annotations

import mmap

import numpy as np

from pyllm.models.config import ModelConfig


KV_DTYPES = (np.float32, np.float16)


class KVCache:
    """Keys and values of every layer for a batch of sequences, (B, NKV, capacity, HS) each, and
    how many positions each row holds. dtype float16 halves the bytes decoding reads at every step
    (each value rounded once, as it is written, as llama.cpp's default cache does); float32 keeps
    what the layers computed exactly."""

    def __init__(self, config: ModelConfig, batch: int, capacity: int, dtype=np.float32) -> None:
        if isinstance(batch, bool) or int(batch) != batch or batch < 1:
            raise ValueError(f"a KV cache needs a batch of at least 1 sequence, got {batch!r}")
        if isinstance(capacity, bool) or int(capacity) != capacity or capacity < 1:
            raise ValueError(f"a KV cache needs a capacity of at least 1 position, got {capacity!r}")
        if capacity > config.block_size:
            raise ValueError(f"a cache of {capacity} positions exceeds the model's block_size {config.block_size}")
        if np.dtype(dtype) not in KV_DTYPES:
            raise ValueError(f"a KV cache holds float32 or float16 values, got {np.dtype(dtype)}")
        shape = (config.n_layer, int(batch), config.n_kv_head, int(capacity), config.head_size)
        self.batch, self.capacity = int(batch), int(capacity)
        # One buffer for every layer (the C++ step walks it by a stride); k[i] is layer i's view.
        self.dtype = np.dtype(dtype)
        self.k_all, self.v_all = _zeros(shape, self.dtype), _zeros(shape, self.dtype)
        self.k, self.v = list(self.k_all), list(self.v_all)
        self.lengths = np.zeros(self.batch, np.int64)


def _zeros(shape: tuple, dtype: np.dtype) -> np.ndarray:
    """Zeros in anonymous memory, faulted in page by page as rows are first written. Not np.zeros:
    numpy asks for huge pages on large arrays, and where the kernel then compacts memory to find
    them, a row's first write stalled 150-300 ms (seen with defrag=madvise)."""
    nbytes = int(np.prod(shape)) * dtype.itemsize
    return np.frombuffer(mmap.mmap(-1, max(nbytes, 1)), dtype, int(np.prod(shape))).reshape(shape)
