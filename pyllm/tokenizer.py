"""pyllm.Tokenizer: byte-level BPE, trained and applied in C++, with tiktoken's special-token rules.

Not a general tokenizers library: byte-level BPE only (what GPT-2, GPT-4, Llama 3 and SmolLM2
use). Files: pyllm's own versioned JSON, Hugging Face's tokenizer.json, tiktoken's ranks.

Shape of the model: `vocab[id]` is the bytes of token id; `merges[r] = (left, right)` is the
merge of rank r; special tokens are strings with ids of their own, never produced by BPE.
"""

from __future__ import annotations

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Collection, Iterable, Literal, Sequence, Union

import numpy as np

from pyllm.io.atomic import write_text

# The split patterns live with the pre-tokenizer (the built-in ones run in C++); re-exported here.
from pyllm.pretokenize import BUILTIN, GPT2_PATTERN, GPT4_PATTERN, PATTERNS, PIPELINES  # noqa: F401
from pyllm.pretokenize import split_reference

# Oniguruma, the regex engine of Hugging Face `tokenizers`, reads `{1,3}+` as `({1,3})+` (any
# number of digits), not as a possessive `{1,3}`. Without that `+` the GPT-4 pattern means the
# same to `regex` and tiktoken, so tokenizer.json files carry this spelling.
HF_PATTERNS = {**PATTERNS, "gpt4": GPT4_PATTERN.replace(r"\p{N}{1,3}+", r"\p{N}{1,3}")}
# GGUF's tokenizer.ggml.pre -> pattern name
GGUF_PRE = {"default": "gpt2", "gpt-2": "gpt2", "gpt2": "gpt2", "smollm": "gpt2_digits"}

FORMAT_NAME = "pyllm.tokenizer"
FORMAT_VERSION = 1

TextSource = Union[str, os.PathLike, Iterable[Union[str, os.PathLike]]]


def _C():
    from pyllm import _C as module  # imported on first use, like pyllm.kernels
    return module


# ----------------------------------------------------------------------------- bytes <-> text

