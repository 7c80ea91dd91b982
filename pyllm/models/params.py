"""Parameters: what each weight is (ParamSpec), the flat buffers they live in, and weights kept in a
ggml block format (QuantizedWeight).

All float parameters of a model share one float32 buffer, and their gradients another of the same
layout, as llm.c does: a name maps to a view into it, AdamW updates the whole buffer with one fused
kernel per decay group, and adjacent weights (Llama's q, k and v projections) can be read as one.
Not the architectures' lists of parameters (gpt2.py, llama.py) nor their initialisation policy's
numbers (transformer.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pyllm import kernels


@dataclass(frozen=True)
class ParamSpec:
    name: str             # Hugging Face's name, e.g. "transformer.h.0.attn.c_attn.weight"
    shape: tuple          # Hugging Face's shape
    decay: bool           # AdamW weight decay applies (matmul weights only)
    init: str             # "normal", "residual" (normal scaled by 1/sqrt(2 n_layer)), "zeros", "ones"


@dataclass(frozen=True)
class QuantizedWeight:
    """A (N, K) weight (N output rows of K inputs) kept as ggml blocks: data is (N, bytes per row) uint8,
    in ggml's layout or (packed) in kernels.pack_quant's, what the integer products read fastest."""

    data: np.ndarray
    ggml_type: int
    shape: tuple
    packed: bool = False

    def dequantize(self) -> np.ndarray:
        return kernels.dequantize(self.data, self.ggml_type, self.shape, self.packed)

    def to_packed(self) -> "QuantizedWeight":
        """This weight in the packed layout (a copy), or itself when its type has none or it is packed."""
        if self.packed or not kernels.GGML_TYPES[self.ggml_type].packed:
            return self
        return QuantizedWeight(kernels.pack_quant(self.data, self.ggml_type, self.shape), self.ggml_type, self.shape,
                               True)


def flat_views(flat: np.ndarray, specs: list[ParamSpec]) -> dict[str, np.ndarray]:
    """Name -> a view into `flat` shaped as the spec, the specs laid out one after another."""
    views, offset = {}, 0
    for spec in specs:
        size = math.prod(spec.shape)
        views[spec.name] = flat[offset:offset + size].reshape(spec.shape)
        offset += size
    return views


def offsets(specs: list[ParamSpec]) -> dict[str, int]:
    """Name -> where its values start in the flat buffer."""
    starts, offset = {}, 0
    for spec in specs:
        starts[spec.name] = offset
        offset += math.prod(spec.shape)
    return starts


def initialise(views: dict[str, np.ndarray], specs: list[ParamSpec], seed: int, n_layer: int) -> None:
    """GPT-2's initialisation: normal(0, 0.02), residual projections scaled by 1/sqrt(2 n_layer),
    norms' weights 1, biases 0."""
    rng = np.random.default_rng(seed)
    residual_std = 0.02 / math.sqrt(2 * n_layer)
    for spec in specs:
        view = views[spec.name]
        if spec.init == "zeros":
            view.fill(0.0)
        elif spec.init == "ones":
            view.fill(1.0)
        else:
            std = residual_std if spec.init == "residual" else 0.02
            view[...] = rng.standard_normal(spec.shape, dtype=np.float32) * np.float32(std)
