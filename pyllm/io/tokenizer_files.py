"""Tokenizer files: pyllm's own JSON, Hugging Face's tokenizer.json and tokenizer_config.json,
and the vocabulary and chat metadata a GGUF file carries. Readers return data (TokenizerData,
ChatFormat); writers take it. Not the tokenizer (pyllm.tokenizer builds and runs one).

Byte-level BPE only: vocabularies spell a token's bytes with GPT-2's printable stand-in
characters (bytes_to_unicode), merges as pairs of such strings.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from pyllm.io.atomic import read_json_object, write_text
from pyllm.io.gguf import GGUFFile
from pyllm.pretokenize import PATTERNS, GPT4_PATTERN

# Oniguruma, the regex engine of Hugging Face `tokenizers`, reads `{1,3}+` as `({1,3})+` (any
# number of digits), not as a possessive `{1,3}`. Without that `+` the GPT-4 pattern means the
# same to `regex` and tiktoken, so tokenizer.json files carry this spelling.
HF_PATTERNS = {**PATTERNS, "gpt4": GPT4_PATTERN.replace(r"\p{N}{1,3}+", r"\p{N}{1,3}")}
# GGUF's tokenizer.ggml.pre -> pattern name (llama-bpe: Llama 3's, the GPT-4 split), and back
GGUF_PRE = {"default": "gpt2", "gpt-2": "gpt2", "gpt2": "gpt2", "smollm": "gpt2_digits", "llama-bpe": "gpt4"}
GGUF_PRE_OF = {"gpt2": "gpt-2", "gpt2_digits": "smollm", "gpt4": "llama-bpe"}

FORMAT_NAME = "pyllm.tokenizer"
FORMAT_VERSION = 1


@dataclass
class TokenizerData:
    """What a tokenizer file says: pyllm.Tokenizer(**vars(data)) builds the tokenizer."""

    vocab: list                                   # bytes of each id (b"" for an id that is only special)
    merges: list                                  # (left id, right id) of each merge, by rank
    pattern: str = "gpt4"                         # a built-in split pattern's name, or a regex
    special_tokens: dict = field(default_factory=dict)   # text -> id
    unk_token_id: Optional[int] = None
    # SentencePiece-style vocabularies (pattern "spm"): each id's score (None: no piece to merge
    # into), the <0xNN> token of each byte (-1: none), and whether text starts with a space.
    scores: Optional[list] = None
    byte_ids: Optional[list] = None
    add_space_prefix: bool = True


@dataclass
class ChatFormat:
    """How a model's conversations are written: its chat template and the tokens that end a turn
    and begin a text (as the files name them)."""

    template: Optional[str] = None
    eos_token: Optional[str] = None
    bos_token: str = ""          # what the template writes for {{ bos_token }}, when the files ask for it
    eos_id: Optional[int] = None   # GGUF names the end-of-turn token by id (any token, special or not)


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


# ----------------------------------------------------------------------------- reading

def read_tokenizer(path: Union[str, os.PathLike]) -> TokenizerData:
    """pyllm's JSON or a Hugging Face tokenizer.json (byte-level BPE)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not a tokenizer file (not valid JSON: {exc})") from None
    return tokenizer_from_document(doc, path)


def tokenizer_from_document(doc, path) -> TokenizerData:
    """What a tokenizer file's parsed JSON says (read_tokenizer's second half: also what travels
    between the processes of a distributed run); errors name `path`."""
    path = Path(path)
    if not isinstance(doc, dict):
        raise ValueError(f"{path} is not a tokenizer file (a JSON {type(doc).__name__})")
    try:
        if doc.get("format") == FORMAT_NAME:
            return _from_pyllm(doc, path)
        if isinstance(doc.get("model"), dict):
            return _from_hf(doc, path)
    except (KeyError, TypeError, AttributeError, IndexError) as exc:   # a value of the wrong JSON type
        raise ValueError(f"{path}: a corrupt tokenizer file (a value of the wrong type or shape: {exc!r})") from None
    raise ValueError(f"{path} is neither pyllm's tokenizer JSON nor a Hugging Face tokenizer.json")


