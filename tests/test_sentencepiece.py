"""SentencePiece-style vocabularies (Llama 2, Mistral, Gemma): a tokenizer.json of that kind against
the `tokenizers` package built from it (ids and text on the corpus and on generated Unicode), and a
GGUF vocabulary (`tokenizer.ggml.model = "llama"`) against llama.cpp's tokenizer on the same file."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyllm.data import read_default_corpus
from pyllm.llm import LLM
from pyllm.model import Model, ModelConfig
from pyllm.tokenizer import Tokenizer

tokenizers = pytest.importorskip("tokenizers")
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers  # noqa: E402

SPACE = "\u2581"


@pytest.fixture(scope="module", params=["words", "across spaces"])
def spm_json(request, tmp_path_factory):
    """A Llama-2-style tokenizer.json: BPE over U+2581-spaced text with <0xNN> byte fallback; its
    pieces either stop at spaces, as SentencePiece trains them (pyllm then merges word by word),
    or run across them (then over the whole text at once)."""
    text = read_default_corpus(200_000)
    normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
    trainer_side = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_side.normalizer = normalizer
    if request.param == "words":
        trainer_side.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    trainer_side.train_from_iterator([text[i:i + 2000] for i in range(0, len(text), 2000)],
                                     trainers.BpeTrainer(vocab_size=1200, special_tokens=["<unk>", "<s>", "</s>"],
                                                         show_progress=False))
    trained = json.loads(trainer_side.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for token in sorted(trained["vocab"], key=trained["vocab"].get):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    hf = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True,
                                         fuse_unk=True))
    hf.normalizer = normalizer
    hf.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    hf.add_special_tokens(["<unk>", "<s>", "</s>"])
    path = tmp_path_factory.mktemp("spm-" + request.param.replace(" ", "-")) / "tokenizer.json"
    hf.save(str(path))
    return path, hf


def test_the_corpus_encodes_and_decodes_as_tokenizers_does(spm_json):
    path, hf = spm_json
    ours = Tokenizer.load(path)
    assert ours.is_sentencepiece and ours.vocab_size == hf.get_vocab_size()
    assert ours._spm.splits_at_spaces() == ("words" in path.parent.name)
    lines = read_default_corpus(1_000_000).split("\n")
    theirs = [e.ids for e in hf.encode_batch(lines)]
    assert [ours.encode(line) for line in lines] == theirs
    sample = [ids for ids in theirs if ids][:2000]
    assert [ours.decode(ids) for ids in sample] == [hf.decode(ids) for ids in sample]
    whole = read_default_corpus(300_000)
    assert ours.encode(whole) == hf.encode(whole).ids   # one long text: a heap of 300 000 symbols


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_any_unicode_encodes_as_tokenizers_does(spm_json, text):
    path, hf = spm_json
    ours = Tokenizer.load(path)
    if "<s>" in text or "</s>" in text or "<unk>" in text:
        return
    ids = ours.encode(text)
    assert ids == hf.encode(text).ids
    assert ours.decode(ids) == hf.decode(ids) == text   # the added first space dropped again


def test_unknown_characters_fall_back_to_bytes(spm_json):
    path, _ = spm_json
    ours = Tokenizer.load(path)
    ids = ours.encode("\U0001F600")   # no piece for it: the space, then its four bytes' tokens
    assert ids[1:] == [3 + b for b in "\U0001F600".encode()] and ours.decode(ids) == "\U0001F600"


def test_written_back_as_a_tokenizer_json_it_encodes_the_same(spm_json, tmp_path):
    """pyllm's tokenizer.json of a SentencePiece vocabulary (a merge per split of each piece, by
    score): `tokenizers` and pyllm read it back to the same ids on the corpus."""
    path, hf = spm_json
    ours = Tokenizer.load(path)
    ours.save(tmp_path / "tokenizer.json", format="hf")
    theirs = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    back = Tokenizer.load(tmp_path / "tokenizer.json")
    lines = read_default_corpus(300_000).split("\n")
    expected = [ours.encode(line) for line in lines]
    assert [e.ids for e in theirs.encode_batch(lines)] == expected
    assert [back.encode(line) for line in lines] == expected
    assert theirs.decode(expected[5]) == ours.decode(expected[5])
    with pytest.raises(ValueError, match="tokenizer.json"):
        ours.save(tmp_path / "t.json")


def test_a_merge_that_makes_no_token_is_refused(spm_json, tmp_path):
    path, _ = spm_json
    doc = json.loads(path.read_text())
    doc["model"]["merges"].append("zz qq")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="not in the vocabulary"):
        Tokenizer.load(bad)


def test_a_gguf_sentencepiece_vocabulary_tokenizes_as_llama_cpp(spm_json, tmp_path):
    gguf = pytest.importorskip("gguf")
    path, hf = spm_json
    ours = Tokenizer.load(path)
    texts = [ours.decode([i]) if i not in ours.special_tokens.values() else "" for i in range(ours.vocab_size)]
    pieces = json.loads(path.read_text())["model"]["vocab"]
    by_id = {v: k for k, v in pieces.items()}
    scores = [0.0 if s is None else s for s in ours.scores]
    types = [3 if i in (1, 2) else 2 if i == 0 else 6 if 3 <= i < 259 else 1 for i in range(ours.vocab_size)]
    cfg = ModelConfig(arch="llama", vocab_size=ours.vocab_size, block_size=64, n_layer=1, n_head=2, n_kv_head=1,
                      n_embd=32, intermediate_size=64)
    model = Model(cfg, seed=0)
    w = gguf.GGUFWriter(str(tmp_path / "spm.gguf"), "llama")
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_feed_forward_length(64)
    w.add_block_count(1)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("llama")
    w.add_token_list([by_id[i] for i in range(ours.vocab_size)])
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    from pyllm.io.gguf_model import gguf_names
    names = gguf_names(cfg)
    for name, value in model.state_dict().items():
        w.add_tensor(names[name], np.ascontiguousarray(value, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    llm = LLM.load(tmp_path / "spm.gguf")
    assert llm.tokenizer.is_sentencepiece and texts[5] == llm.tokenizer.decode([5])
    assert llm.bos_token == "<s>" and llm.encode_prompt("<s>Hi")[0] == 1 and llm.encode_prompt("<s>Hi")[1] != 1
    samples = ["Hello world", "def f(x):\n    return x  # é 中文 😀", read_default_corpus(3000)]
    for text in samples:
        assert llm.tokenizer.encode(text) == hf.encode(text).ids
    llm.save_gguf(tmp_path / "again.gguf", "q8_0", progress=False)   # pyllm's export of such a vocabulary
    again = LLM.load(tmp_path / "again.gguf")
    assert again.tokenizer.data() == llm.tokenizer.data() and again.bos_token == "<s>"
    llama_cpp = pytest.importorskip("llama_cpp")
    for file in ("spm.gguf", "again.gguf"):
        ref = llama_cpp.Llama(model_path=str(tmp_path / file), n_ctx=64, vocab_only=True, verbose=False)
        for text in samples:
            assert llm.tokenizer.encode(text) == ref.tokenize(text.encode(), add_bos=False, special=False), text[:30]
            # the begin token first, as llama.cpp adds it for a SentencePiece vocabulary by default
            assert llm.encode_prompt(text) == ref.tokenize(text.encode(), add_bos=True, special=True)
