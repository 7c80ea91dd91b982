"""KVCache: the keys and values every layer has computed so far, per sequence of a batch.

Generation appends each new position's keys and values (kernels' kv_write) instead of recomputing
the whole history. Rows of a batch may hold different lengths (a ragged batch): `lengths[b]` says
how many positions row b holds. Not the attention over it (the decode step in blocks.py).
"""

from __future__ import annotations

import numpy as np

from pyllm.models.config import ModelConfig


class KVCache:
    """Keys and values of every layer for a batch of sequences, (B, NKV, capacity, HS) each, and
    how many positions each row holds."""

    def __init__(self, config: ModelConfig, batch: int, capacity: int) -> None:
        if isinstance(batch, bool) or int(batch) != batch or batch < 1:
            raise ValueError(f"a KV cache needs a batch of at least 1 sequence, got {batch!r}")
        if isinstance(capacity, bool) or int(capacity) != capacity or capacity < 1:
            raise ValueError(f"a KV cache needs a capacity of at least 1 position, got {capacity!r}")
        if capacity > config.block_size:
            raise ValueError(f"a cache of {capacity} positions exceeds the model's block_size {config.block_size}")
        shape = (int(batch), config.n_kv_head, int(capacity), config.head_size)
        self.batch, self.capacity = int(batch), int(capacity)
        self.k = [np.zeros(shape, np.float32) for _ in range(config.n_layer)]
        self.v = [np.zeros(shape, np.float32) for _ in range(config.n_layer)]
        self.lengths = np.zeros(self.batch, np.int64)