def _from_pyllm(doc: dict, path: Path) -> TokenizerData:
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
    return TokenizerData(vocab, merges, pattern, specials, unk)


SPACE = "\u2581"   # SentencePiece's visible space
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _from_hf(doc: dict, path: Path) -> TokenizerData:
    model = doc["model"]
    if model.get("type", "BPE") != "BPE":
        raise ValueError(f"{path}: only BPE tokenizers are supported, this one is {model.get('type')!r}")
    by_str, raw_merges, added = _hf_vocabulary(doc, model, path)
    if model.get("byte_fallback"):
        return _spm_from_hf(doc, model, by_str, raw_merges, added, path)
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
    return TokenizerData(vocab, merges, _hf_pattern(doc.get("pre_tokenizer"), path), specials, unk)


def _hf_vocabulary(doc: dict, model: dict, path: Path) -> tuple:
    """(token text -> id, the merges as written, added token text -> id) of a tokenizer.json."""
    try:
        by_str: dict[str, int] = {str(k): int(v) for k, v in model["vocab"].items()}
        raw_merges = model.get("merges", [])
        added = {t["content"]: int(t["id"]) for t in doc.get("added_tokens") or []}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"{path}: corrupt tokenizer.json model ({exc!r})") from None
    if len(set(by_str.values())) != len(by_str):
        seen: dict = {}
        for text, tid in by_str.items():
            if tid in seen:
                raise ValueError(f"{path}: tokens {seen[tid]!r} and {text!r} share the id {tid}")
            seen[tid] = text
    limit = len(by_str) + len(added)   # ids are dense: none past the tokens there are
    for text, tid in list(by_str.items()) + list(added.items()):
        if not 0 <= tid < limit:
            raise ValueError(f"{path}: token {text!r} has id {tid}, outside [0, {limit}) for {limit} tokens")
    if not isinstance(raw_merges, list):
        raise ValueError(f"{path}: model.merges must be a list")
    return by_str, raw_merges, added


def _spm_from_hf(doc: dict, model: dict, by_str: dict, raw_merges: list, added: dict, path: Path) -> TokenizerData:
    """A tokenizer.json of SentencePiece's kind (Llama 2, Mistral: BPE over U+2581-spaced text with
    <0xNN> byte fallback): merged by score, the score of each token the rank of the merge that
    makes it."""
    size = max(list(by_str.values()) + list(added.values()) + [-1]) + 1
    texts: list = [None] * size
    for text, tid in by_str.items():
        texts[tid] = text
    scores: list = [None] * size
    for text, tid in by_str.items():
        if len(text) == 1:
            scores[tid] = 0.0
    for r, m in enumerate(raw_merges):
        left, right = m.split(" ", 1) if isinstance(m, str) else m
        tid = by_str.get(left + right)
        if tid is None:
            raise ValueError(f"{path}: merge {r} ({left!r}, {right!r}) makes a token not in the vocabulary")
        if scores[tid] is None or len(left + right) == 1:
            scores[tid] = float(-r - 1)
    pre = json.dumps([doc.get("normalizer"), doc.get("pre_tokenizer")])
    prefix = '"Prepend"' in pre or '"prepend_scheme": "first"' in pre or '"prepend_scheme": "always"' in pre \
        or '"add_prefix_space": true' in pre
    unk_name = model.get("unk_token")
    unk = by_str.get(unk_name, added.get(unk_name)) if unk_name is not None else None
    specials = dict(added)
    if unk is not None and unk_name not in specials:
        specials[unk_name] = unk
    return _spm_data(texts, scores, specials, unk, prefix, path)


