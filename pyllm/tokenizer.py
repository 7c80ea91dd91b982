"""pyllm.Tokenizer: byte-level BPE, trained and applied in C++, with tiktoken's special-token rules.

Not a general tokenizers library: byte-level BPE only (what GPT-2, GPT-4, Llama 3 and SmolLM2
use). Files (pyllm.io.tokenizer_files): pyllm's own versioned JSON, Hugging Face's tokenizer.json,
the vocabulary of a GGUF file; tiktoken's ranks (mergeable_ranks).

Shape of the model: `vocab[id]` is the bytes of token id; `merges[r] = (left, right)` is the
merge of rank r; special tokens are strings with ids of their own, never produced by BPE.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Collection, Iterable, Literal, Sequence, Union

import numpy as np


from pyllm import kernels
from pyllm.io.gguf import GGUFFile
from pyllm.io.tokenizer_files import TokenizerData, gguf_tokenizer, read_tokenizer, write_tokenizer
from pyllm.models import ModelConfig
from pyllm.pretokenize import BUILTIN, check_pattern, split_reference

_SPACE = "\u2581".encode()   # SentencePiece's visible space
MAX_VOCAB = ModelConfig.LIMITS["vocab_size"]   # the largest vocabulary a model takes

# Names that lived here before the file formats moved to pyllm.io (re-exported, not redefined).
from pyllm.io.tokenizer_files import FORMAT_NAME, FORMAT_VERSION, GGUF_PRE, HF_PATTERNS, bytes_to_unicode  # noqa: F401,E402
from pyllm.pretokenize import GPT2_PATTERN, GPT4_PATTERN, PATTERNS, PIPELINES  # noqa: F401,E402
from pyllm.progress import bar as progress_bar

TextSource = Union[str, os.PathLike, Iterable[Union[str, os.PathLike]]]


# ----------------------------------------------------------------------------- text -> bytes

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
        return kernels.pretokenize_offsets(data, pattern).astype(np.uint32)
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
    """A byte-level BPE tokenizer (or, pattern "spm", a SentencePiece vocabulary read from a GGUF
    file or tokenizer.json, merged by score as llama.cpp does): any str encodes, and
    decode(encode(s)) == s.

    >>> tok = Tokenizer.train("hello hello hello world", vocab_size=260)
    >>> tok.decode(tok.encode("hello world"))
    'hello world'
    """

    def __init__(self, vocab: Sequence[bytes], merges: Sequence[tuple[int, int]], pattern: str = "gpt4",
                 special_tokens: dict[str, int] | None = None, unk_token_id: int | None = None,
                 scores: Sequence[float | None] | None = None, byte_ids: Sequence[int] | None = None,
                 add_space_prefix: bool = True):
        if isinstance(vocab, (str, bytes)) or not isinstance(vocab, Sequence) or \
                not all(isinstance(t, (bytes, bytearray)) for t in vocab):
            raise TypeError("vocab must be a sequence of bytes, one per token id")
        self.vocab: list[bytes] = [bytes(t) for t in vocab]
        try:
            merges_arr = np.asarray(merges, dtype=np.int64).reshape(-1, 2)
        except (OverflowError, TypeError, ValueError):
            raise ValueError("merges must be pairs of token ids (integers in the vocabulary)") from None
        if merges_arr.size and (merges_arr.min() < 0 or merges_arr.max() >= len(self.vocab)):
            raise ValueError(f"merges name token ids outside the vocabulary of {len(self.vocab)}")
        self.merges: list[tuple[int, int]] = [(int(a), int(b)) for a, b in merges_arr]
        check_pattern(pattern)
        self.pattern = pattern
        self.special_tokens: dict[str, int] = dict(special_tokens or {})
        limit = len(self.vocab) + len(self.special_tokens)   # ids past the vocabulary: one each at most
        if len(set(self.special_tokens.values())) != len(self.special_tokens):
            raise ValueError(f"two special tokens share an id: {self.special_tokens}")
        for name, sid in self.special_tokens.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"a special token needs a non-empty name, got {name!r}")
            if isinstance(sid, bool) or not isinstance(sid, int) or not 0 <= sid < limit:
                raise ValueError(f"special token {name!r} needs an integer id in [0, {limit}), got {sid!r}")
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
        self._model = kernels.BpeModel(self.vocab, merges_arr.astype(np.uint32),
                                    -1 if unk_token_id is None else int(unk_token_id))
        # A SentencePiece vocabulary (pattern "spm"): merged by score over U+2581-spaced text,
        # bytes with no piece as their <0xNN> tokens; vocab[id] is what an id decodes to.
        self.scores, self.byte_ids, self.add_space_prefix = None, None, bool(add_space_prefix)
        self._spm = None
        if pattern == "spm":
            if scores is None or len(scores) != len(self.vocab) or byte_ids is None or len(byte_ids) != 256:
                raise ValueError("a SentencePiece vocabulary needs a score per token and 256 byte token ids")
            self.scores, self.byte_ids = list(scores), [int(b) for b in byte_ids]
            pieces = [b"" if sc is None or not t else t.replace(b" ", _SPACE)
                      for t, sc in zip(self.vocab, self.scores)]
            self._spm = kernels.SpmModel(pieces, [0.0 if sc is None else float(sc) for sc in self.scores],
                                         self.byte_ids, -1 if unk_token_id is None else int(unk_token_id))
        elif scores is not None:
            raise ValueError('scores belong to SentencePiece vocabularies (pattern "spm")')
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
        if isinstance(special_tokens, str):
            raise TypeError("special_tokens must be a list of names, not one str")
        special_tokens = list(special_tokens)
        if not all(isinstance(t, str) and t for t in special_tokens) or len(set(special_tokens)) != len(special_tokens):
            raise ValueError(f"special tokens must be distinct non-empty strings, got {special_tokens!r}")
        check_pattern(pattern)
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) or \
                vocab_size < 256 + len(special_tokens):
            raise ValueError(f"vocab_size must be an integer of at least 256 (the bytes) + {len(special_tokens)} "
                             f"(special tokens), got {vocab_size!r}")
        if vocab_size > MAX_VOCAB:
            raise ValueError(f"vocab_size {vocab_size} is more than pyllm supports ({MAX_VOCAB})")
        counter = kernels.PieceCounter()
        for text in _read_sources(text_or_iterable):
            data = _utf8(text)
            counter.add(data, piece_ends(data, text, pattern))
        pieces, counts = counter.items()
        num_merges = int(vocab_size) - 256 - len(special_tokens)
        report = _progress_reporter(progress, num_merges)
        merges = kernels.train_bpe(pieces, counts, num_merges, int(min_frequency),
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
        if self._spm is not None:   # as llama.cpp: a space before each run of text, spaces as U+2581
            if not text:
                return []
            spaced = _utf8((" " if self.add_space_prefix else "") + text).replace(b" ", _SPACE)
            return self._spm.encode(spaced).tolist()
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
        for name, value in (("allowed_special", allowed_special), ("disallowed_special", disallowed_special)):
            if value != "all" and (isinstance(value, str) or not isinstance(value, Collection)):
                raise TypeError(f'{name} must be "all" or a collection of special token names, got {value!r}')
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

    def special_spans(self, text: str) -> list[tuple[int, int, str]]:
        """(start, end, token) of each special token spelled in text, left to right, as encode
        would take them."""
        if self._special_split is None:
            return []
        return [(m.start(), m.end(), m.group()) for m in self._special_split.finditer(text)]

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
        ids = self._check_ids(ids)
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

    def _check_ids(self, ids) -> list[int]:
        """ids as a list of ints, each a token of this tokenizer (a clear error otherwise)."""
        if isinstance(ids, (str, bytes)) or not isinstance(ids, (Iterable, np.ndarray)):
            raise TypeError(f"ids must be a sequence of token ids, got {type(ids).__name__}")
        ids = np.asarray(ids).tolist() if isinstance(ids, np.ndarray) else list(ids)
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
                raise TypeError(f"token ids must be integers, got {i!r}")
            if not 0 <= i < len(self.vocab) and i not in self._special_by_id:
                raise ValueError(f"token id {i} is outside the vocabulary (0 .. {self.vocab_size - 1})")
        return ids

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
        become U+FFFD unless errors="strict". A SentencePiece vocabulary's added first space is
        dropped, as its encoding added it."""
        ids = self._check_ids(ids)
        text = self.decode_bytes(ids).decode("utf-8", errors=errors)
        if self._spm is not None and self.add_space_prefix and ids and ids[0] not in self._special_by_id \
                and text.startswith(" "):
            text = text[1:]
        return text

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

    @property
    def pattern_regex(self) -> str:
        """The split pattern as a regex (what tiktoken.Encoding takes as pat_str; `pattern` may be a
        built-in's name). SmolLM2's "gpt2_digits" is two steps, not one regex, and "spm" none."""
        if self.pattern in PATTERNS:
            return PATTERNS[self.pattern]
        if self.pattern in PIPELINES or self.pattern == "spm":
            raise ValueError(f"the {self.pattern!r} split is not one regex: tiktoken cannot reproduce it")
        return self.pattern

    def to_tiktoken(self, name: str = "pyllm"):
        """This tokenizer as a tiktoken.Encoding (the same ids for every text; tiktoken is optional and
        imported here only)."""
        try:
            import tiktoken
        except ImportError:
            raise ImportError("to_tiktoken needs the tiktoken package: pip install tiktoken") from None
        return tiktoken.Encoding(name, pat_str=self.pattern_regex, mergeable_ranks=self.mergeable_ranks(),
                                 special_tokens=dict(self.special_tokens))

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        kind = "SentencePiece" if self._spm is not None else "byte-level BPE"
        return (f"Tokenizer({kind}, {self.vocab_size} tokens, {len(self.merges)} merges, pattern "
                f"{self.pattern if self.pattern in PATTERNS or self.pattern in PIPELINES else 'custom'!r}, "
                f"{len(self.special_tokens)} special)")

    # --------------------------------------------------------------------- files

    @property
    def is_sentencepiece(self) -> bool:
        return self._spm is not None

    def data(self) -> TokenizerData:
        """What the tokenizer files hold (Tokenizer(**vars(data)) builds it again)."""
        return TokenizerData(list(self.vocab), list(self.merges), self.pattern, dict(self.special_tokens),
                             self.unk_token_id, self.scores, self.byte_ids, self.add_space_prefix)

    def save(self, path: str | os.PathLike, format: Literal["pyllm", "hf"] = "pyllm") -> None:
        """Writes pyllm's JSON, or with format="hf" a tokenizer.json the `tokenizers` package reads.

        The write is atomic: a temporary file is written, synced and renamed over path.
        """
        if self._spm is not None and format != "hf":
            raise ValueError('a SentencePiece vocabulary is written as a tokenizer.json: save(path, format="hf")')
        write_tokenizer(path, self.data(), format)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """Reads pyllm's JSON or a Hugging Face tokenizer.json (byte-level BPE)."""
        return cls(**vars(read_tokenizer(path)))

    @classmethod
    def from_gguf(cls, source: Union[str, os.PathLike, GGUFFile]) -> "Tokenizer":
        """The tokenizer stored in a GGUF file's metadata (tokens, merges, token types, pattern)."""
        if isinstance(source, GGUFFile):
            return cls(**vars(gguf_tokenizer(source)))
        with GGUFFile(source) as f:
            return cls(**vars(gguf_tokenizer(f)))


def _progress_reporter(progress, total: int):
    """A callback for the trainer: a tqdm bar, a user function(done, total), or nothing."""
    if callable(progress):
        return lambda done: progress(done, total)
    if not progress or total < 1000:
        return None
    bar = progress_bar(total=total, desc="training BPE", unit="merge")

    def report(done: int) -> None:
        bar.update(done - bar.n)
        if done >= total:
            bar.close()
    return report
