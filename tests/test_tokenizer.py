"""pyllm.Tokenizer against its specs and peers: the plain-Python BPE in pyllm.reference,
tiktoken and Hugging Face `tokenizers` (same vocabulary and merges), on real text and on
generated Unicode. Not the pre-tokenizer's exactness (test_pretokenize.py).
"""

from __future__ import annotations

import pathlib
import sysconfig
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyllm import reference as R
from pyllm.io.tokenizer_files import HF_PATTERNS
from pyllm.pretokenize import GPT2_PATTERN, GPT4_PATTERN
from pyllm.tokenizer import Tokenizer, piece_ends

SPECIAL = "<|endoftext|>"
# pyllm's "gpt4" before it took tiktoken's spelling: files saved then may carry it.
EARLIER_GPT4_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
                        r"""|\s*[\r\n]|\s+(?!\S)|\s+""")


def stdlib_text(limit_bytes: int) -> str:
    """The Python standard library's own sources: several MB of real text every machine has."""
    text, files = [], sorted(pathlib.Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))
    size = 0
    for f in files:
        try:
            chunk = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        text.append(chunk)
        size += len(chunk.encode())
        if size >= limit_bytes:
            break
    return "".join(text)


@pytest.fixture(scope="module")
def corpus() -> str:
    return stdlib_text(3_000_000)


@pytest.fixture(scope="module", params=["gpt4", "gpt2"])
def trained(request, corpus) -> Tokenizer:
    return Tokenizer.train(corpus[:1_000_000], 2048, pattern=request.param,
                           special_tokens=[SPECIAL], progress=False)


unicode_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=300)
mixed_text = st.text(st.sampled_from(list("ab Z09'\n\r\t .,!é漢🎉\u0301\u00a0sS")), max_size=200)


# ----------------------------------------------------------------------------- specs

def test_encoding_matches_the_plain_python_bpe(trained, corpus):
    byte_ids = {b: b for b in range(256)}
    ranks = {pair: (r, 256 + r) for r, pair in enumerate(trained.merges)}
    import regex
    pieces = regex.findall({"gpt4": GPT4_PATTERN, "gpt2": GPT2_PATTERN}[trained.pattern],
                           corpus[1_000_000:1_050_000])
    expected = [i for p in pieces for i in R.bpe_encode_piece(p.encode(), byte_ids, ranks)]
    assert trained.encode_ordinary("".join(pieces)) == expected


def test_training_matches_the_plain_python_trainer():
    text = "the cat sat on the mat; the cat ate the rat. " * 3 + "tattoo tat tot"
    tok = Tokenizer.train(text, 256 + 40, progress=False)
    import regex
    counts: dict[bytes, int] = {}
    for piece in regex.findall(GPT4_PATTERN, text):
        counts[piece.encode()] = counts.get(piece.encode(), 0) + 1
    assert tok.merges == R.bpe_train(counts, 40)


def test_training_is_deterministic_and_documented_tie_break():
    text = "cd\nab\ncd\nab"   # pieces cd, ab, cd, ab and newlines: (a,b) and (c,d) twice each
    a = Tokenizer.train(text, 258, progress=False)
    b = Tokenizer.train(text, 258, progress=False)
    assert a.merges == b.merges
    # (a,b) and (c,d) occur equally often: the smaller (left, right) pair wins.
    assert a.merges[0] == (ord("a"), ord("b"))


def test_training_stops_at_min_frequency():
    tok = Tokenizer.train("abab xy", 300, min_frequency=2, progress=False)
    assert tok.merges == [(ord("a"), ord("b"))] and tok.vocab_size == 257


def test_train_from_paths_iterables_and_folders(tmp_path):
    (tmp_path / "a.txt").write_text("hello hello world", encoding="utf-8")
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "b.txt").write_text("hello there", encoding="utf-8")
    from_folder = Tokenizer.train(tmp_path, 270, progress=False)
    from_list = Tokenizer.train([tmp_path / "a.txt", "hello there"], 270, progress=False)
    from_text = Tokenizer.train(["hello hello world", "hello there"], 270, progress=False)
    assert from_folder.merges == from_list.merges == from_text.merges


def test_progress_callback_reaches_the_total():
    seen = []
    Tokenizer.train("abcdefgh " * 50, 262, progress=lambda done, total: seen.append((done, total)))
    assert seen and seen[-1][1] == 6 and seen[-1][0] <= 6