def _spm_data(texts: list, scores: list, specials: dict, unk: Optional[int], prefix: bool, where) -> TokenizerData:
    """TokenizerData of a SentencePiece vocabulary: texts[id] the piece (U+2581 for spaces,
    <0xNN> for byte tokens, None for an id with none), scores[id] (None: never merged into)."""
    byte_ids = [-1] * 256
    vocab, piece_scores = [], []
    special_ids = set(specials.values())
    for tid, text in enumerate(texts):
        byte = _BYTE_PIECE.fullmatch(text) if isinstance(text, str) else None
        if tid in special_ids or text is None:
            vocab.append(b"")
            piece_scores.append(None)
        elif byte:
            value = int(byte.group(1), 16)
            if byte_ids[value] < 0:
                byte_ids[value] = tid
            vocab.append(bytes([value]))
            piece_scores.append(None)
        else:
            vocab.append(text.replace(SPACE, " ").encode("utf-8"))
            piece_scores.append(scores[tid])
    if unk is not None and not 0 <= unk < len(texts):
        raise ValueError(f"{where}: the unknown token {unk} is outside the vocabulary")
    return TokenizerData(vocab, [], "spm", dict(specials), unk, piece_scores, byte_ids, bool(prefix))


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


def gguf_tokenizer(f: GGUFFile) -> TokenizerData:
    """The vocabulary stored in a GGUF file's metadata (tokens, merges, token types, pattern)."""
    meta, path = f.metadata, f.path
    model = meta.get("tokenizer.ggml.model")
    if model == "llama":
        return _spm_from_gguf(meta, path)
    if model != "gpt2":
        raise ValueError(f"{path}: tokenizer.ggml.model is {model!r}; pyllm reads byte-level BPE "
                         f"('gpt2') and SentencePiece ('llama') tokenizers")
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
    return TokenizerData(vocab, merges, GGUF_PRE[pre], specials, unk if isinstance(unk, int) else None)


def _spm_from_gguf(meta: dict, path) -> TokenizerData:
    """A GGUF's SentencePiece vocabulary: pieces, their scores and types (1 normal, 2 unknown,
    3 control, 4 user-defined, 5 unused, 6 byte)."""
    tokens = meta.get("tokenizer.ggml.tokens")
    scores = meta.get("tokenizer.ggml.scores")
    types = meta.get("tokenizer.ggml.token_type", [1] * len(tokens or []))
    if not isinstance(tokens, list) or not isinstance(scores, list) or len(scores) != len(tokens) \
            or len(types) != len(tokens):
        raise ValueError(f"{path}: a SentencePiece vocabulary needs tokens, scores and token types of one length")
    specials = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (2, 3, 4)}
    texts = [None if ty == 5 else t for t, ty in zip(tokens, types)]
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    if not isinstance(unk, int):
        unk = next((i for i, ty in enumerate(types) if ty == 2), None)
    prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    return _spm_data(texts, [float(x) for x in scores], specials, unk, bool(prefix), path)


# ----------------------------------------------------------------------------- writing

@dataclass
class GgufVocabulary:
    """A vocabulary as GGUF's tokenizer.ggml.* keys spell it."""

    model: str                 # "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    tokens: list
    types: list                # 1 normal, 2 unknown, 3 control, 5 unused, 6 byte
    pre: Optional[str] = None  # gpt2: llama.cpp's pre-tokenizer name
    merges: Optional[list] = None
    scores: Optional[list] = None
    add_space_prefix: Optional[bool] = None


