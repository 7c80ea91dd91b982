"""Training checkpoints, for `pyllm train` and `pyllm finetune` alike: a folder of named arrays (a
safetensors file) and a JSON state, written whole into a temporary folder and swapped in, so an
interrupted save leaves the previous checkpoint intact; read back from the newest complete one.

Not what goes into a checkpoint (train.py and finetune.py decide) nor the model folder format
(hf.py, which train.py adds through `extra`).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from pyllm.io.atomic import latest_folder, read_json_object, replace_folder, write_text
from pyllm.io.hf import load_state, write_safetensors


def refuse_earlier_run(folder, markers: tuple, resume: bool, overwrite: bool) -> None:
    """A run's output folder that holds an earlier run's files (any of `markers`) is written over
    only when asked: resume goes on from it, overwrite replaces it; else a FileExistsError says so."""
    if resume or overwrite:
        return
    found = [m for m in markers if (Path(folder) / m).exists()]
    if found:
        raise FileExistsError(f"{folder} holds an earlier run ({', '.join(found)}): go on from it with --resume, "
                              f"write to another --out, or replace it with --overwrite")


@dataclass
class Checkpoint:
    path: Path                       # the folder it was read from (the .old one after a crash)
    state: dict                      # the JSON state
    tensors: dict[str, np.ndarray]   # the named arrays


def write_checkpoint(folder, tensors: dict[str, np.ndarray], state: dict, tensors_file: str, state_file: str,
                     extra: Optional[Callable[[Path], None]] = None, indent: Optional[int] = None) -> Path:
    """Writes folder as a whole: tensors_file (safetensors), state_file (JSON) and whatever extra(tmp)
    adds, into folder.tmp first, then swapped in (see pyllm.io.atomic.replace_folder)."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        if extra is not None:
            extra(tmp)
        write_safetensors(tmp / tensors_file, tensors)
        write_text(tmp / state_file, json.dumps(state, indent=indent))
    except OSError as exc:   # a full disk, say: the half-written copy goes, the previous one stays
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(exc.errno, f"could not write the checkpoint {folder} ({exc.strerror or exc}); "
                                 f"the previous one, if any, is intact") from None
    replace_folder(tmp, folder)
    return folder


def read_checkpoint(folder, tensors_file: str, state_file: str) -> Optional[Checkpoint]:
    """The newest complete checkpoint in folder (or folder.old after a crash mid-swap), or None."""
    found = latest_folder(Path(folder), state_file)
    if found is None:
        return None
    return Checkpoint(found, read_json_object(found / state_file), load_state(found / tensors_file))


def remove_checkpoint(folder) -> None:
    """Deletes a checkpoint folder and its .old copy (a finished run needs neither)."""
    folder = Path(folder)
    for path in (folder, folder.with_name(folder.name + ".old")):
        shutil.rmtree(path, ignore_errors=True)


def rng_state(rng: np.random.Generator) -> dict:
    """A numpy generator's state as JSON-ready data."""
    return rng.bit_generator.state


def rng_from(state: dict) -> np.random.Generator:
    """The generator a checkpoint's RNG state describes (a ValueError if it describes none)."""
    rng = np.random.default_rng()
    try:
        rng.bit_generator.state = state
    except (TypeError, ValueError, KeyError, OverflowError) as exc:
        raise ValueError(f"not a random generator's state ({type(exc).__name__}: {exc})") from None
    return rng