def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for every byte (how tokenizer.json spells tokens).

    >>> bytes_to_unicode()[ord(" ")]
    'Ġ'
    """
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


_BYTE_TO_CHAR = bytes_to_unicode()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}


def _token_to_str(token: bytes) -> str:
    return "".join(_BYTE_TO_CHAR[b] for b in token)


def _str_to_token(text: str, where: str) -> bytes:
    try:
        return bytes(_CHAR_TO_BYTE[c] for c in text)
    except KeyError as exc:
        raise ValueError(f"{where}: token {text!r} has a character outside the byte-level "
                         f"alphabet ({exc.args[0]!r}); is this a byte-level BPE tokenizer?") from None


def _utf8(text: str, what: str = "text") -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{what} holds a lone surrogate {text[exc.start]!r} at index {exc.start}; "
                         f"it is not valid Unicode and has no UTF-8 bytes") from None


# ----------------------------------------------------------------------------- pre-tokenization

def piece_ends(data: bytes, text: str, pattern: str) -> np.ndarray:
    """End byte offsets (uint32) of the pieces `pattern` splits text into (data is text's UTF-8)."""
    if pattern in BUILTIN:
        return _C().pretokenize_offsets(data, pattern).astype(np.uint32)
    pieces = split_reference(text, pattern)
    ends = np.fromiter((len(p.encode("utf-8")) for p in pieces), np.int64, len(pieces)).cumsum()
    if len(ends) and ends[-1] != len(data) or not len(ends) and data:
        raise ValueError("the pre-tokenizer pattern must match every character of the text "
                         f"(pattern {pattern!r} skipped some)")
    return ends.astype(np.uint32)


def _read_sources(source: TextSource) -> Iterable[str]:
    """Texts from a str, a path (file, or folder of files), or an iterable of those."""
    if isinstance(source, str):
        yield source
        return
    if isinstance(source, os.PathLike):
        path = Path(source)
        if path.is_dir():
            for file in sorted(p for p in path.rglob("*") if p.is_file()):
                yield file.read_text(encoding="utf-8", errors="replace")
        elif path.is_file():
            yield path.read_text(encoding="utf-8", errors="replace")
        else:
            raise ValueError(f"no such file or folder: {path}")
        return
    try:
        items = iter(source)
    except TypeError:
        raise TypeError(f"cannot read text from {type(source).__name__}: give a str, a path, or an "
                        f"iterable of those") from None
    for item in items:
        if not isinstance(item, (str, os.PathLike)):
            raise TypeError(f"cannot read text from {type(item).__name__} inside the iterable")
        yield from _read_sources(item)


# ----------------------------------------------------------------------------- the tokenizer

class Tokenizer:
    """A byte-level BPE tokenizer: any str encodes, and decode(encode(s)) == s.

    >>> tok = Tokenizer.train("hello hello hello world", vocab_size=260)
    >>> tok.decode(tok.encode("hello world"))
    'hello world'
    """

    def __init__(self, vocab: Sequence[bytes], merges: Sequence[tuple[int, int]], pattern: str = "gpt4",
                 special_tokens: dict[str, int] | None = None, unk_token_id: int | None = None):
        self.vocab: list[bytes] = [bytes(t) for t in vocab]
        merges_arr = np.asarray(merges, dtype=np.int64).reshape(-1, 2)
        if merges_arr.size and (merges_arr.min() < 0 or merges_arr.max() >= len(self.vocab)):
            raise ValueError(f"merges name token ids outside the vocabulary of {len(self.vocab)}")
        self.merges: list[tuple[int, int]] = [(int(a), int(b)) for a, b in merges_arr]
        self.pattern = pattern
        self.special_tokens: dict[str, int] = dict(special_tokens or {})
        for name, sid in self.special_tokens.items():
            if not isinstance(sid, int) or sid < 0:
                raise ValueError(f"special token {name!r} needs a non-negative integer id, got {sid!r}")
            if sid < len(self.vocab):
                if self.vocab[sid] not in (b"", name.encode("utf-8")):
                    raise ValueError(f"special token {name!r} has id {sid}, which is the ordinary "
                                     f"token {self.vocab[sid]!r}")
                # An id that is only a special token keeps an empty placeholder in the ordinary
                # vocabulary: no merge can make b"", so BPE never produces it.
                self.vocab[sid] = b""
        # A byte with no token of its own (some imported vocabularies lack a few control bytes)
        # encodes as unk_token_id, as Hugging Face's BPE does; without one it cannot be encoded.
        self.unk_token_id = unk_token_id
        if unk_token_id is not None and not 0 <= unk_token_id < len(self.vocab):
            raise ValueError(f"unk_token_id {unk_token_id} is outside the vocabulary")
        self._model = _C().BpeModel(self.vocab, merges_arr.astype(np.uint32),
                                    -1 if unk_token_id is None else int(unk_token_id))
        self._special_by_id = {sid: name for name, sid in self.special_tokens.items()}
        self._special_split = (re.compile("(" + "|".join(re.escape(s) for s in sorted(
            self.special_tokens, key=len, reverse=True)) + ")") if self.special_tokens else None)

    # --------------------------------------------------------------------- training

    @classmethod
    def train(cls, text_or_iterable: TextSource, vocab_size: int, pattern: str = "gpt4",
              special_tokens: Collection[str] = (), *, min_frequency: int = 0,
              progress: bool | Callable[[int, int], None] = True) -> "Tokenizer":
        """Learns vocab_size - 256 - len(special_tokens) merges from text, files or an iterable.

        Every byte is a base token (ids 0-255); merge i makes id 256 + i; special tokens follow.
        Ties between equally frequent pairs go to the smallest (left id, right id), so the same
        corpus always gives the same tokenizer. Training stops early if no pair occurs at least
        min_frequency times (or at all).
        """
        special_tokens = list(dict.fromkeys(special_tokens))
        if int(vocab_size) != vocab_size or vocab_size < 256 + len(special_tokens):
            raise ValueError(f"vocab_size must be at least 256 (the bytes) + {len(special_tokens)} "
                             f"(special tokens), got {vocab_size!r}")
        if vocab_size > 2 ** 32 - 1:
            raise ValueError(f"vocab_size {vocab_size} does not fit 32-bit token ids")
        counter = _C().PieceCounter()
        for text in _read_sources(text_or_iterable):
            data = _utf8(text)
            counter.add(data, piece_ends(data, text, pattern))
        pieces, counts = counter.items()
        num_merges = int(vocab_size) - 256 - len(special_tokens)
        report = _progress_reporter(progress, num_merges)
        merges = _C().train_bpe(pieces, counts, num_merges, int(min_frequency),
                                max(1, num_merges // 100), report)
        vocab = [bytes([b]) for b in range(256)]
        for a, b in merges.tolist():
            vocab.append(vocab[a] + vocab[b])
        specials = {name: len(vocab) + i for i, name in enumerate(special_tokens)}
        return cls(vocab, merges, pattern, specials)

    # --------------------------------------------------------------------- encoding

    @property
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included (ids run 0 .. vocab_size - 1)."""
        return max([len(self.vocab)] + [sid + 1 for sid in self.special_tokens.values()])

    def encode_ordinary(self, text: str) -> list[int]:
        """Token ids of text with special tokens treated as plain text.

        >>> Tokenizer([bytes([b]) for b in range(256)], []).encode_ordinary("hi")
        [104, 105]
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        data = _utf8(text)
        return self._model.encode_pieces(data, piece_ends(data, text, self.pattern)).tolist()

    def encode(self, text: str, *, allowed_special: Literal["all"] | Collection[str] = (),
               disallowed_special: Literal["all"] | Collection[str] = "all") -> list[int]:
        """Token ids of text; special tokens as tiktoken does them.

        Text that spells a special token is an error unless the token is in allowed_special
        (then it becomes that token's id) or left out of disallowed_special (then plain text).
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        allowed = set(self.special_tokens) if allowed_special == "all" else set(allowed_special)
        disallowed = (set(self.special_tokens) - allowed if disallowed_special == "all"
                      else set(disallowed_special))
        unknown = (allowed | disallowed) - set(self.special_tokens)
        if unknown:
            raise ValueError(f"not special tokens of this tokenizer: {sorted(unknown)}; it has "
                             f"{sorted(self.special_tokens)}")
        for name in disallowed:
            if name in text:
                raise ValueError(
                    f"Encountered text corresponding to disallowed special token {name!r}.\n"
                    f"If you want this text to be encoded as a special token, pass it to "
                    f"`allowed_special`, e.g. `allowed_special={{{name!r}, ...}}`.\n"
                    f"If you want this text to be encoded as normal text, disable the check for "
                    f"this token by passing `disallowed_special=(tok.special_tokens.keys() - "
                    f"{{{name!r}}})`.\nTo disable this check for all special tokens, pass "
                    f"`disallowed_special=()`.")
        if not allowed or self._special_split is None:
            return self.encode_ordinary(text)
        ids: list[int] = []
        for i, chunk in enumerate(self._special_split.split(text)):
            if i % 2 and chunk in allowed:
                ids.append(self.special_tokens[chunk])
            elif chunk:
                ids.extend(self.encode_ordinary(chunk))
        return ids

    def encode_batch(self, texts: Sequence[str], *, num_threads: int | None = None,
                     allowed_special: Literal["all"] | Collection[str] = (),
                     disallowed_special: Literal["all"] | Collection[str] = "all") -> list[list[int]]:
        """encode() of every text, on several threads (the C++ encoder releases the GIL)."""
        workers = num_threads or os.cpu_count() or 1
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(lambda t: self.encode(t, allowed_special=allowed_special,
                                                       disallowed_special=disallowed_special), texts))

    # --------------------------------------------------------------------- decoding

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The exact bytes of ids (special tokens as their UTF-8 text)."""
        ids = list(ids)
        if not self.special_tokens:
            return self._decode_ordinary(ids)
        out, run = [], []
        for i in ids:
            if i in self._special_by_id:
                out.append(self._decode_ordinary(run))
                out.append(self._special_by_id[i].encode("utf-8"))
                run = []
            else:
                run.append(i)
        out.append(self._decode_ordinary(run))
        return b"".join(out)

    def _decode_ordinary(self, ids: list[int]) -> bytes:
        arr = np.asarray(ids)
        if arr.size and (arr.dtype.kind not in "iu"):
            raise TypeError(f"token ids must be integers, got dtype {arr.dtype}")
        if arr.size and (arr.min() < 0 or arr.max() >= len(self.vocab)):
            bad = next(i for i in ids if not 0 <= i < len(self.vocab))
            raise ValueError(f"token id {bad} is outside the vocabulary (0 .. {self.vocab_size - 1})")
        return self._model.decode(arr.astype(np.uint32)) if arr.size else b""

    def decode(self, ids: Iterable[int], errors: str = "replace") -> str:
        """Text of ids; bytes that are not valid UTF-8 (a token boundary inside a character)
        become U+FFFD unless errors="strict"."""
        return self.decode_bytes(ids).decode("utf-8", errors=errors)

    def token_to_bytes(self, token_id: int) -> bytes:
        """The bytes of one token."""
        if token_id in self._special_by_id:
            return self._special_by_id[token_id].encode("utf-8")
        if not isinstance(token_id, (int, np.integer)) or not 0 <= token_id < len(self.vocab):
            raise ValueError(f"token id {token_id!r} is outside the vocabulary (0 .. {self.vocab_size - 1})")
        return self.vocab[token_id]

    def mergeable_ranks(self) -> dict[bytes, int]:
        """bytes -> id for every ordinary token: what tiktoken.Encoding takes as mergeable_ranks."""
        return {token: i for i, token in enumerate(self.vocab) if i not in self._special_by_id}

    # --------------------------------------------------------------------- files

    def save(self, path: str | os.PathLike, format: Literal["pyllm", "hf"] = "pyllm") -> None:
        """Writes pyllm's JSON, or with format="hf" a tokenizer.json the `tokenizers` package reads.

        The write is atomic: a temporary file is written, synced and renamed over path.
        """
        if format == "pyllm":
            doc = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "pattern": self.pattern,
                   "vocab": [_token_to_str(t) for t in self.vocab], "merges": self.merges,
                   "special_tokens": self.special_tokens, "unk_token_id": self.unk_token_id}
        elif format == "hf":
            doc = self._hf_document()
        else:
            raise ValueError(f"format must be 'pyllm' or 'hf', got {format!r}")
        write_text(Path(path), json.dumps(doc, ensure_ascii=False))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """Reads pyllm's JSON or a Hugging Face tokenizer.json (byte-level BPE)."""
        path = Path(path)
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path} is not a tokenizer file (not valid JSON: {exc})") from None
        if not isinstance(doc, dict):
            raise ValueError(f"{path} is not a tokenizer file (a JSON {type(doc).__name__})")
        if doc.get("format") == FORMAT_NAME:
            return cls._from_pyllm(doc, path)
        if isinstance(doc.get("model"), dict):
            return cls._from_hf(doc, path)
        raise ValueError(f"{path} is neither pyllm's tokenizer JSON nor a Hugging Face tokenizer.json")

    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> "Tokenizer":
        """The tokenizer stored in a GGUF file's metadata (tokens, merges, token types, pattern)."""
        return _tokenizer_from_gguf(cls, path)

    @classmethod
    def _from_pyllm(cls, doc: dict, path: Path) -> "Tokenizer":
        if doc.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path}: tokenizer format version {doc.get('version')!r} is not "
                             f"supported (this pyllm reads version {FORMAT_VERSION})")
        try:
            vocab = [_str_to_token(t, str(path)) for t in doc["vocab"]]
            merges = [(int(a), int(b)) for a, b in doc["merges"]]
            specials = {str(k): int(v) for k, v in doc.get("special_tokens", {}).items()}
            pattern = str(doc["pattern"])
            unk = doc.get("unk_token_id")
            unk = None if unk is None else int(unk)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: corrupt or truncated tokenizer file ({exc!r})") from None
        return cls(vocab, merges, pattern, specials, unk)

    # Hugging Face tokenizer.json ---------------------------------------------------------

    def _hf_document(self) -> dict:
        ordinary = {_token_to_str(t): i for i, t in enumerate(self.vocab) if i not in self._special_by_id}
        ordinary.update(self.special_tokens)
        return {
            "version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [{"id": sid, "content": name, "single_word": False, "lstrip": False,
                              "rstrip": False, "normalized": False, "special": True}
                             for name, sid in sorted(self.special_tokens.items(), key=lambda kv: kv[1])],
            "normalizer": None,
            "pre_tokenizer": _hf_pre_tokenizer(self.pattern),
            "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": self._unk_name(),
                      "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": False, "vocab": ordinary,
                      "merges": [[_token_to_str(self.vocab[a]), _token_to_str(self.vocab[b])]
                                 for a, b in self.merges]},
        }

    def _unk_name(self) -> str | None:
        if self.unk_token_id is None:
            return None
        return self._special_by_id.get(self.unk_token_id) or _token_to_str(self.vocab[self.unk_token_id])

    @classmethod
    def _from_hf(cls, doc: dict, path: Path) -> "Tokenizer":
        model = doc["model"]
        if model.get("type", "BPE") != "BPE":
            raise ValueError(f"{path}: only BPE tokenizers are supported, this one is {model.get('type')!r}")
        try:
            by_str: dict[str, int] = {str(k): int(v) for k, v in model["vocab"].items()}
            raw_merges = model.get("merges", [])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"{path}: corrupt tokenizer.json model ({exc!r})") from None
        added = {t["content"]: int(t["id"]) for t in doc.get("added_tokens") or []}
        size = max(list(by_str.values()) + [-1]) + 1
        vocab: list[bytes | None] = [None] * size
        specials: dict[str, int] = {}
        for text, tid in by_str.items():
            if text in added and added[text] == tid:
                continue
            vocab[tid] = _str_to_token(text, str(path))
        for name, tid in added.items():
            specials[name] = tid
        for name, tid in specials.items():  # placeholders, see __init__
            if tid < size and vocab[tid] is None:
                vocab[tid] = b""
        if any(t is None for t in vocab):
            missing = next(i for i, t in enumerate(vocab) if t is None)
            raise ValueError(f"{path}: token id {missing} is missing from the vocabulary")
        ids = {t: i for i, t in reversed(list(enumerate(vocab)))}
        merges = []
        for r, m in enumerate(raw_merges):
            left, right = m.split(" ", 1) if isinstance(m, str) else m
            try:
                merges.append((ids[_str_to_token(left, str(path))], ids[_str_to_token(right, str(path))]))
            except KeyError:
                raise ValueError(f"{path}: merge {r} ({left!r}, {right!r}) names a token not in the "
                                 f"vocabulary") from None
        unk_name = model.get("unk_token")
        unk = None
        if unk_name is not None:
            unk = added.get(unk_name, by_str.get(unk_name))
            if unk is None:
                raise ValueError(f"{path}: unk_token {unk_name!r} is not in the vocabulary")
        return cls(vocab, merges, _hf_pattern(doc.get("pre_tokenizer"), path), specials, unk)