def gguf_vocabulary(data: TokenizerData, size: int = 0) -> GgufVocabulary:
    """The GGUF spelling of a vocabulary, ids up to `size` (a model's vocabulary may be wider than
    its tokenizer's) padded with unused tokens. Byte-level BPE: tokens in GPT-2's printable
    characters, special tokens by name as control tokens, merges as "left right". SentencePiece:
    pieces with U+2581 for spaces, <0xNN> byte tokens, scores."""
    special = {sid: name for name, sid in data.special_tokens.items()}
    size = max([len(data.vocab), size] + [sid + 1 for sid in special])
    if data.pattern == "spm":
        byte_of = {tid: b for b, tid in enumerate(data.byte_ids or []) if tid >= 0}
        tokens, types, scores = [], [], []
        for i in range(size):
            score = data.scores[i] if i < len(data.scores or []) else None
            if i in special:
                tokens.append(special[i])
                types.append(2 if i == data.unk_token_id else 3)
            elif i in byte_of:
                tokens.append(f"<0x{byte_of[i]:02X}>")
                types.append(6)
            elif i < len(data.vocab) and data.vocab[i] and score is not None:
                tokens.append(data.vocab[i].decode("utf-8").replace(" ", SPACE))
                types.append(1)
            else:
                tokens.append(f"[PAD{i}]")
                types.append(5)
            scores.append(0.0 if score is None else float(score))
        return GgufVocabulary("llama", tokens, types, scores=scores, add_space_prefix=data.add_space_prefix)
    if data.pattern not in GGUF_PRE_OF:
        raise ValueError(f"the split pattern {data.pattern!r} has no llama.cpp pre-tokenizer "
                         f"(GGUF files take {sorted(GGUF_PRE_OF)})")
    chars = bytes_to_unicode()
    tokens, types = [], []
    for i in range(size):
        if i in special:
            tokens.append(special[i])
            types.append(3)
        elif i < len(data.vocab) and data.vocab[i]:
            tokens.append("".join(chars[b] for b in data.vocab[i]))
            types.append(1)
        else:   # an id no text reaches (padding): unused
            tokens.append(f"[PAD{i}]")
            types.append(5)
    spell = lambda t: "".join(chars[b] for b in data.vocab[t])   # noqa: E731
    return GgufVocabulary("gpt2", tokens, types, GGUF_PRE_OF[data.pattern],
                          [f"{spell(a)} {spell(b)}" for a, b in data.merges])


def write_tokenizer(path: Union[str, os.PathLike], data: TokenizerData, format: str = "pyllm") -> None:
    """pyllm's JSON, or with format="hf" a tokenizer.json the `tokenizers` package reads; atomic."""
    write_text(Path(path), json.dumps(tokenizer_document(data, format), ensure_ascii=False))


def tokenizer_document(data: TokenizerData, format: str = "pyllm") -> dict:
    """The JSON document of a tokenizer file: pyllm's (SentencePiece vocabularies: always "hf"), or
    with format="hf" a tokenizer.json; tokenizer_from_document reads either back."""
    if format == "pyllm" and data.pattern != "spm":
        return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "pattern": data.pattern,
                "vocab": [_token_to_str(t) for t in data.vocab], "merges": [list(m) for m in data.merges],
                "special_tokens": data.special_tokens, "unk_token_id": data.unk_token_id}
    if format in ("pyllm", "hf"):
        return _hf_spm_document(data) if data.pattern == "spm" else _hf_document(data)
    raise ValueError(f"format must be 'pyllm' or 'hf', got {format!r}")


def _hf_spm_document(data: TokenizerData) -> dict:
    """A SentencePiece vocabulary as a tokenizer.json of Llama 2's kind: BPE with byte fallback over
    U+2581-spaced text, a merge for every split of a piece into two pieces, ranked by the piece's
    score (highest first), which merges as the scores do."""
    special = {sid: name for name, sid in data.special_tokens.items()}
    byte_of = {tid: b for b, tid in enumerate(data.byte_ids or []) if tid >= 0}
    texts, merge_pieces = [], []
    for i, t in enumerate(data.vocab):
        if i in special:
            texts.append(special[i])
        elif i in byte_of:
            texts.append(f"<0x{byte_of[i]:02X}>")
        elif t and data.scores[i] is not None:
            texts.append(t.decode("utf-8").replace(" ", SPACE))
            merge_pieces.append(i)
        else:
            texts.append(f"[PAD{i}]")
    ids = {text: i for i, text in reversed(list(enumerate(texts))) if i in set(merge_pieces)}
    merges = []
    for i in sorted((i for i in merge_pieces if len(texts[i]) > 1), key=lambda i: (-data.scores[i], i)):
        text = texts[i]
        merges += [[text[:k], text[k:]] for k in range(1, len(text)) if text[:k] in ids and text[k:] in ids]
    normalizers = ([{"type": "Prepend", "prepend": SPACE}] if data.add_space_prefix else []) + \
        [{"type": "Replace", "pattern": {"String": " "}, "content": SPACE}]
    decoders = [{"type": "Replace", "pattern": {"String": SPACE}, "content": " "}, {"type": "ByteFallback"},
                {"type": "Fuse"}] + ([{"type": "Strip", "content": " ", "start": 1, "stop": 0}]
                                     if data.add_space_prefix else [])
    unk = special.get(data.unk_token_id) if data.unk_token_id is not None else None
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": sid, "content": name, "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True}
                         for name, sid in sorted(data.special_tokens.items(), key=lambda kv: kv[1])],
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": None, "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "BPE", "dropout": None, "unk_token": unk, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": {text: i for i, text in enumerate(texts)}, "merges": merges},
    }


