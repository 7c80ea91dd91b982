"""The bad-input catalogue: each entry a bad argument, file, config, sampling setting or CLI flag,
and the exception it must raise with the words its message must hold (never a crash, a bare
KeyError/IndexError/OverflowError, pybind11's argument dump, a hang or silent garbage)."""

import contextlib
import io
import json
import os
import re
import struct

import numpy as np
import pytest

from pyllm import kernels as K
from pyllm.cli import main as cli
from pyllm.finetune import read_examples
from pyllm.io.gguf import GGUFFile
from pyllm.io.hf import load_state
from pyllm.generate import SamplingConfig, generate
from pyllm.llm import LLM
from pyllm.model import Model, ModelConfig
from pyllm.tokenizer import Tokenizer

F32 = np.float32


def f(*shape):
    return np.ones(shape, F32)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tokenizer, a model, an LLM, and a folder of files (good ones to spoil)."""
    root = tmp_path_factory.mktemp("catalogue")
    tok = Tokenizer.train("the quick brown fox jumps over the lazy dog " * 40, 300, pattern="gpt2",
                          special_tokens=["<|endoftext|>"], progress=False)
    model = Model(ModelConfig(arch="llama", vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2,
                              n_embd=32), seed=0)
    llm = LLM(model, tok)
    llm.save(root / "model")
    tok.save(root / "tok.json")
    return dict(root=root, tok=tok, model=model, llm=llm)


def _spoil(world, name, edit):
    """A copy of a good file with edit(bytes or json) applied, its path."""
    src = world["root"] / name
    dst = world["root"] / f"bad-{abs(hash(edit.__code__))}-{src.name}"
    data = src.read_bytes() if src.is_file() else None
    dst.write_bytes(edit(data))
    return dst


def _json_edit(change):
    def edit(data):
        doc = json.loads(data)
        change(doc)
        return json.dumps(doc).encode()
    return edit


def _folder_with_config(world, change, tag):
    folder = world["root"] / f"cfg-{tag}"
    if not folder.exists():
        folder.mkdir()
        for p in (world["root"] / "model").iterdir():
            (folder / p.name).write_bytes(p.read_bytes())
    doc = json.loads((world["root"] / "model" / "config.json").read_text())
    change(doc)
    (folder / "config.json").write_text(json.dumps(doc))
    return folder


def _cli(world, args):
    """(rc, stderr) of the CLI, in process."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = cli(args)
        except SystemExit as exc:   # argparse's own refusals
            rc = exc.code
    return rc, err.getvalue()


