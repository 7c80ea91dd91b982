"""Training: AdamW against torch, overfitting, exact resume, data pipeline, CLI errors."""

import json
import os
import signal

import numpy as np
import pytest

from pyllm.cli import main as cli
from pyllm.data import TokenData, id_dtype, iter_documents
from pyllm.model import Model, ModelConfig
from pyllm.optim import AdamW, cosine_lr, global_norm
from pyllm.train import TrainConfig, TrainingError, TrainingInterrupted, read_log, train

TINY = dict(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32)


def test_adamw_matches_torch_with_decay_groups_and_clipping():
    torch = pytest.importorskip("torch")
    model = Model(ModelConfig(**TINY), seed=0)
    rng = np.random.default_rng(0)
    decayed = {s.name for s in model.specs if s.decay}
    tparams = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in model.state_dict().items()}
    topt = torch.optim.AdamW([{"params": [p for k, p in tparams.items() if k in decayed], "weight_decay": 0.1},
                              {"params": [p for k, p in tparams.items() if k not in decayed], "weight_decay": 0.0}],
                             lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    opt = AdamW(model, lr=1e-2, weight_decay=0.1, grad_clip=0.5)
    for step in range(3):
        model.grads[...] = rng.standard_normal(model.grads.size).astype(np.float32)
        for name, p in tparams.items():
            p.grad = torch.from_numpy(model.g[name].copy())
        torch.nn.utils.clip_grad_norm_(list(tparams.values()), 0.5)
        topt.step()
        opt.step()
    for name, p in tparams.items():
        np.testing.assert_allclose(model.p[name], p.detach().numpy(), rtol=1e-5, atol=1e-6, err_msg=name)


def test_global_norm_and_schedule():
    g = np.full(10_000_001, 0.5, np.float32)
    assert global_norm(g) == pytest.approx(0.5 * np.sqrt(g.size), rel=1e-9)
    lrs = [cosine_lr(s, 1.0, 10, 110, 0.1) for s in range(120)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == 1.0
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[110] == 0.1


def test_a_tiny_model_overfits_one_batch():
    model = Model(ModelConfig(**TINY), seed=1)
    opt = AdamW(model, lr=3e-3, weight_decay=0.0)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 50, (4, 16))
    targets = np.roll(ids, -1, axis=1)
    first = model.forward_backward(ids, targets)
    opt.step()
    for _ in range(150):
        model.zero_grad()
        loss = model.forward_backward(ids, targets)
        opt.step()
    assert first > 3.5 and loss < 0.1, (first, loss)


@pytest.fixture
def corpus(tmp_path):
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "def", "return", "(x)", "\n"]
    folder = tmp_path / "texts"
    folder.mkdir()
    for i in range(4):
        (folder / f"doc{i}.txt").write_text(" ".join(rng.choice(words, 3000)))
    return folder


def _cfg(tmp_path, corpus, **kw):
    fields = dict(out_dir=str(tmp_path / "run"), data=[str(corpus)], vocab_size=300, preset="tiny",
                  n_embd=32, block_size=32, batch_size=4, max_steps=12, eval_interval=4, eval_batches=2,
                  checkpoint_interval=5, warmup_steps=2, lr=3e-3, progress=False)
    fields.update(kw)
    return TrainConfig(**fields)


def test_resume_continues_the_loss_curve_exactly(tmp_path, corpus):
    quiet = lambda *_: None
    whole = train(_cfg(tmp_path / "a", corpus), say=quiet)
    first = train(_cfg(tmp_path / "b", corpus, max_steps=12, checkpoint_interval=100), say=quiet)
    assert [r["loss"] for r in first.history] == [r["loss"] for r in whole.history]
    # A run stopped after 5 of its 12 steps (checkpoint), then resumed.
    part = train(_cfg(tmp_path / "c", corpus, stop_at_step=5), say=quiet)
    assert part.step == 5
    rest = train(_cfg(tmp_path / "c", corpus, max_steps=12, resume=True), say=quiet)
    assert rest.step == 12
    log = read_log(tmp_path / "c" / "run" / "log.jsonl")
    assert [r["step"] for r in log] == list(range(1, 13))
    assert [r["loss"] for r in log] == [r["loss"] for r in whole.history]
    assert [r.get("val_loss") for r in log] == [r.get("val_loss") for r in whole.history]
    assert np.array_equal(rest.model.params, whole.model.params)
    # The output folder is a model folder.
    again = Model.from_pretrained(tmp_path / "c" / "run")
    assert np.array_equal(again.params, whole.model.params)


def test_ctrl_c_saves_a_checkpoint_that_resumes_exactly(tmp_path, corpus, monkeypatch):
    quiet = lambda *_: None
    whole = train(_cfg(tmp_path / "a", corpus), say=quiet)
    calls = {"n": 0}
    original = Model.forward_backward

    def ctrl_c_in_step_8(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 8:
            os.kill(os.getpid(), signal.SIGINT)   # a real Ctrl-C, in the middle of the step
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Model, "forward_backward", ctrl_c_in_step_8)
    with pytest.raises(TrainingInterrupted, match="step 8"):
        train(_cfg(tmp_path / "b", corpus), say=quiet)
    monkeypatch.setattr(Model, "forward_backward", original)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler   # the handler is put back
    rest = train(_cfg(tmp_path / "b", corpus, resume=True), say=quiet)
    assert [r["loss"] for r in rest.history] == [r["loss"] for r in whole.history[8:]]


