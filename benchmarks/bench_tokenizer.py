"""pyllm's tokenizer against tiktoken and Hugging Face `tokenizers`: encode throughput on one
thread with the same vocabulary and merges, and BPE training time at the same vocabulary size.

Not a correctness suite (tests/test_tokenizer.py): each benchmark checks only that both sides
produce the same ids (or, for training, that pyllm learned the requested number of merges).
"""

from __future__ import annotations

import os

os.environ.setdefault("RAYON_NUM_THREADS", "1")       # `tokenizers`: one thread, like the others
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from pyllm.data import read_default_corpus  # noqa: E402
from pyllm.io.tokenizer_files import HF_PATTERNS  # noqa: E402
from pyllm.pretokenize import PATTERNS  # noqa: E402
from pyllm.tokenizer import Tokenizer  # noqa: E402

ENCODE_BYTES = 10_000_000    # the scale: ~10 MB of standard-library sources
ENCODE_VOCAB = 32768
TRAIN_BYTES = 10_000_000
TRAIN_VOCAB = 8192


@pytest.fixture(scope="module")
def corpus() -> str:
    return read_default_corpus(ENCODE_BYTES)


@pytest.fixture(scope="module")
def tokenizer(corpus) -> Tokenizer:
    return Tokenizer.train(corpus, ENCODE_VOCAB, pattern="gpt4", progress=False)


def _peer(name: str, tok: Tokenizer, tmp_path_factory):
    if name == "tiktoken":
        tiktoken = pytest.importorskip("tiktoken")
        enc = tiktoken.Encoding("pyllm-bench", pat_str=PATTERNS[tok.pattern],
                                mergeable_ranks=tok.mergeable_ranks(), special_tokens={})
        return enc.encode_ordinary
    tokenizers = pytest.importorskip("tokenizers")
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(path, format="hf")
    hf = tokenizers.Tokenizer.from_file(str(path))
    return lambda text: hf.encode(text).ids


@pytest.mark.parametrize("impl", ["pyllm", "peer"])
@pytest.mark.parametrize("peer", ["tiktoken", "tokenizers"])
def test_encode_one_thread(benchmark, corpus, tokenizer, tmp_path_factory, peer, impl):
    encode = tokenizer.encode_ordinary if impl == "pyllm" else _peer(peer, tokenizer, tmp_path_factory)
    benchmark.group = f"encode {len(corpus.encode()) / 1e6:.1f} MB, vocab {ENCODE_VOCAB} vs {peer}"
    benchmark.extra_info.update(impl="pyllm" if impl == "pyllm" else peer, bytes=len(corpus.encode()),
                                target=1.0 if peer == "tiktoken" else None)
    ids = benchmark.pedantic(encode, args=(corpus,), rounds=3, iterations=1, warmup_rounds=1)
    other = _peer(peer, tokenizer, tmp_path_factory) if impl == "pyllm" else tokenizer.encode_ordinary
    assert ids == other(corpus), "pyllm and the peer disagree: this benchmark would time a wrong answer"


@pytest.mark.parametrize("impl", ["pyllm", "tokenizers"])
def test_train(benchmark, impl):
    text = read_default_corpus(TRAIN_BYTES)
    benchmark.group = f"train vocab {TRAIN_VOCAB} on {len(text.encode()) / 1e6:.1f} MB vs tokenizers"
    benchmark.extra_info.update(impl=impl, bytes=len(text.encode()), target=1.0)
    if impl == "pyllm":
        tok = benchmark.pedantic(lambda: Tokenizer.train(text, TRAIN_VOCAB, progress=False),
                                 rounds=3, iterations=1)
        assert tok.vocab_size == TRAIN_VOCAB
        return
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, trainers

    def train():
        hf = tokenizers.Tokenizer(models.BPE())
        # The spelling Oniguruma reads as tiktoken does (see HF_PATTERNS): the same pieces as pyllm's.
        hf.pre_tokenizer = pre_tokenizers.Split(tokenizers.Regex(HF_PATTERNS["gpt4"]), behavior="isolated")
        trainer = trainers.BpeTrainer(vocab_size=TRAIN_VOCAB, show_progress=False,
                                      initial_alphabet=[chr(b) for b in range(256)])
        hf.train_from_iterator([text], trainer)
        return hf

    hf = benchmark.pedantic(train, rounds=3, iterations=1)
    assert hf.get_vocab_size() > TRAIN_VOCAB // 2


@pytest.fixture(scope="module")
def sentencepiece(corpus, tmp_path_factory):
    """A Llama-2-style tokenizer.json (BPE over U+2581-spaced text, <0xNN> byte fallback) trained
    by `tokenizers` on the corpus, and pyllm's reading of it (merged by score, word by word)."""
    import json

    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, normalizers, pre_tokenizers, trainers

    normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    trainer_side = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_side.normalizer = normalizer
    # Pieces that never hold a space after another character, as SentencePiece's own training
    # makes them (split_by_whitespace); the tokenizer used has no pre-tokenizer, as Llama 2's.
    trainer_side.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    sample = corpus[:2_000_000]
    trainer_side.train_from_iterator([sample[i:i + 4000] for i in range(0, len(sample), 4000)],
                                     trainers.BpeTrainer(vocab_size=ENCODE_VOCAB, show_progress=False,
                                                         special_tokens=["<unk>", "<s>", "</s>"]))
    trained = json.loads(trainer_side.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for token in sorted(trained["vocab"], key=trained["vocab"].get):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    hf = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    hf.normalizer = normalizer
    path = tmp_path_factory.mktemp("spm") / "tokenizer.json"
    hf.save(str(path))
    return Tokenizer.load(path), hf


@pytest.mark.parametrize("impl", ["pyllm", "tokenizers"])
def test_encode_sentencepiece_one_thread(benchmark, corpus, sentencepiece, impl):
    ours, hf = sentencepiece
    text = corpus[:3_000_000]   # one text: one merge heap over all of it on both sides
    encode = ours.encode_ordinary if impl == "pyllm" else (lambda t: hf.encode(t).ids)
    benchmark.group = f"SentencePiece-style encode {len(text.encode()) / 1e6:.1f} MB, vocab {ENCODE_VOCAB} vs tokenizers"
    benchmark.extra_info.update(impl=impl, bytes=len(text.encode()), target=1.0)
    ids = benchmark.pedantic(encode, args=(text,), rounds=3, iterations=1, warmup_rounds=1)
    assert ids == (hf.encode(text).ids if impl == "pyllm" else ours.encode_ordinary(text))
