"""Small files done safely: atomic writes (a temporary file beside the target, fsync, rename; an
interrupted save loses nothing), whole folders swapped in, and JSON objects read with errors that
name the file."""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _umask() -> int:
    """The process's umask (read without changing it where /proc says it; else set and restored)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path) -> Iterator[Path]:
    """Yields a temporary path to write; on success it is flushed to disk, given the mode a plain
    open() would (0666 less the umask: some writers, safetensors' among them, create files 0600),
    and renamed to `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
            os.fchmod(f.fileno(), 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def replace_folder(tmp, final) -> None:
    """Puts the complete folder `tmp` in place of `final`: the old one is renamed aside first and
    removed last, so a crash leaves one of the two whole (final, or final.old: see latest_folder)."""
    tmp, final = Path(tmp), Path(final)
    old = final.with_name(final.name + ".old")
    if final.exists():   # (without it, a crash left .old as the only whole copy: kept until tmp is in)
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def latest_folder(final, marker: str):
    """final, or final.old after a crash between replace_folder's renames; None when neither
    holds the file `marker`."""
    final = Path(final)
    for folder in (final, final.with_name(final.name + ".old")):
        if (folder / marker).is_file():
            return folder
    return None


def write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def read_json_object(path) -> dict:
    """A JSON file that must hold an object: a ValueError naming the file otherwise."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: not a JSON object (a JSON {type(doc).__name__})")
    return doc