# ----------------------------------------------------------------------------- peers

def test_identical_ids_to_tiktoken_on_real_text(trained, corpus):
    tiktoken = pytest.importorskip("tiktoken")
    enc = tiktoken.Encoding("pyllm-test", pat_str={"gpt4": GPT4_PATTERN, "gpt2": GPT2_PATTERN}[trained.pattern],
                            mergeable_ranks=trained.mergeable_ranks(), special_tokens=trained.special_tokens)
    assert trained.encode(corpus) == enc.encode_ordinary(corpus)
    text = f"a{SPECIAL}b {SPECIAL}"
    assert trained.encode(text, allowed_special="all") == enc.encode(text, allowed_special="all")


def test_identical_ids_to_hf_tokenizers_on_real_text(trained, corpus, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    path = tmp_path / "tokenizer.json"
    trained.save(path, format="hf")
    hf = tokenizers.Tokenizer.from_file(str(path))
    sample = corpus[:1_000_000]
    assert trained.encode(sample) == hf.encode(sample).ids
    assert hf.decode(trained.encode(sample)) == sample


@settings(max_examples=150)
@given(text=st.one_of(unicode_text, mixed_text))
def test_identical_ids_to_peers_on_generated_unicode(text, trained, tmp_path_factory):
    tiktoken = pytest.importorskip("tiktoken")
    enc = tiktoken.Encoding("pyllm-test", pat_str={"gpt4": GPT4_PATTERN, "gpt2": GPT2_PATTERN}[trained.pattern],
                            mergeable_ranks=trained.mergeable_ranks(), special_tokens={})
    assert trained.encode_ordinary(text) == enc.encode_ordinary(text)


# ----------------------------------------------------------------------------- properties

@settings(max_examples=200)
@given(text=st.one_of(unicode_text, mixed_text))
def test_round_trip_any_text(text, trained):
    # Hypothesis also tries the module's string constants, SPECIAL among them: plain text here.
    ids = trained.encode(text, disallowed_special=())
    assert trained.decode(ids) == text
    assert trained.decode_bytes(ids) == text.encode("utf-8")


def test_round_trip_hard_cases(trained):
    cases = ["", "\x00", "a\x00b", "🎉" * 100, "e\u0301\u0301", "漢字かなカナ한국어", "مرحبا", " " * 1000,
             "x" * 100_000, "\r\n\r\n\t \u00a0\u2028\u3000", "don't 'S 'LL", "1234567890" * 10]
    for text in cases:
        assert trained.decode(trained.encode(text)) == text


def test_a_long_run_of_spaces_is_fast(trained):
    text = " " * 200_000 + "x"
    start = time.perf_counter()
    ids = trained.encode(text)
    assert time.perf_counter() - start < 2.0          # quadratic merging would take minutes
    assert trained.decode(ids) == text


def test_decode_of_a_partial_character_is_replaced_not_raised(trained):
    ids = trained.encode("🎉")
    bytes_of_first = trained.token_to_bytes(ids[0])
    if len(ids) > 1:
        assert trained.decode(ids[:1]) == bytes_of_first.decode("utf-8", errors="replace")
    with pytest.raises(UnicodeDecodeError):
        Tokenizer([bytes([b]) for b in range(256)], []).decode([0xF0], errors="strict")


def test_encode_batch_equals_encode(trained, corpus):
    texts = [corpus[i:i + 5000] for i in range(0, 200_000, 5000)]
    assert trained.encode_batch(texts, num_threads=2) == [trained.encode(t) for t in texts]


# ----------------------------------------------------------------------------- special tokens

def test_special_tokens_follow_tiktoken_rules(trained):
    text = f"hi {SPECIAL} there"
    with pytest.raises(ValueError, match="disallowed special token"):
        trained.encode(text)
    allowed = trained.encode(text, allowed_special={SPECIAL})
    assert trained.special_tokens[SPECIAL] in allowed
    plain = trained.encode(text, disallowed_special=())
    assert trained.special_tokens[SPECIAL] not in plain
    assert trained.decode(allowed) == trained.decode(plain) == text
    with pytest.raises(ValueError, match="not special tokens"):
        trained.encode(text, allowed_special={"<|nope|>"})


def test_special_token_ids_follow_the_merges():
    tok = Tokenizer.train("aaaa bbbb", 256 + 3 + 2, special_tokens=["<s>", "</s>"], progress=False)
    assert tok.special_tokens == {"<s>": 259, "</s>": 260} and tok.vocab_size == 261


# ----------------------------------------------------------------------------- files

def test_save_load_round_trip(trained, tmp_path, corpus):
    path = tmp_path / "tok.json"
    trained.save(path)
    loaded = Tokenizer.load(path)
    sample = corpus[:100_000]
    assert loaded.encode(sample) == trained.encode(sample)
    assert loaded.special_tokens == trained.special_tokens and loaded.pattern == trained.pattern
    hf_path = tmp_path / "tokenizer.json"
    trained.save(hf_path, format="hf")
    from_hf = Tokenizer.load(hf_path)
    assert from_hf.encode(sample) == trained.encode(sample)
    assert from_hf.special_tokens == trained.special_tokens


def test_tokenizer_json_spells_gpt4_so_that_tokenizers_splits_digits_in_threes(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    path = tmp_path / "tokenizer.json"
    Tokenizer([bytes([b]) for b in range(256)], [], pattern="gpt4").save(path, format="hf")
    hf = tokenizers.Tokenizer.from_file(str(path))
    assert [p for p, _ in hf.pre_tokenizer.pre_tokenize_str("x 12345")] == ["x", "Ġ", "123", "45"]
    assert Tokenizer.load(path).pattern == "gpt4"


@settings(max_examples=300)
@given(text=st.one_of(unicode_text, mixed_text, st.text(st.sampled_from("1٣ \n"), max_size=30)))
def test_the_tokenizer_json_spelling_of_gpt4_splits_the_same_in_regex(text):
    import regex
    assert regex.findall(HF_PATTERNS["gpt4"], text) == regex.findall(GPT4_PATTERN, text)


def test_files_with_the_earlier_gpt4_pattern_keep_it(tmp_path, corpus):
    # It splits whitespace at the end of a text differently from tiktoken's spelling ("\n " is
    # two pieces, not one), so it loads as a pattern of its own, run by `regex`.
    tiktoken = pytest.importorskip("tiktoken")
    assert piece_ends(b"x\n ", "x\n ", EARLIER_GPT4_PATTERN).tolist() == [1, 2, 3]
    assert piece_ends(b"x\n ", "x\n ", "gpt4").tolist() == [1, 3]
    base = Tokenizer.train(corpus[:200_000], 400, pattern=EARLIER_GPT4_PATTERN, progress=False)
    enc = tiktoken.Encoding("pyllm-test", pat_str=EARLIER_GPT4_PATTERN,
                            mergeable_ranks=base.mergeable_ranks(), special_tokens={})
    text = corpus[200_000:250_000] + "\n  \n "
    for fmt in ("pyllm", "hf"):
        path = tmp_path / f"{fmt}.json"
        base.save(path, format=fmt)
        loaded = Tokenizer.load(path)
        assert loaded.pattern == EARLIER_GPT4_PATTERN
        assert loaded.encode(text) == enc.encode_ordinary(text)


def test_hf_tokenizer_written_by_tokenizers_loads(tmp_path, corpus):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, trainers, decoders
    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=[SPECIAL], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator([corpus[:200_000]], trainer)
    path = tmp_path / "tokenizer.json"
    hf.save(str(path))
    tok = Tokenizer.load(path)
    sample = corpus[200_000:300_000]
    assert tok.pattern == "gpt2"
    assert tok.encode(sample) == hf.encode(sample).ids


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "not a tokenizer file"),
    ('{"format": "pyllm.tokenizer", "version": 99}', "version"),
    ('{"format": "pyllm.tokenizer", "version": 1, "vocab": ["a"]}', "corrupt or truncated"),
    ('{"hello": 1}', "neither"),
])
def test_bad_files_are_clear_errors(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        Tokenizer.load(path)


def test_truncated_file_is_a_clear_error(trained, tmp_path):
    path = tmp_path / "tok.json"
    trained.save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError):
        Tokenizer.load(path)


