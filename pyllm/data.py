"""Where training text comes from: files, folders, and the built-in default corpus.

Documents from files, folders and JSONL; a tokenized corpus as train/val id memmaps, and batches
drawn from it. Not tokenization itself (tokenizer.py).
"""

from __future__ import annotations

import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from pyllm.io.atomic import atomic_path, write_text
from pyllm.progress import bar as progress_bar

EOT = "<|endoftext|>"


def default_corpus_files() -> list[Path]:
    """The running interpreter's standard-library .py sources: real text every machine has.

    >>> len(default_corpus_files()) > 100
    True
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    # Tests, and generated tables (codec maps, pydoc's topic dump) that would drown the code.
    skip = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "encodings", "pydoc_data"}
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


# ----------------------------------------------------------------------------- documents

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".json", ".jsonl", ".html", ".csv", ".c", ".h", ".cpp", ".js"}


def iter_documents(sources) -> Iterator[str]:
    """Documents from paths: a .jsonl file gives each line's "text", a text file is one document,
    a folder gives its text files (by suffix, sorted). A clear error names an unreadable source."""
    for source in sources:
        path = Path(source)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
            if not files:
                raise ValueError(f"{path}: no text files in this folder (looked for {sorted(TEXT_SUFFIXES)})")
            yield from iter_documents(files)
        elif path.suffix.lower() == ".jsonl":
            yield from _jsonl_texts(path)
        elif path.is_file():
            try:
                yield path.read_text(encoding="utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        else:
            raise FileNotFoundError(f"no such file or folder: {path}")


def _jsonl_texts(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f'{path}:{number}: each line needs a "text" string field')
            yield record["text"]


def default_documents() -> Iterator[str]:
    """The default corpus (the standard library's sources), one document per file."""
    for path in default_corpus_files():
        try:
            yield path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue


# ----------------------------------------------------------------------------- token memmaps

META = "meta.json"


def id_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    if vocab_size <= 1 << 32:
        return np.dtype(np.uint32)
    raise ValueError(f"vocab_size {vocab_size} does not fit 32-bit token ids")


@dataclass
class TokenData:
    """A tokenized corpus on disk: train.bin and val.bin (flat id memmaps) and meta.json."""

    directory: Path
    train: np.ndarray
    val: np.ndarray
    vocab_size: int

    @classmethod
    def build(cls, documents: Iterable[str], tokenizer, directory, val_fraction: float = 0.1,
              progress: bool = True) -> "TokenData":
        """Encodes documents (joined by the end-of-text token, when the tokenizer has one) and
        holds out about val_fraction of them for validation: every k-th document (k = 1 /
        val_fraction), so both splits sample the whole corpus; with fewer than 2k documents, the
        last val_fraction of the tokens."""
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction!r}")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        dtype = id_dtype(tokenizer.vocab_size)
        eot = tokenizer.special_tokens.get(EOT)
        docs = list(documents)
        chunks: list[np.ndarray] = []
        batch = 64
        with progress_bar(total=len(docs), desc="tokenizing", unit="doc", enabled=progress) as bar:
            for start in range(0, len(docs), batch):
                for ids in tokenizer.encode_batch(docs[start:start + batch], disallowed_special=()):
                    chunks.append(np.asarray(ids + ([eot] if eot is not None else []), dtype=dtype))
                bar.update(min(batch, len(docs) - start))
        every = max(2, round(1 / val_fraction))
        if len(chunks) >= 2 * every:
            held_out = [i % every == every - 1 for i in range(len(chunks))]
            train = np.concatenate([c for c, h in zip(chunks, held_out) if not h])
            val = np.concatenate([c for c, h in zip(chunks, held_out) if h])
        else:
            tokens = np.concatenate(chunks) if chunks else np.zeros(0, dtype)
            n_val = int(len(tokens) * val_fraction)
            train, val = tokens[:len(tokens) - n_val], tokens[len(tokens) - n_val:]
        if len(train) < 2 or len(val) < 2:
            raise ValueError(f"the data has only {len(train) + len(val)} tokens: too little to train on")
        n_val = len(val)
        for name, part in (("train.bin", train), ("val.bin", val)):
            with atomic_path(directory / name) as tmp:
                part.tofile(tmp)
        write_text(directory / META, json.dumps({"vocab_size": tokenizer.vocab_size, "dtype": dtype.name,
                                                  "train_tokens": len(train), "val_tokens": n_val}))
        return cls.open(directory)

    @classmethod
    def open(cls, directory) -> "TokenData":
        directory = Path(directory)
        try:
            meta = json.loads((directory / META).read_text())
            dtype = np.dtype(meta["dtype"])
            arrays = [np.memmap(directory / name, dtype=dtype, mode="r") for name in ("train.bin", "val.bin")]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{directory}: not a tokenized data folder ({exc})") from None
        return cls(directory, arrays[0], arrays[1], int(meta["vocab_size"]))

    def batch(self, split: str, batch_size: int, block_size: int, rng: np.random.Generator):
        """(ids, targets), each (batch_size, block_size) int64: random windows, targets shifted by one."""
        tokens = self.train if split == "train" else self.val
        if len(tokens) <= block_size:
            raise ValueError(f"the {split} split has {len(tokens)} tokens, fewer than block_size + 1 "
                             f"({block_size + 1}); use more data or a smaller block size")
        starts = rng.integers(0, len(tokens) - block_size, batch_size)
        window = np.stack([tokens[s:s + block_size + 1] for s in starts]).astype(np.int64)
        return window[:, :-1], window[:, 1:]
