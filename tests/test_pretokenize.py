"""The C++ pre-tokenizer against its spec, the `regex` package: the same pieces for every built-in
pattern on generated Unicode, targeted alphabets, every code point and several MB of real text.
Not BPE (test_tokenizer.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

from pyllm import pretokenize
from pyllm.data import read_default_corpus
from pyllm.pretokenize import BUILTIN, GPT2_PATTERN, GPT4_PATTERN, split, split_reference

MAX_CODE_POINT = 0x10FFFF
ALL_CHARS = [chr(c) for c in range(MAX_CODE_POINT + 1) if not 0xD800 <= c <= 0xDFFF]


def _C():
    from pyllm import _C as module
    return module


def reference(text: str, pattern: str) -> list[str]:
    """regex.findall for the single patterns; the Digits-then-GPT-2 composition for gpt2_digits."""
    if pattern == "gpt2_digits":
        return split_reference(text, pattern)
    return regex.findall(pretokenize.PATTERNS[pattern], text)


def ends_of(pieces: list[str]) -> list[int]:
    return np.cumsum([len(p.encode("utf-8")) for p in pieces], dtype=np.int64).tolist()


def assert_splits_like_regex(text: str, pattern: str) -> None:
    __tracebackhide__ = True
    expected = reference(text, pattern)
    got = split(text, pattern)
    if got != expected:
        first = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
        raise AssertionError(f"{pattern}: first difference at piece {first}: C++ {got[first:first + 4]!r}, "
                             f"regex {expected[first:first + 4]!r} (text {text[:200]!r})")
    assert _C().pretokenize_offsets(text.encode("utf-8"), pattern).tolist() == ends_of(expected)


# ----------------------------------------------------------------------------- the patterns

def test_gpt4_pattern_is_the_one_tiktoken_ships():
    openai_public = pytest.importorskip("tiktoken_ext.openai_public")
    import inspect
    source = inspect.getsource(openai_public.cl100k_base)
    assert f'r"""{GPT4_PATTERN}"""' in source


@pytest.mark.parametrize("text, pattern, pieces", [
    ("Hello world 12345", "gpt4", ["Hello", " world", " ", "123", "45"]),
    ("Hello world 12345", "gpt2", ["Hello", " world", " 12345"]),
    ("Hello world 12345", "gpt2_digits", ["Hello", " world", " ", "1", "2", "3", "4", "5"]),
    ("x  1", "gpt2_digits", ["x", "  ", "1"]),
    ("x  1", "gpt2", ["x", " ", " 1"]),
    ("a\n ", "gpt4", ["a", "\n "]),                 # \s++$ takes the final run whole
    ("a\n b", "gpt4", ["a", "\n", " b"]),
    ("don't 'S 'LL 'ſ", "gpt4", ["don", "'t", " '", "S", " '", "LL", " '", "ſ"]),
    ("'ſ", "gpt4", ["'ſ"]),                        # ſ folds to s under (?i)
    ("'K", "gpt4", ["'K"]),                        # the Kelvin sign folds to k: no contraction, a letter
    ("'S", "gpt2", ["'", "S"]),                    # GPT-2's contractions are case-sensitive
    (".hello..x", "gpt4", [".hello", "..", "x"]),
    ("a  b", "gpt2", ["a", " ", " b"]),
])
def test_known_splits(text, pattern, pieces):
    assert split(text, pattern) == pieces
    assert reference(text, pattern) == pieces


EDGE_CASES = ["", " ", "   ", "a ", "a  ", "a \n", " a", "\n", "\r\n", "\r\n\r\n", "a\r\n\r\nb", " \r\n ",
              "\n \n", "\t\t", "a\t\tb", "a \tb", "'", "''", "'''s", "'s'S'ſ'K'İ", "'LL'Ve're'rE", "'l", "'v",
              "12345", "1 2", "a1b22c333d4444", "١٢٣٤٥", "０１２", "²³", "Ⅻ", "½", "\x00", "a\x00b", " \x00",
              "\u00a0\u3000", "a\u00a0b", "x\u2028y", "🎉🎉", " 🎉", "e\u0301", " \u0301", "İstanbul",
              "\x0b\x0c\x85", "\x1c\x1d\x1e\x1f", "a" * 10_000, " " * 10_000, " " * 10_000 + "x",
              "\n" * 1000 + " ", "1" * 1000, "..." + "\r\n" * 10]


@pytest.mark.parametrize("pattern", BUILTIN)
def test_edge_cases(pattern):
    for text in EDGE_CASES:
        assert_splits_like_regex(text, pattern)


# ----------------------------------------------------------------------------- generated text

any_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=300)
TARGETED = (list(" \t\r\n\x0b\x0c\x85\u00a0\u2028\u3000\u2003") + ["'"] * 4
            + list("sSdDmMtTlLvVeErRkKſKİıaZé") + list("0159٣۴０²³½Ⅻ①")
            + list("漢字かな") + ["🎉", "👍", "\U0001F3FD", "\u0301", "\u20dd", "\x00"] + list(".,!-_$#\"`"))
targeted_text = st.text(st.sampled_from(TARGETED), max_size=200)


@pytest.mark.parametrize("pattern", BUILTIN)
@settings(max_examples=400)
@given(text=st.one_of(any_text, targeted_text))
def test_generated_text_splits_like_regex(pattern, text):
    assert_splits_like_regex(text, pattern)


@pytest.mark.parametrize("pattern", BUILTIN)
@settings(max_examples=200)
@given(data=st.binary(max_size=200) | st.lists(st.sampled_from(
    [b"\xff", b"\xc3", b"\xa9", b"\xe2\x82", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\x80", b"a", b" ",
     b"'", b"s", b"1", b"\n", "é".encode(), "🎉".encode()]), max_size=60).map(b"".join))
def test_bytes_that_are_not_utf8_are_one_byte_characters(pattern, data):
    # surrogateescape turns each byte that is not UTF-8 into a lone surrogate: one character that
    # is no letter, number or space, as the C++ side reads a stray byte.
    text = data.decode("utf-8", errors="surrogateescape")
    expected = [len(p.encode("utf-8", errors="surrogateescape")) for p in reference(text, pattern)]
    assert _C().pretokenize_offsets(data, pattern).tolist() == np.cumsum(expected, dtype=np.int64).tolist()


# ----------------------------------------------------------------------------- every code point

def test_every_code_point_is_classified_like_regex():
    all_code_points = "".join(map(chr, range(MAX_CODE_POINT + 1)))
    expected = np.zeros(MAX_CODE_POINT + 1, np.uint8)
    for value, class_regex in ((1, r"\p{L}+"), (2, r"\p{N}+"), (3, r"\s+")):
        for m in regex.finditer(class_regex, all_code_points):
            expected[m.start():m.end()] = value
    got = _C()._unicode_classes()
    bad = np.flatnonzero(got != expected)
    assert not len(bad), (f"{len(bad)} code points classified unlike regex, e.g. U+{bad[0]:04X}: "
                          f"C++ {got[bad[0]]}, regex {expected[bad[0]]} (0 other, 1 L, 2 N, 3 space)")


@pytest.mark.parametrize("pattern", BUILTIN)
@pytest.mark.parametrize("joiner", ["", " ", "'"])
def test_every_code_point_in_context(pattern, joiner):
    # Every character after a space (` ?\p{L}+` and friends) and after an apostrophe (contractions).
    assert_splits_like_regex(joiner + joiner.join(ALL_CHARS), pattern)


@pytest.mark.parametrize("template", ["'{}", "'{}e", "'{}l", "'l{}", "'v{}"])
def test_every_code_point_in_a_contraction(template):
    assert_splits_like_regex("\n".join(template.format(c) for c in ALL_CHARS), "gpt4")


# ----------------------------------------------------------------------------- real text

@pytest.mark.parametrize("pattern", BUILTIN)
def test_megabytes_of_real_text(pattern):
    assert_splits_like_regex(read_default_corpus(3_000_000), pattern)


# ----------------------------------------------------------------------------- the API

def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="unknown pre-tokenizer pattern 'gpt5'"):
        _C().pretokenize("x", "gpt5")
    with pytest.raises(ValueError, match="unknown pre-tokenizer pattern"):
        _C().pretokenize_offsets(b"x", "GPT4")
    with pytest.raises(TypeError, match="str"):
        split(b"bytes")
    with pytest.raises(UnicodeEncodeError):
        split("a\ud800b")


def test_a_custom_pattern_runs_in_regex():
    assert split("ab12 cd", r"\p{L}+|\p{N}|\s") == ["ab", "1", "2", " ", "cd"]
    assert split("a b", GPT2_PATTERN) == split("a b", "gpt2")


def test_offsets_are_int64_and_cover_the_text():
    data = "héllo wörld\n".encode()
    ends = _C().pretokenize_offsets(data, "gpt4")
    assert ends.dtype == np.int64 and ends[-1] == len(data) and np.all(np.diff(ends) > 0)
    assert _C().pretokenize_offsets(b"", "gpt4").tolist() == []


def test_doctests():
    from conftest import run_doctests
    attempted, failures = run_doctests(pretokenize)
    assert attempted >= 3 and not failures, "\n".join(failures)
