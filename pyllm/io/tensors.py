"""What a model file reader hands back: the config, the float tensors by Hugging Face name (read
one at a time, when asked for), and the weights kept in a ggml block format.

Not a model: whoever asked (pyllm.Model.from_pretrained, pyllm.llm.LLM.load) builds one from this.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from pyllm.models import ModelConfig, QuantizedWeight


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
