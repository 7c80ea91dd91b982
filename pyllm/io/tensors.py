"""What a model file reader hands back: the config, the float tensors by Hugging Face name (read
one at a time, when asked for), and the weights kept in a ggml block format.

Not a model: whoever asked (pyllm.Model.from_pretrained, pyllm.llm.LLM.load) builds one from this.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from pyllm.models import ModelConfig, QuantizedWeight, parameter_specs


class LazyTensors(Mapping):
    """name -> float32 array, each read from its file only when looked up (so a model is filled one
    tensor at a time, never holding a second copy of every weight)."""

    def __init__(self, names, read: Callable[[str], np.ndarray]) -> None:
        self._names = list(names)
        self._known = set(self._names)
        self._read = read

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._known:
            raise KeyError(name)
        return self._read(name)

    def __contains__(self, name) -> bool:   # Mapping's default would read the tensor to find out
        return name in self._known

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


@dataclass
class ModelWeights:
    config: ModelConfig
    tensors: Mapping                                        # HF name -> float32 array (lazy)
    quantized: dict[str, QuantizedWeight] = field(default_factory=dict)   # kept in blocks


def check_sizes_against_file(cfg: ModelConfig, names: Iterable[str], layer_of: re.Pattern, file_bytes: int,
                             min_bytes_per_value: float, where: str) -> None:
    """Before anything is allocated for a model: the file holds tensors of exactly the config's
    layers (`layer_of` finds a tensor's layer index in its name), and enough bytes for the weights
    the config's sizes need at `min_bytes_per_value` (a small file cannot ask for a huge model)."""
    layers = {int(m.group(1)) for m in map(layer_of.match, names) if m}
    if layers != set(range(cfg.n_layer)):
        found = f"layers 0..{max(layers)}" if layers and layers == set(range(max(layers) + 1)) else \
            f"{len(layers)} layers" if layers else "no layer"
        raise ValueError(f"{where}: the config says {cfg.n_layer} layers; the file holds tensors of {found}")
    values = sum(math.prod(spec.shape) for spec in parameter_specs(cfg))
    if values * min_bytes_per_value > file_bytes:
        raise ValueError(f"{where}: the config's sizes need {values:,} weights, at least "
                         f"{int(values * min_bytes_per_value):,} bytes, but the file holds {file_bytes:,}")