def _hf_document(data: TokenizerData) -> dict:
    special_by_id = {sid: name for name, sid in data.special_tokens.items()}
    ordinary = {_token_to_str(t): i for i, t in enumerate(data.vocab) if i not in special_by_id}
    ordinary.update(data.special_tokens)
    unk = None
    if data.unk_token_id is not None:
        unk = special_by_id.get(data.unk_token_id) or _token_to_str(data.vocab[data.unk_token_id])
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": sid, "content": name, "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True}
                         for name, sid in sorted(data.special_tokens.items(), key=lambda kv: kv[1])],
        "normalizer": None,
        "pre_tokenizer": _hf_pre_tokenizer(data.pattern),
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": unk, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": False, "vocab": ordinary,
                  "merges": [[_token_to_str(data.vocab[a]), _token_to_str(data.vocab[b])] for a, b in data.merges]},
    }


# ----------------------------------------------------------------------------- chat formats

# The special tokens that end a text or a turn, in the order a model's end token is looked for.
END_OF_TEXT_NAMES = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "</s>", "<|end|>", "<end_of_turn>")


def end_of_text(special_tokens: dict) -> Optional[str]:
    """The first special token (text -> id) that ends a text, or None."""
    return next((n for n in END_OF_TEXT_NAMES if n in special_tokens), None)


TOKENIZER_CONFIG = "tokenizer_config.json"


def read_hf_chat(folder: Union[str, os.PathLike]) -> ChatFormat:
    """The chat template and end/begin tokens of a folder's tokenizer_config.json (none: empty)."""
    path = Path(folder) / TOKENIZER_CONFIG
    if not path.is_file():
        return ChatFormat()
    doc = read_json_object(path)

    def token(key: str) -> Optional[str]:
        value = doc.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        return value if isinstance(value, str) else None

    template = doc.get("chat_template")
    return ChatFormat(template if isinstance(template, str) else None, token("eos_token"), token("bos_token") or "")


def write_hf_chat(folder: Union[str, os.PathLike], chat: ChatFormat) -> None:
    """tokenizer_config.json with the chat template and the end/begin tokens."""
    # The class makes AutoTokenizer read tokenizer.json as it is (the model_type's own class could
    # add a begin token pyllm does not).
    doc = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": chat.template, "eos_token": chat.eos_token,
           "bos_token": chat.bos_token or None}
    write_text(Path(folder) / TOKENIZER_CONFIG, json.dumps(doc, indent=2) + "\n")


def gguf_chat(f: GGUFFile, data: TokenizerData) -> ChatFormat:
    """A GGUF file's chat template, end-of-turn token, and the begin token when add_bos_token asks."""
    template = f.metadata.get("tokenizer.chat_template")
    names = {sid: name for name, sid in data.special_tokens.items()}
    eos = f.metadata.get("tokenizer.ggml.eos_token_id")
    if eos is not None and (not isinstance(eos, int) or isinstance(eos, bool) or not 0 <= eos < len(data.vocab)):
        raise ValueError(f"{f.path}: tokenizer.ggml.eos_token_id {eos!r} is not a token of the vocabulary "
                         f"(0 .. {len(data.vocab) - 1})")
    # llama.cpp adds the begin token when the file says so, and by default for SentencePiece vocabularies.
    add_bos = f.metadata.get("tokenizer.ggml.add_bos_token", f.metadata.get("tokenizer.ggml.model") == "llama")
    bos = f.metadata.get("tokenizer.ggml.bos_token_id") if add_bos else None
    return ChatFormat(template if isinstance(template, str) else None, names.get(eos),
                      names.get(bos, "") if isinstance(bos, int) else "", eos)
