"""Interrupted writes lose nothing: a training or fine-tuning process killed with SIGKILL at each
point of a checkpoint write (the tensors written, the state not yet; mid-swap, the old copy renamed
aside; the swap done, the old copy not yet removed) leaves a checkpoint that resumes to exactly the
uninterrupted run; a full disk leaves the old checkpoint and says so; SIGTERM saves like Ctrl-C."""

import errno
import json
import signal
import subprocess
import sys
import tempfile
import textwrap

import numpy as np
import pytest

from pyllm import finetune as F
from pyllm.io.checkpoint import read_checkpoint, write_checkpoint
from pyllm.llm import LLM
from pyllm.model import Model, ModelConfig
from pyllm.tokenizer import Tokenizer
from pyllm.train import MOMENTS, STATE, TrainConfig, read_log, train

# The child: runs `train` or `sft`, SIGKILLs itself at `point` of the second checkpoint write.
KILLER = textwrap.dedent("""
    import json, os, pathlib, shutil, signal, sys
    import pyllm.io.checkpoint as ck
    point, job = sys.argv[1], json.loads(sys.argv[2])
    count = {"tensors": 0, "state": 0}
    aside = {"done": False}

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    real_tensors, real_text = ck.write_safetensors, ck.write_text
    def tensors(path, arrays):
        real_tensors(path, arrays)
        count["tensors"] += 1
        if point == "tensors" and count["tensors"] == 2:
            die()                                   # the tensors are in checkpoint.tmp, the state is not
    def text(path, body):
        count["state"] += 1
        if point == "state" and count["state"] == 2:
            real_text(path, body[: len(body) // 2])  # half a state file, then death
            die()
        real_text(path, body)
    ck.write_safetensors, ck.write_text = tensors, text

    real_rename, real_rmtree = pathlib.Path.rename, shutil.rmtree
    def rename(self, target):
        out = real_rename(self, target)
        if str(target).endswith(".old"):
            aside["done"] = True
            if point == "swap":
                die()                               # the old checkpoint renamed aside, the new not in place
        return out
    def rmtree(path, *a, **k):
        if point == "cleanup" and aside["done"] and str(path).endswith(".old") and os.path.exists(path):
            die()                                   # the new one in place, the old one not yet removed
        return real_rmtree(path, *a, **k)
    pathlib.Path.rename, shutil.rmtree = rename, rmtree

    if job["kind"] == "train":
        from pyllm.train import TrainConfig, train
        train(TrainConfig(**job["config"]), say=lambda *_: None)
    else:
        from pyllm import finetune as F
        from pyllm.llm import LLM
        from pyllm.model import Model, ModelConfig
        from pyllm.tokenizer import Tokenizer
        llm = LLM(Model(ModelConfig(**job["model"]), seed=0), Tokenizer.load(job["tokenizer"]))
        examples = F.read_examples(job["data"], llm)
        F.sft(llm, examples[8:], examples[:8], F.SFTConfig(**job["config"]), out_dir=job["out"], progress=False,
              say=lambda *_: None)
    print("finished without being killed")
""")

POINTS = ["tensors", "state", "swap", "cleanup"]

OUTSIDE = tempfile.gettempdir()   # subprocesses start here: not the source tree, whose pyllm/ is unbuilt


def _killed(point: str, job: dict) -> None:
    out = subprocess.run([sys.executable, "-c", KILLER, point, json.dumps(job)], capture_output=True, text=True,
                         cwd=OUTSIDE, timeout=300)
    assert out.returncode == -signal.SIGKILL, (out.returncode, out.stdout, out.stderr[-2000:])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "def", "return", "(x)", "\n"]
    folder = tmp_path_factory.mktemp("texts")
    for i in range(4):
        (folder / f"doc{i}.txt").write_text(" ".join(rng.choice(words, 3000)))
    return folder


def _train_config(out, corpus, **kw) -> dict:
    fields = dict(out_dir=str(out), data=[str(corpus)], vocab_size=300, preset="tiny", n_embd=32, block_size=32,
                  batch_size=4, max_steps=12, eval_interval=4, eval_batches=2, checkpoint_interval=5, warmup_steps=2,
                  lr=3e-3, progress=False)
    return {**fields, **kw}


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory, corpus):
    return train(TrainConfig(**_train_config(tmp_path_factory.mktemp("whole") / "run", corpus)), say=lambda *_: None)


@pytest.mark.parametrize("point", POINTS)
def test_training_killed_during_a_checkpoint_write_resumes_exactly(tmp_path, corpus, whole_run, point):
    out = tmp_path / "run"
    _killed(point, {"kind": "train", "config": _train_config(out, corpus)})
    found = read_checkpoint(out / "checkpoint", MOMENTS, STATE)
    assert found is not None, list(out.iterdir())
    assert found.state["step"] == (10 if point == "cleanup" else 5)   # the new one once it was whole, else the old
    rest = train(TrainConfig(**_train_config(out, corpus, resume=True)), say=lambda *_: None)
    assert rest.step == 12
    assert np.array_equal(rest.model.params, whole_run.model.params)
    assert [r["loss"] for r in read_log(out / "log.jsonl")] == [r["loss"] for r in whole_run.history]