def test_non_finite_loss_stops_with_the_last_good_checkpoint(tmp_path, corpus, monkeypatch):
    original = Model.forward_backward
    calls = {"n": 0}

    def diverge_at_step_4(self, *args, **kwargs):
        calls["n"] += 1
        loss = original(self, *args, **kwargs)
        return float("nan") if calls["n"] == 4 else loss

    monkeypatch.setattr(Model, "forward_backward", diverge_at_step_4)
    with pytest.raises(TrainingError, match="last good checkpoint"):
        train(_cfg(tmp_path, corpus, checkpoint_interval=1), say=lambda *_: None)
    state = json.loads((tmp_path / "run" / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 3
    assert rc_of_cli_on_nan(tmp_path, corpus, monkeypatch) == 1


def rc_of_cli_on_nan(tmp_path, corpus, monkeypatch):
    monkeypatch.setattr(Model, "forward_backward", lambda self, *a, **k: float("inf"))
    return cli(["train", "--data", str(corpus), "--preset", "tiny", "--vocab-size", "300", "--max-steps", "3",
                "--out", str(tmp_path / "nan"), "--no-progress"])


def test_token_data_split_dtype_and_batches(tmp_path, corpus):
    from pyllm.tokenizer import Tokenizer

    docs = list(iter_documents([corpus]))
    tok = Tokenizer.train(docs, 300, special_tokens=["<|endoftext|>"], progress=False)
    data = TokenData.build(docs, tok, tmp_path / "d", val_fraction=0.2, progress=False)
    assert data.train.dtype == np.uint16
    total = sum(len(tok.encode(d)) + 1 for d in docs)
    assert len(data.train) + len(data.val) == total
    ids, targets = data.batch("train", 3, 8, np.random.default_rng(0))
    assert ids.shape == targets.shape == (3, 8) and np.array_equal(ids[:, 1:], targets[:, :-1])
    assert id_dtype(70000) == np.uint32
    with pytest.raises(ValueError, match="32-bit"):
        id_dtype(2 ** 33)


def test_documents_from_jsonl_and_errors_name_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "one"}\n\n{"text": "two"}\n')
    assert list(iter_documents([path])) == ["one", "two"]
    path.write_text('{"text": "one"}\n{"txt": "two"}\n')
    with pytest.raises(ValueError, match=r"d.jsonl:2"):
        list(iter_documents([path]))
    with pytest.raises(FileNotFoundError):
        list(iter_documents([tmp_path / "missing.txt"]))


def test_cli_train_runs_and_refuses_bad_flags(tmp_path, corpus, capsys):
    out = tmp_path / "cli"
    rc = cli(["train", "--data", str(corpus), "--preset", "tiny", "--vocab-size", "300", "--max-steps", "3",
              "--eval-interval", "3", "--out", str(out), "--no-progress", "--sample-tokens", "5"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "validation loss" in text and "--- sample ---" in text
    assert (out / "config.json").exists() and (out / "log.jsonl").exists()
    assert cli(["train", "--data", str(tmp_path / "nope"), "--out", str(out / "x"), "--no-progress"]) == 1
    assert "no such file" in capsys.readouterr().err
    assert cli(["train", "--batch-size", "0", "--out", str(out / "y")]) == 1
    assert "batch_size" in capsys.readouterr().err
    assert cli(["train", "--resume", "--out", str(tmp_path / "empty"), "--no-progress"]) == 1
    assert "no checkpoint" in capsys.readouterr().err


def test_a_time_budget_plans_the_schedule(tmp_path, corpus):
    budget = 0.05   # three seconds: a few dozen tiny steps
    result = train(_cfg(tmp_path, corpus, max_steps=100_000, max_minutes=budget), say=lambda *_: None)
    state = json.loads((tmp_path / "run" / "checkpoint" / "trainer_state.json").read_text())
    planned = state["train_config"]["max_steps"]
    assert 5 < planned < 100_000 and result.step <= planned
    assert result.history[-1]["time_s"] < 60 * budget * 1.5


def test_too_little_validation_data_is_refused_before_training(tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("alpha beta gamma delta " * 20)
    with pytest.raises(ValueError, match="validation split"):
        train(TrainConfig(out_dir=str(tmp_path / "run"), data=[str(small)], vocab_size=260, preset="tiny",
                          max_steps=2, progress=False), say=lambda *_: None)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
def test_train_a_llama_shaped_model_that_transformers_opens_whole(tmp_path, corpus, arch):
    """`pyllm train --arch`: the folder loads in transformers' AutoTokenizer and pipeline with
    pyllm's ids and greedy text, its end token in config.json and tokenizer_config.json."""
    transformers = pytest.importorskip("transformers")
    from pyllm.llm import LLM

    out = tmp_path / arch
    rc = cli(["train", "--arch", arch, "--data", str(corpus), "--preset", "tiny", "--vocab-size", "300",
              "--max-steps", "30", "--eval-interval", "30", "--lr", "1e-2", "--out", str(out), "--no-progress"])
    assert rc == 0
    ours = LLM.load(out)
    assert ours.model.config.arch == arch and ours.model.config.n_kv_head == 1   # tiny: 2 heads, 1 kv head
    doc = json.loads((out / "config.json").read_text())
    eos = ours.tokenizer.special_tokens["<|endoftext|>"]
    assert doc["eos_token_id"] == eos
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    text = "alpha beta def return (x)\n gamma"
    assert tokenizer(text)["input_ids"] == ours.tokenizer.encode(text)
    assert tokenizer.eos_token_id == eos
    generator = transformers.pipeline("text-generation", model=str(out), tokenizer=tokenizer)
    theirs = generator("alpha beta", max_new_tokens=12, do_sample=False, return_full_text=False)[0]["generated_text"]
    assert theirs == ours.generate("alpha beta", 12, temperature=0)