def test_a_byte_without_a_token_is_the_unknown_token_or_an_error():
    vocab = [bytes([b]) for b in range(255)] + [b"<unk>"]      # no token for byte 255
    with_unk = Tokenizer(vocab, [], special_tokens={"<unk>": 255}, unk_token_id=255)
    assert with_unk._model.encode_pieces(b"a\xff", np.array([2], np.uint32)).tolist() == [97, 255]
    without = Tokenizer([bytes([b]) for b in range(255)], [])
    with pytest.raises(ValueError, match="byte 255 has no token"):
        without._model.encode_pieces(b"\xff", np.array([1], np.uint32))


def test_a_merge_outside_the_vocabulary_is_refused():
    with pytest.raises(ValueError, match="outside the vocabulary"):
        Tokenizer([bytes([b]) for b in range(256)], [(0, 999)])


# ----------------------------------------------------------------------------- bad input

def test_bad_input_is_a_clear_error(trained):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        trained.decode([trained.vocab_size + 5])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        trained.decode([-1])
    with pytest.raises(TypeError, match="integers"):
        trained.decode([1.5])
    with pytest.raises(ValueError, match="surrogate"):
        trained.encode("a\ud800b")
    with pytest.raises(TypeError, match="str"):
        trained.encode(b"bytes")
    with pytest.raises(ValueError, match="vocab_size"):
        Tokenizer.train("abc", 100)
    with pytest.raises(TypeError, match="cannot read text"):
        Tokenizer.train(12345, 300)
    with pytest.raises(ValueError, match="no such file"):
        Tokenizer.train(pathlib.Path("/nonexistent/corpus.txt"), 300)