def test_fine_tuning_killed_mid_swap_resumes_exactly(tmp_path):
    records = F.arithmetic_examples(40, seed=1)
    texts = [json.dumps(r) for r in records]
    tok = Tokenizer.train(texts, 300, special_tokens=["<|endoftext|>"], progress=False)
    tok.save(tmp_path / "tok.json")
    data = tmp_path / "a.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    model_cfg = dict(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=32)
    cfg = dict(epochs=2, batch_size=8, lr=1e-2, checkpoint_interval=2)
    quiet = dict(progress=False, say=lambda *_: None)

    def fresh():
        llm = LLM(Model(ModelConfig(**model_cfg), seed=0), Tokenizer.load(tmp_path / "tok.json"))
        examples = F.read_examples(data, llm)
        return llm, examples[8:], examples[:8]

    llm, tr, val = fresh()
    whole = F.sft(llm, tr, val, F.SFTConfig(**cfg), out_dir=tmp_path / "whole", **quiet)
    _killed("swap", {"kind": "sft", "model": model_cfg, "tokenizer": str(tmp_path / "tok.json"), "data": str(data),
                     "config": cfg, "out": str(tmp_path / "cut")})
    llm, tr, val = fresh()
    resumed = F.sft(llm, tr, val, F.SFTConfig(**cfg, resume=True), out_dir=tmp_path / "cut", **quiet)
    assert [r["loss"] for r in resumed] == [r["loss"] for r in whole]
    assert np.array_equal(llm.model.params, LLM.load(tmp_path / "whole").model.params)


def test_a_full_disk_during_a_save_keeps_the_old_checkpoint_and_says_so(tmp_path, monkeypatch):
    import pyllm.io.checkpoint as ck

    folder = tmp_path / "checkpoint"
    write_checkpoint(folder, {"m": np.ones(4, np.float32)}, {"step": 1}, "t.safetensors", "state.json")

    def full(path, tensors):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck, "write_safetensors", full)
    with pytest.raises(OSError, match="could not write the checkpoint .* the previous one, if any, is intact") as info:
        write_checkpoint(folder, {"m": np.zeros(4, np.float32)}, {"step": 2}, "t.safetensors", "state.json")
    assert info.value.errno == errno.ENOSPC
    found = read_checkpoint(folder, "t.safetensors", "state.json")
    assert found.state == {"step": 1} and np.array_equal(found.tensors["m"], np.ones(4, np.float32))
    assert not (tmp_path / "checkpoint.tmp").exists()
    # The real writer's own I/O error (here: a file size limit, the same path as ENOSPC) is an OSError too.
    monkeypatch.undo()
    code = textwrap.dedent(f"""
        import resource, numpy as np
        from pyllm.io.checkpoint import write_checkpoint
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, resource.RLIM_INFINITY))
        try:
            write_checkpoint({str(folder)!r}, {{"m": np.ones(1 << 16, np.float32)}}, {{"step": 3}}, "t.safetensors",
                             "state.json")
        except OSError as exc:
            print("OSError", exc.errno, exc)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=OUTSIDE, timeout=120,
                         preexec_fn=lambda: signal.signal(signal.SIGXFSZ, signal.SIG_IGN))
    assert "OSError 27" in out.stdout and "previous one, if any, is intact" in out.stdout, out.stdout + out.stderr
    assert read_checkpoint(folder, "t.safetensors", "state.json").state == {"step": 1}


def test_sigterm_saves_a_checkpoint_as_ctrl_c_does(tmp_path, corpus):
    config = _train_config(tmp_path / "run", corpus, max_steps=100000, checkpoint_interval=100000, eval_interval=1000)
    code = textwrap.dedent("""
        import json, os, signal, sys, threading
        from pyllm.train import TrainConfig, TrainingInterrupted, train
        from pyllm.model import Model
        original, calls = Model.forward_backward, {"n": 0}
        def step(self, *a, **k):
            calls["n"] += 1
            if calls["n"] == 6:
                os.kill(os.getpid(), signal.SIGTERM)
            return original(self, *a, **k)
        Model.forward_backward = step
        try:
            train(TrainConfig(**json.loads(sys.argv[1])), say=lambda *_: None)
        except TrainingInterrupted as exc:
            print("interrupted:", exc)
    """)
    out = subprocess.run([sys.executable, "-c", code, json.dumps(config)], capture_output=True, text=True,
                         cwd=OUTSIDE, timeout=300)
    assert "interrupted:" in out.stdout and "SIGTERM: finishing this step" in out.stderr, out.stdout + out.stderr
    found = read_checkpoint(tmp_path / "run" / "checkpoint", MOMENTS, STATE)
    assert found is not None and found.state["step"] == 6
