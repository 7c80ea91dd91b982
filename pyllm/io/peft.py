"""LoRA adapter folders as `peft` writes and reads them: adapter_config.json and
adapter_model.safetensors (tensors named base_model.model.<module>.lora_A/lora_B.weight).

Not the adapters (pyllm.lora): this reads and writes the files, and refuses what is not an adapter.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pyllm.io.atomic import read_json_object, write_text
from pyllm.io.hf import load_state, write_safetensors

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."


def write_adapter(directory, config: dict, tensors: dict[str, np.ndarray]) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_safetensors(directory / WEIGHTS, tensors)
    write_text(directory / CONFIG, json.dumps(config, indent=2) + "\n")


def read_adapter(directory) -> tuple[dict, dict[str, np.ndarray]]:
    """(adapter_config.json as a dict, the tensors) of an adapter folder."""
    directory = Path(directory)
    for name in (CONFIG, WEIGHTS):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory}: no {name} (expected a LoRA adapter folder)")
    return read_json_object(directory / CONFIG), load_state(directory / WEIGHTS)