def _hf_pre_tokenizer(pattern: str) -> dict:
    """The tokenizer.json pre_tokenizer that splits like `pattern`, then maps bytes to characters."""
    if pattern == "gpt2_digits":
        return {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": HF_PATTERNS.get(pattern, pattern)}, "behavior": "Isolated",
         "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}


def _hf_pattern(pre: dict | None, path: Path) -> str:
    """The split pattern of a tokenizer.json pre_tokenizer: a Split regex, or ByteLevel's GPT-2."""
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    types = [s.get("type") for s in steps]
    if (types == ["Digits", "ByteLevel"] and steps[0].get("individual_digits")
            and steps[1].get("use_regex", True)):
        return "gpt2_digits"
    for step in steps:
        if step.get("type") == "Split" and "Regex" in step.get("pattern", {}):
            regex_text = step["pattern"]["Regex"]
            for name in PATTERNS:
                if regex_text in (PATTERNS[name], HF_PATTERNS[name]):
                    return name
            return regex_text
        if step.get("type") == "ByteLevel" and step.get("use_regex", True):
            return "gpt2"
    raise ValueError(f"{path}: unsupported pre_tokenizer {pre!r} (need a Split regex or ByteLevel)")


def _tokenizer_from_gguf(cls, path: str | os.PathLike) -> "Tokenizer":
    from pyllm.io.gguf import GGUFFile

    with GGUFFile(path) as f:
        meta = f.metadata
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"{path}: tokenizer.ggml.model is {model!r}; pyllm reads byte-level BPE "
                         f"('gpt2') tokenizers")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in GGUF_PRE:
        raise ValueError(f"{path}: pre-tokenizer {pre!r} is not supported (supported: {sorted(GGUF_PRE)})")
    try:
        tokens: list[str] = meta["tokenizer.ggml.tokens"]
        merges_text: list[str] = meta.get("tokenizer.ggml.merges", [])
    except KeyError as exc:
        raise ValueError(f"{path}: missing tokenizer metadata {exc.args[0]!r}") from None
    types = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
    if len(types) != len(tokens):
        raise ValueError(f"{path}: {len(tokens)} tokens but {len(types)} token types")
    # Types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte. Control and
    # user-defined tokens are matched as whole strings: pyllm's special tokens.
    specials = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (3, 4)}
    vocab = [b"" if i in specials.values() else _str_to_token(t, str(path)) for i, t in enumerate(tokens)]
    ids = {t: i for i, t in reversed(list(enumerate(vocab))) if t}
    merges = []
    for r, m in enumerate(merges_text):
        try:
            left, right = m.split(" ", 1)
            merges.append((ids[_str_to_token(left, str(path))], ids[_str_to_token(right, str(path))]))
        except (ValueError, KeyError):
            raise ValueError(f"{path}: merge {r} ({m!r}) is malformed or names an unknown token") from None
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    return cls(vocab, merges, GGUF_PRE[pre], specials, unk if isinstance(unk, int) else None)


def _progress_reporter(progress, total: int):
    """A callback for the trainer: a tqdm bar, a user function(done, total), or nothing."""
    if callable(progress):
        return lambda done: progress(done, total)
    if not progress or total < 1000:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    bar = tqdm(total=total, desc="training BPE", unit="merge")

    def report(done: int) -> None:
        bar.update(done - bar.n)
        if done >= total:
            bar.close()
    return report
