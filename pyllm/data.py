"""Where training text comes from: files, folders, and the built-in default corpus.

Not tokenization or batching (tokenizer.py; the training data pipeline comes with train.py).
"""

from __future__ import annotations

import sysconfig
from pathlib import Path


def default_corpus_files() -> list[Path]:
    """The running interpreter's standard-library .py sources: real text every machine has.

    >>> len(default_corpus_files()) > 100
    True
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3"}
    return sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))


def read_default_corpus(limit_bytes: int | None = None) -> str:
    """The default corpus as one string (undecodable files skipped), up to limit_bytes."""
    parts, size = [], 0
    for path in default_corpus_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        parts.append(text)
        size += len(text)
        if limit_bytes is not None and size >= limit_bytes:
            break
    return "".join(parts)
