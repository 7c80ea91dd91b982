"""Workspace: float32 buffers for one batch shape, allocated on first use and reused by every later
step of that shape, as llm.c allocates its activations once. Not thread-safe by itself: a model
keeps one set per thread (transformer.py).
"""

from __future__ import annotations

import numpy as np


class Workspace:
    """Activation buffers for one batch shape, allocated on first use and reused by every later step
    of that shape; views into them can be kept too (`view`), so hot loops build none."""

    def __init__(self) -> None:
        self.key: tuple = ()
        self.arrays: dict[str, np.ndarray] = {}
        self.views: dict[str, object] = {}

    def reset(self, key: tuple) -> bool:
        """Starts a step of shape `key`; True when the buffers of the last one are reused."""
        if key == self.key:
            return True
        self.key, self.arrays, self.views = key, {}, {}
        return False

    def get(self, name: str, shape: tuple) -> np.ndarray:
        arr = self.arrays.get(name)
        if arr is None or arr.shape != shape:
            arr = self.arrays[name] = np.empty(shape, np.float32)
        return arr