# ----------------------------------------------------------------------------- GGUF (SmolLM2)

@pytest.fixture(scope="module")
def smollm2(smollm2_path) -> Tokenizer:
    return Tokenizer.from_gguf(smollm2_path)


def test_smollm2_vocabulary_from_gguf(smollm2):
    assert smollm2.vocab_size == 49152 and len(smollm2.merges) == 48900
    assert smollm2.pattern == "gpt2_digits" and smollm2.unk_token_id == 0
    assert {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}.items() <= smollm2.special_tokens.items()


def test_smollm2_encodes_like_tokenizers(smollm2, corpus, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    path = tmp_path / "tokenizer.json"
    smollm2.save(path, format="hf")
    hf = tokenizers.Tokenizer.from_file(str(path))
    sample = corpus[:1_000_000]
    assert smollm2.encode(sample, disallowed_special=()) == hf.encode(sample).ids
    chat = "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\n2+2=? x  1 😀<|im_end|>\n"
    assert smollm2.encode(chat, allowed_special="all") == hf.encode(chat).ids
    assert Tokenizer.load(path).encode(sample[:50_000]) == smollm2.encode(sample[:50_000])


@settings(max_examples=100)
@given(text=st.one_of(unicode_text, mixed_text))
def test_smollm2_encodes_like_tokenizers_on_generated_unicode(text, smollm2, tmp_path_factory):
    tokenizers = pytest.importorskip("tokenizers")
    global _SMOL_HF
    if "_SMOL_HF" not in globals():
        path = tmp_path_factory.mktemp("smol") / "tokenizer.json"
        smollm2.save(path, format="hf")
        _SMOL_HF = tokenizers.Tokenizer.from_file(str(path))
    assert smollm2.encode(text, disallowed_special=()) == _SMOL_HF.encode(text).ids


def test_truncated_and_corrupt_gguf_are_clear_errors(smollm2_path, tmp_path):
    head = smollm2_path.read_bytes()[:2_000_000]     # the metadata ends well before 2 MB
    for size in (10, 100, 10_000, 1_000_000):
        bad = tmp_path / f"cut{size}.gguf"
        bad.write_bytes(head[:size])
        with pytest.raises(ValueError, match="truncated|too short|not a GGUF"):
            Tokenizer.from_gguf(bad)
    wrong = tmp_path / "magic.gguf"
    wrong.write_bytes(b"GGML" + head[4:1000])
    with pytest.raises(ValueError, match="bad magic"):
        Tokenizer.from_gguf(wrong)
    huge = bytearray(head[:100_000])
    huge[16:24] = (2 ** 62).to_bytes(8, "little")    # metadata count beyond the file
    (tmp_path / "huge.gguf").write_bytes(huge)
    with pytest.raises(ValueError, match="corrupt"):
        Tokenizer.from_gguf(tmp_path / "huge.gguf")
