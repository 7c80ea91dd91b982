"""The C++ pre-tokenizer against the `regex` package on one thread, on ~10 MB of standard-library
sources, for every built-in pattern: split() into a list of str (both sides build the strings),
and the piece end offsets the tokenizer uses (before the C++ side: regex.findall, then lengths).

Not a correctness suite (tests/test_pretokenize.py): each benchmark only checks that both sides
give the same answer.
"""

from __future__ import annotations

import numpy as np
import pytest

from pyllm.data import read_default_corpus
from pyllm.pretokenize import BUILTIN, split, split_reference
from pyllm.tokenizer import piece_ends

SPLIT_BYTES = 10_000_000
TARGET = 10.0   # speedup over regex


@pytest.fixture(scope="module")
def corpus() -> str:
    return read_default_corpus(SPLIT_BYTES)


def regex_piece_ends(data: bytes, text: str, pattern: str) -> np.ndarray:
    """piece_ends as it was before the C++ pre-tokenizer."""
    pieces = split_reference(text, pattern)
    return np.fromiter((len(p.encode("utf-8")) for p in pieces), np.int64, len(pieces)).cumsum().astype(np.uint32)


@pytest.mark.parametrize("impl", ["pyllm", "regex"])
@pytest.mark.parametrize("pattern", BUILTIN)
def test_split_one_thread(benchmark, corpus, pattern, impl):
    size = len(corpus.encode())
    benchmark.group = f"pretokenize {pattern} into str, {size / 1e6:.1f} MB vs regex"
    benchmark.extra_info.update(impl=impl, bytes=size, target=TARGET)
    run, other = (split, split_reference) if impl == "pyllm" else (split_reference, split)
    pieces = benchmark.pedantic(run, args=(corpus, pattern), rounds=3, iterations=1, warmup_rounds=1)
    assert pieces == other(corpus, pattern), "pyllm and regex disagree: this would time a wrong answer"


@pytest.mark.parametrize("impl", ["pyllm", "regex"])
@pytest.mark.parametrize("pattern", BUILTIN)
def test_piece_ends_one_thread(benchmark, corpus, pattern, impl):
    data = corpus.encode()
    benchmark.group = f"pretokenize {pattern} piece ends, {len(data) / 1e6:.1f} MB vs regex"
    benchmark.extra_info.update(impl=impl, bytes=len(data), target=TARGET)
    run, other = (piece_ends, regex_piece_ends) if impl == "pyllm" else (regex_piece_ends, piece_ends)
    ends = benchmark.pedantic(run, args=(data, corpus, pattern), rounds=3, iterations=1, warmup_rounds=1)
    assert np.array_equal(ends, other(data, corpus, pattern)), "pyllm and regex disagree"
