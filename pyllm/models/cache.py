"""KVCache: the keys and values every layer has computed so far, per sequence of a batch.

Generation appends each new position's keys and values (kernels' kv_write) instead of recomputing
the whole history. Rows of a batch may hold different lengths (a ragged batch): `lengths[b]` says
how many positions row b holds. A sliding-window layer (Mistral's, Gemma's local layers) keeps
only what its window can still see: its own buffer of window - 1 + step_limit positions per row,
whose oldest positions are dropped (the rest moved to the front) when a step needs the room;
`starts[b]` says how many positions row b's window buffers have dropped. Not the attention over
it (the decode step in csrc/model/step.cpp).
"""

from __future__ import annotations

import mmap
from typing import Optional

import numpy as np

from pyllm.models.config import ModelConfig


KV_DTYPES = (np.float32, np.float16)
STEP_LIMIT = 256   # the most new positions one step appends to a window buffer (longer steps are split)


def window_buffer_positions(config: ModelConfig, capacity: int, step_limit: int = STEP_LIMIT) -> Optional[int]:
    """How many positions a row's window buffer holds in a cache of `capacity`, or None when every
    layer keeps all of them (no sliding layer, or windows too wide to save anything)."""
    widest = max(config.layer_window(i) for i in range(config.n_layer))
    if widest == 0 or widest - 1 + step_limit >= capacity:
        return None
    return widest - 1 + step_limit


class KVCache:
    """Keys and values of every layer for a batch of sequences, and how many positions each row
    holds. Layers that see every key: (B, NKV, capacity, HS) each, in one buffer (k_all, v_all);
    sliding-window layers, when that saves memory: (B, NKV, window - 1 + step_limit, HS) each
    (k_window, v_window); a step appending more than step_limit positions is split. dtype float16 halves the bytes decoding reads at every step (each value
    rounded once, as it is written, as llama.cpp's default cache does); float32 keeps what the
    layers computed exactly."""

    def __init__(self, config: ModelConfig, batch: int, capacity: int, dtype=np.float32,
                 step_limit: int = STEP_LIMIT) -> None:
        if isinstance(batch, bool) or int(batch) != batch or batch < 1:
            raise ValueError(f"a KV cache needs a batch of at least 1 sequence, got {batch!r}")
        if isinstance(capacity, bool) or int(capacity) != capacity or capacity < 1:
            raise ValueError(f"a KV cache needs a capacity of at least 1 position, got {capacity!r}")
        if capacity > config.block_size:
            raise ValueError(f"a cache of {capacity} positions exceeds the model's block_size {config.block_size}")
        if np.dtype(dtype) not in KV_DTYPES:
            raise ValueError(f"a KV cache holds float32 or float16 values, got {np.dtype(dtype)}")
        if isinstance(step_limit, bool) or int(step_limit) != step_limit or step_limit < 1:
            raise ValueError(f"step_limit must be a positive integer, got {step_limit!r}")
        self.batch, self.capacity = int(batch), int(capacity)
        self.dtype = np.dtype(dtype)
        self._step_limit = int(step_limit)
        self.window_positions = window_buffer_positions(config, self.capacity, self._step_limit)
        windowed = [self.window_positions is not None and config.layer_window(i) > 0 for i in range(config.n_layer)]
        # Where each layer's keys live: its index in the full buffers (>= 0) or -1 - its index in the
        # window buffers. One buffer per kind (the C++ step walks it by a stride).
        self.layer_slots = np.empty(config.n_layer, np.int64)
        full = local = 0
        for i, w in enumerate(windowed):
            self.layer_slots[i] = -1 - local if w else full
            local, full = local + w, full + (not w)
        heads = (config.n_kv_head, config.head_size)
        self.k_all, self.v_all = (_zeros((full, self.batch, heads[0], self.capacity, heads[1]), self.dtype)
                                  for _ in range(2))
        self.k_window = self.v_window = None
        if local:
            self.k_window, self.v_window = (_zeros((local, self.batch, heads[0], self.window_positions, heads[1]),
                                                   self.dtype) for _ in range(2))
        # The positions a window buffer must keep for the next query: the widest window less one.
        self.keep = self.window_positions - self._step_limit if local else 0
        self.lengths = np.zeros(self.batch, np.int64)
        self.starts = np.zeros(self.batch, np.int64)

    @property
    def step_limit(self) -> Optional[int]:
        """The most positions one step may append (None: up to the capacity)."""
        return self._step_limit if self.k_window is not None else None

    def make_room(self, rows: np.ndarray, new: int) -> None:
        """Before a step appends `new` positions to these rows: where a window buffer would
        overflow, its oldest positions dropped, the last `keep` (what the first new query still
        sees) moved to the front."""
        if self.k_window is None:
            return
        for row in rows:
            held = int(self.lengths[row] - self.starts[row])
            if held + new <= self.window_positions:
                continue
            drop = held - self.keep
            for buf in (self.k_window, self.v_window):
                buf[:, row, :, :self.keep] = buf[:, row, :, drop:held]   # numpy copies overlapping ranges safely
            self.starts[row] += drop

    def truncatable(self, row: int, length: int) -> bool:
        """Whether row can go back to holding its first `length` positions: the window buffers
        still hold the ones the next query would see."""
        if not 0 <= length <= self.lengths[row]:
            return False
        return length == 0 or self.starts[row] == 0 or length - self.keep >= self.starts[row]

    def truncate(self, row: int, length: int) -> None:
        """Row `row` back to its first `length` positions (0: empty), as truncatable allows."""
        if not self.truncatable(row, length):
            raise ValueError(f"cache row {row} holds {int(self.lengths[row])} positions, its window buffers "
                             f"from {int(self.starts[row])} on; it cannot go back to {length}")
        self.lengths[row] = length
        if length == 0:
            self.starts[row] = 0


def _zeros(shape: tuple, dtype: np.dtype) -> np.ndarray:
    """Zeros in anonymous memory, faulted in page by page as rows are first written. Not np.zeros:
    numpy asks for huge pages on large arrays, and where the kernel then compacts memory to find
    them, a row's first write stalled 150-300 ms (seen with defrag=madvise)."""
    nbytes = int(np.prod(shape)) * dtype.itemsize
    return np.frombuffer(mmap.mmap(-1, max(nbytes, 1)), dtype, int(np.prod(shape))).reshape(shape)