# Each: (id, call(world), exception type, regex its message must match)
CASES = [
    # ---------------------------------------------------------------- kernels
    ("matmul-dtype-object", lambda w: K.matmul(np.array([["a"]], object), f(1, 1)), (TypeError, ValueError), r"a\b"),
    ("matmul-inner", lambda w: K.matmul(f(2, 3), f(4, 2)), ValueError, r"matmul"),
    ("matmul-1d-b", lambda w: K.matmul(f(2, 3), f(3)), ValueError, r"\bb\b"),
    ("matmul-bias-shape", lambda w: K.matmul(f(2, 3), f(3, 4), f(5)), ValueError, r"bias"),
    ("softmax-scalar", lambda w: K.softmax(np.float32(1.0)), ValueError, r"\bx\b"),
    ("layernorm-w-shape", lambda w: K.layernorm(f(2, 4), f(3), f(4)), ValueError, r"\bw\b"),
    ("layernorm-zero-width", lambda w: K.layernorm_forward(f(3, 0), f(0), f(0)), ValueError, r"at least one value"),
    ("rmsnorm-zero-width", lambda w: K.rmsnorm_forward(f(3, 0), f(0)), ValueError, r"at least one value"),
    ("gelu-none", lambda w: K.gelu(None), (TypeError, ValueError), r"\bx\b"),
    ("swiglu-shape", lambda w: K.swiglu(f(4, 17), f(4, 18)), ValueError, r"\bup\b"),
    ("geglu-shape", lambda w: K.geglu(f(4, 17), f(4, 18)), ValueError, r"\bup\b"),
    ("rope-odd", lambda w: K.rope_tables(4, 7), ValueError, r"even"),
    ("rope-positions-huge", lambda w: K.rope_tables(2 ** 40, 8), ValueError, r"positions must be a count"),
    ("rope-positions-nan", lambda w: K.rope_tables(np.array([np.nan]), 8), ValueError, r"finite"),
    ("attention-heads", lambda w: K.attention(f(1, 3, 4, 8), f(1, 2, 4, 8), f(1, 2, 4, 8)), ValueError, r"multiple"),
    ("attention-zero-head", lambda w: K.attention_forward(f(1, 2, 3, 0), f(1, 2, 3, 0), f(1, 2, 3, 0)), ValueError,
     r"at least one value"),
    ("attention-window-0", lambda w: K.attention_forward(f(1, 2, 4, 8), f(1, 2, 4, 8), f(1, 2, 4, 8), window=0),
     ValueError, r"window"),
    ("ce-target-range", lambda w: K.cross_entropy(f(2, 5), np.array([0, 5])), ValueError, r"targets"),
    ("ce-ignore-huge", lambda w: K.cross_entropy(f(2, 5), np.array([0, 1]), ignore_index=2 ** 70), ValueError,
     r"ignore_index"),
    ("embedding-id-range", lambda w: K.embedding(np.array([7]), f(5, 3)), ValueError, r"ids"),
    ("embedding-float-ids", lambda w: K.embedding(np.array([1.5]), f(5, 3)), (TypeError, ValueError), r"ids"),
    ("embedding-backward-vocab", lambda w: K.embedding_backward(f(1, 3), np.array([0]), 2 ** 40), ValueError,
     r"vocab_size"),
    ("adamw-nan-lr", lambda w: K.adamw(f(3), f(3), np.zeros(3, F32), np.zeros(3, F32), lr=float("nan"), step=1),
     ValueError, r"lr must be a finite"),
    ("adamw-step-huge", lambda w: K.adamw(f(3), f(3), np.zeros(3, F32), np.zeros(3, F32), lr=0.1, step=2 ** 70),
     ValueError, r"step counts from 1"),
    ("adamw-readonly", lambda w: K.adamw(np.ones(3, F32)[::-1], f(3), np.zeros(3, F32), np.zeros(3, F32), lr=0.1,
                                         step=1), ValueError, r"param"),
    ("row-bytes-type", lambda w: K.row_bytes(999, 32), ValueError, r"unknown ggml type"),
    ("quantize-partial-block", lambda w: K.quantize(f(1, 33), K.QUANT_TYPES["Q8_0"]), ValueError, r"32"),
    ("threads-huge", lambda w: K.set_num_threads(2 ** 40), ValueError, r"threads"),
    ("threads-str", lambda w: K.set_num_threads("2"), ValueError, r"threads"),
    # ---------------------------------------------------------------- sampling
    ("sample-temperature", lambda w: K.sample(f(5), temperature=-1), ValueError, r"temperature"),
    ("sample-top-p", lambda w: K.sample(f(5), top_p=2.0), ValueError, r"top_p"),
    ("sample-top-p-str", lambda w: K.sample(f(5), top_p="a"), ValueError, r"top_p"),
    ("sample-top-k", lambda w: K.sample(f(5), top_k=-3), ValueError, r"top_k"),
    ("sample-min-p-nan", lambda w: K.sample(f(5), min_p=float("nan")), ValueError, r"min_p"),
    ("sample-penalty-none", lambda w: K.sample(f(5), repetition_penalty=None), ValueError, r"repetition_penalty"),
    ("sample-seed-negative", lambda w: K.sample(f(5), seed=-1), ValueError, r"seed"),
    ("sample-nan-logits", lambda w: K.sample(np.array([np.nan, 1], F32)), ValueError, r"NaN"),
    ("sample-history-range", lambda w: K.sample(f(5), repetition_penalty=1.1, history=[9]), ValueError, r"history"),
    ("sampling-config", lambda w: SamplingConfig(temperature=float("inf")), ValueError, r"temperature"),
    # ---------------------------------------------------------------- tokenizer
    ("encode-none", lambda w: w["tok"].encode(None), TypeError, r"text must be a str"),
    ("encode-special", lambda w: w["tok"].encode("a <|endoftext|>"), ValueError, r"disallowed special token"),
    ("encode-allowed-none", lambda w: w["tok"].encode("x", allowed_special=None), TypeError, r"allowed_special"),
    ("encode-unknown-special", lambda w: w["tok"].encode("x", allowed_special={"<nope>"}), ValueError,
     r"not special tokens"),
    ("decode-negative", lambda w: w["tok"].decode([-1]), ValueError, r"outside the vocabulary"),
    ("decode-huge", lambda w: w["tok"].decode([10 ** 20]), ValueError, r"outside the vocabulary"),
    ("decode-none", lambda w: w["tok"].decode(None), TypeError, r"sequence of token ids"),
    ("decode-nested", lambda w: w["tok"].decode([[1, 2]]), TypeError, r"integers"),
    ("decode-str-ids", lambda w: w["tok"].decode(["a"]), TypeError, r"integers"),
    ("train-vocab-small", lambda w: Tokenizer.train("abc", 100, progress=False), ValueError, r"at least 256"),
    ("train-vocab-huge", lambda w: Tokenizer.train("abc", 10 ** 9, progress=False), ValueError, r"more than pyllm"),
    ("train-special-empty", lambda w: Tokenizer.train("abc", 300, special_tokens=["", "x"], progress=False),
     ValueError, r"distinct non-empty"),
    ("train-special-dup", lambda w: Tokenizer.train("abc", 300, special_tokens=["x", "x"], progress=False),
     ValueError, r"distinct non-empty"),
    ("train-pattern-bad", lambda w: Tokenizer.train("abc", 300, pattern="(", progress=False), ValueError,
     r"not a valid regex"),
    ("train-pattern-group", lambda w: Tokenizer.train("abc", 300, pattern="(a+)|.", progress=False), ValueError,
     r"capturing groups"),
    ("train-pattern-none", lambda w: Tokenizer.train("abc", 300, pattern=None, progress=False), TypeError,
     r"split pattern"),
    ("pattern-redos", lambda w: Tokenizer([bytes([b]) for b in range(256)], [], pattern=r"(?:a|a)+$|[\s\S]")
     .encode("a" * 40 + "b"), ValueError, r"took too long"),
    ("tokenizer-shared-special-id", lambda w: Tokenizer([bytes([b]) for b in range(256)], [],
                                                        special_tokens={"<a>": 256, "<b>": 256}), ValueError,
     r"share an id"),
    ("tokenizer-far-special-id", lambda w: Tokenizer([bytes([b]) for b in range(256)], [],
                                                     special_tokens={"<a>": 10 ** 12}), ValueError, r"integer id in"),
    ("tokenizer-merges-overflow", lambda w: Tokenizer([bytes([b]) for b in range(256)], [(0, 2 ** 70)]), ValueError,
     r"merges"),
    ("tokenizer-vocab-none", lambda w: Tokenizer(None, []), TypeError, r"vocab must be"),
    ("tokenizer-file-not-json", lambda w: Tokenizer.load(_spoil(w, "tok.json", lambda d: d[:40])), ValueError,
     r"tok\.json"),
    ("tokenizer-file-id-far", lambda w: Tokenizer.load(_spoil(w, "tok.json", _json_edit(
        lambda doc: doc.__setitem__("special_tokens", {"<x>": 10 ** 12})))), ValueError, r"integer id in|special"),
    ("tokenizer-hf-shared-id", lambda w: Tokenizer.load(_spoil(w, "model/tokenizer.json", _json_edit(
        lambda doc: doc["model"]["vocab"].update({"zzz": 5})))), ValueError, r"share the id 5"),
    ("tokenizer-hf-far-id", lambda w: Tokenizer.load(_spoil(w, "model/tokenizer.json", _json_edit(
        lambda doc: doc["model"]["vocab"].update({"zzz": 10 ** 12})))), ValueError, r"outside \[0, "),
    # ---------------------------------------------------------------- model configs and models
    ("config-rope-nan", lambda w: ModelConfig(arch="llama", rope_theta=float("nan")), ValueError, r"rope_theta"),
    ("config-layers-huge", lambda w: ModelConfig(n_layer=10 ** 8), ValueError, r"n_layer"),
    ("config-heads", lambda w: ModelConfig(n_head=5, n_embd=32), ValueError, r"multiple of n_head"),
    ("config-arch", lambda w: ModelConfig(arch="falcon"), ValueError, r"not supported"),
    ("config-window", lambda w: ModelConfig(arch="gpt2", sliding_window=4), ValueError, r"sliding"),
    ("model-ids-3d", lambda w: w["model"](np.zeros((2, 2, 3), np.int64)), ValueError, r"\(B, T\)"),
    ("model-ids-range", lambda w: w["model"](np.array([[400]])), ValueError, r"outside"),
    ("model-ids-float", lambda w: w["model"](np.array([[1.0]])), ValueError, r"integers"),
    ("model-too-long", lambda w: w["model"](np.zeros((1, 40), np.int64)), ValueError, r"block_size"),
    ("generate-3d", lambda w: generate(w["model"], np.zeros((2, 2, 3), np.int64), 2), ValueError, r"\(T,\) or \(B, T\)"),
    ("generate-int", lambda w: generate(w["model"], 5, 2), TypeError, r"sequence of token ids"),
    ("generate-empty", lambda w: generate(w["model"], [], 2), ValueError, r"empty"),
    ("generate-stop-huge", lambda w: w["model"].generate([1], 1, stop_tokens=[2 ** 70]), ValueError, r"stop_tokens"),
    ("llm-stop-ids", lambda w: LLM(w["model"], w["tok"], stop_token_ids=[10 ** 6]), ValueError, r"stop_token_ids"),
    ("llm-prompt-int", lambda w: w["llm"].generate(123), TypeError, r"prompt must be a str"),
    ("llm-stop-empty", lambda w: w["llm"].generate("the", 2, stop=[""]), ValueError, r"stop must be"),
    ("llm-messages", lambda w: w["llm"].chat([{"role": "robot", "content": "x"}]), ValueError, r"role"),
    ("llm-template-bomb", lambda w: LLM(w["model"], w["tok"], "{{ 'a' * 10**10 }}").chat(
        [{"role": "user", "content": "x"}]), ValueError, r"chat template failed"),
    # ---------------------------------------------------------------- files
    ("folder-missing", lambda w: Model.from_pretrained(w["root"] / "nowhere"), (FileNotFoundError, ValueError),
     r"nowhere"),
    ("config-false-string", lambda w: Model.from_pretrained(_folder_with_config(
        w, lambda d: d.__setitem__("tie_word_embeddings", "false"), "tie")), ValueError, r"true or false"),
    ("config-layers-lie", lambda w: Model.from_pretrained(_folder_with_config(
        w, lambda d: d.__setitem__("num_hidden_layers", 7), "layers")), ValueError, r"the config says 7 layers"),
    ("config-width-lie", lambda w: Model.from_pretrained(_folder_with_config(
        w, lambda d: d.update(hidden_size=8192, num_attention_heads=64, intermediate_size=20000), "wide")),
     ValueError, r"but the file holds"),
    ("config-not-object", lambda w: Model.from_pretrained(_folder_with_config(w, lambda d: d.clear(), "empty")),
     ValueError, r"config\.json"),
    ("safetensors-truncated", lambda w: load_state(
        _spoil(w, "model/model.safetensors", lambda d: d[:100])), ValueError, r"safetensors"),
    ("gguf-short", lambda w: GGUFFile(_spoil(w, "tok.json", lambda d: b"GGUF" + bytes(30))), ValueError,
     r"GGUF|truncated"),
    ("gguf-bad-magic", lambda w: GGUFFile(
        _spoil(w, "tok.json", lambda d: b"NOPE" + bytes(40))), ValueError, r"bad magic"),
    ("gguf-huge-count", lambda w: GGUFFile(
        _spoil(w, "tok.json", lambda d: b"GGUF" + struct.pack("<IQQ", 3, 2 ** 60, 0) + bytes(16))), ValueError,
     r"corrupt header"),
    ("jsonl-broken-line", lambda w: read_examples(
        _spoil(w, "tok.json", lambda d: b'{"messages": [\n'), w["llm"]), ValueError, r":1: not valid JSON"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_a_clear_error(world, case):
    _, call, kind, words = case
    with pytest.raises(kind) as info:
        call(world)
    assert info.type not in (KeyError, IndexError, AttributeError, OverflowError, ZeroDivisionError, RecursionError)
    assert "incompatible function arguments" not in str(info.value)
    assert re.search(words, str(info.value)), f"{info.type.__name__}: {info.value}"


CLI_CASES = [
    ("train-block-size", ["train", "--block-size", "1000000000", "--max-steps", "1"], r"block_size is 1000000000"),
    ("train-vocab-size", ["train", "--vocab-size", "1000000000", "--max-steps", "1"], r"vocab_size"),
    ("train-lr-nan", ["train", "--lr", "nan", "--max-steps", "1"], r"finite lr"),
    ("train-unwritable-out", ["train", "--out", "/proc/pyllm-nowhere", "--data", "__ROOT__/tok.json",
                              "--max-steps", "1", "--no-progress", "--vocab-size", "300", "--preset", "tiny"],
     r"/proc/pyllm-nowhere|No such file|Permission|Read-only"),
    ("threads-negative", ["train", "--threads", "-1", "--max-steps", "1"], r"threads must lie in"),
    ("generate-missing-model", ["generate", "--model", "__ROOT__/nowhere", "hello"], r"nowhere"),
    ("export-bad-type", ["export", "--model", "__ROOT__/model", "--out", "__ROOT__/x.gguf", "--type", "q3_k"],
     r"invalid choice|q3_k"),
    ("tokenize-bad-pattern", ["tokenize", "train", "--data", "__ROOT__/tok.json", "--vocab-size", "300", "--out",
                              "__ROOT__/t.json", "--pattern", "("], r"not a valid regex"),
]


@pytest.mark.parametrize("case", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_bad_cli_flags_get_a_message_not_a_traceback(world, case, monkeypatch, tmp_path):
    _, args, words = case
    monkeypatch.chdir(tmp_path)
    args = [a.replace("__ROOT__", str(world["root"])) for a in args]
    rc, err = _cli(world, args)
    assert rc not in (0, None), err
    assert "Traceback" not in err
    assert re.search(words, err), err


def test_the_catalogue_is_long_enough():
    assert len(CASES) + len(CLI_CASES) >= 60


def test_no_pickle_no_eval_and_sandboxed_templates():
    """The package never unpickles, evals or execs, and renders templates only in the sandbox."""
    import pathlib
    root = pathlib.Path(__file__).resolve().parents[1] / "pyllm"
    for path in root.rglob("*.py"):
        text = path.read_text()
        for pattern in (r"\bimport pickle\b", r"\bpickle\.", r"(?<![\w.])eval\(", r"(?<![\w.])exec\(",
                        r"allow_pickle\s*=\s*True", r"jinja2\.Environment\(", r"\bTemplate\("):
            assert not re.search(pattern, text), f"{path}: {pattern}"
    assert os.path.exists(root / "llm.py")
