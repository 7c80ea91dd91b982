"""Data-parallel training over MPI (pyllm.distributed, `mpirun -n 2 pyllm train`): on loopback with 2
ranks and small models, the loss curve of one process with twice the accumulation, with and without
ZeRO-1; the bucketed all-reduce against a plain sum; rank 0 the only writer; checkpoints that resume
with another number of ranks; a rank that dies or hangs ending the job with its name. Skipped, with
the reason, where no MPI is installed (the test extra installs mpich and mpi4py)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from pyllm import distributed

OUTSIDE = tempfile.gettempdir()
MPIRUN = shutil.which("mpirun", path=str(Path(sys.executable).parent)) or shutil.which("mpirun")
TEXT = "".join(f"def function_{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(3000))
SMALL = ["--vocab-size", "300", "--arch", "llama", "--n-layer", "2", "--n-head", "2", "--n-embd", "32",
         "--block-size", "32", "--batch-size", "4", "--eval-interval", "10", "--eval-batches", "4", "--no-progress",
         "--sample-tokens", "0", "--warmup-steps", "5", "--threads", "1"]


def _mpi_missing() -> str:
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "mpi4py is not installed (pip install \"pyllm[mpi]\")"
    return "" if MPIRUN else "no mpirun (pip install mpich)"


pytestmark = pytest.mark.skipif(bool(_mpi_missing()), reason=_mpi_missing() or "MPI present")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "code.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def _env(**extra):
    return {**os.environ, "PYLLM_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1", **extra}


def run(ranks: int, *args, env=None, timeout=240) -> subprocess.CompletedProcess:
    """`pyllm ARGS` in `ranks` processes (mpirun) or in one (ranks 0: no launcher at all)."""
    cmd = [sys.executable, "-m", "pyllm", *map(str, args)]
    if ranks:
        cmd = [MPIRUN, "-n", str(ranks)] + cmd
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=OUTSIDE, env=env or _env())


def train(ranks: int, out: Path, data: Path, *extra) -> list[dict]:
    proc = run(ranks, "train", "--data", data, "--out", out, *SMALL, *extra)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def _same_curve(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for key in ("loss", "lr", "grad_norm", "val_loss"):
        x = np.array([r.get(key, np.nan) for r in a], float)
        y = np.array([r.get(key, np.nan) for r in b], float)
        np.testing.assert_allclose(x, y, rtol=2e-4, atol=1e-5, err_msg=key)


def _weights(folder: Path) -> np.ndarray:
    from pyllm.model import Model
    return Model.from_pretrained(folder).params


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, data):
    """The reference: one process, 2 micro-batches per step, 20 steps (a checkpoint at 10)."""
    out = tmp_path_factory.mktemp("one") / "run"
    return out, train(0, out, data, "--grad-accum", "2", "--max-steps", "20", "--checkpoint-interval", "10")


@pytest.mark.parametrize("zero", ["0", "1"], ids=["replicated", "zero1"])
def test_two_ranks_give_the_curve_of_one_process_with_twice_the_accumulation(tmp_path, data, one_process, zero):
    out = tmp_path / "two"
    log = train(2, out, data, "--grad-accum", "1", "--max-steps", "20", "--zero", zero)
    reference_out, reference = one_process
    assert len(log) == 20 and all("comm_wait_s" in r for r in log)
    _same_curve(log, reference)
    np.testing.assert_allclose(_weights(out), _weights(reference_out), atol=2e-5)


def test_zero1_reports_its_memory_per_rank(tmp_path, data):
    proc = run(2, "train", "--data", data, "--out", tmp_path / "z", *SMALL, "--max-steps", "2", "--zero", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ZeRO-1: AdamW's m and v take" in proc.stdout and "MiB per rank instead of" in proc.stdout


BUCKETS = textwrap.dedent("""
    import sys
    import numpy as np
    from pyllm import distributed
    from pyllm.model import Model, ModelConfig

    world = distributed.connect("mpi")
    model = Model(ModelConfig(arch=sys.argv[1], vocab_size=64, block_size=16, n_layer=5, n_head=2, n_embd=32,
                              intermediate_size=40), seed=0)
    grads = model.grads
    grads[...] = np.random.default_rng(world.rank).standard_normal(grads.size).astype(np.float32) * 10 ** world.rank
    expected = grads.copy()
    world.allreduce(expected)                       # one plain sum of the whole buffer
    buckets = distributed.Buckets(world, grads, distributed.layer_groups(model), bucket_bytes=6000)
    for layer in reversed(range(model.config.n_layer)):
        buckets.layer_done(layer)
    before_finish = len(buckets.started)
    buckets.finish()
    covered = np.zeros(grads.size, int)
    for ranges in buckets.started:
        for start, size in ranges:
            covered[start:start + size] += 1
    assert (covered == 1).all(), "every gradient summed exactly once"
    assert before_finish >= 2, f"buckets must start during backward, got {before_finish}"
    assert np.array_equal(grads, expected), np.abs(grads - expected).max()
    print("ok", world.rank, len(buckets.started))
""")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_bucketed_allreduce_equals_a_plain_sum(arch):
    proc = subprocess.run([MPIRUN, "-n", "2", sys.executable, "-c", BUCKETS, arch], capture_output=True, text=True,
                          timeout=120, cwd=OUTSIDE, env=_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert proc.stdout.count("ok") == 2


def test_buckets_start_during_backward_in_a_real_step():
    """forward_backward calls layer_done once per layer, last layer first, after its gradients are
    complete (they no longer change until the step ends)."""
    from pyllm.model import Model, ModelConfig
    model = Model(ModelConfig(arch="llama", vocab_size=64, block_size=16, n_layer=3, n_head=2, n_embd=32,
                              intermediate_size=40), seed=0)
    per_layer, _ = distributed.layer_groups(model)
    seen, snapshots = [], {}

    def done(layer):
        seen.append(layer)
        snapshots[layer] = np.concatenate([model.grads[s:s + n] for s, n in per_layer[layer]])
    ids = np.random.default_rng(0).integers(0, 64, (2, 16))
    model.forward_backward(ids, ids, layer_done=done)
    assert seen == [2, 1, 0]
    for layer, snap in snapshots.items():
        final = np.concatenate([model.grads[s:s + n] for s, n in per_layer[layer]])
        assert np.array_equal(snap, final) and np.abs(final).sum() > 0


WRITE_GUARD = textwrap.dedent("""
    import os, sys
    out = os.path.realpath(sys.argv[1])
    rank = int(os.environ.get("PMI_RANK", "0"))

    def guard(event, args):
        if rank == 0:
            return
        if event == "open" and args[0] is not None and not isinstance(args[0], int):
            mode, flags = args[1] or "r", args[2]
            writes = any(c in mode for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
            if writes and os.path.realpath(os.fsdecode(args[0])).startswith(out):
                raise PermissionError(f"rank {rank} wrote {args[0]}")
        if event in ("os.rename", "os.replace", "os.mkdir", "os.remove", "shutil.rmtree") and \\
                os.path.realpath(os.fsdecode(args[0])).startswith(out):
            raise PermissionError(f"rank {rank}: {event} {args[0]}")
    sys.addaudithook(guard)
    import safetensors.numpy
    real = safetensors.numpy.save_file
    def save_file(*a, **k):
        if rank != 0:
            raise PermissionError(f"rank {rank} wrote safetensors")
        return real(*a, **k)
    safetensors.numpy.save_file = save_file
    from pyllm.cli import main
    sys.exit(main(sys.argv[2:]))
""")


def test_only_rank_0_writes(tmp_path, data):
    """Every write into the output folder by a rank other than 0 raises (an audit hook and the
    safetensors writer guarded), and the run still finishes: the others write nothing. Rank 0
    trains the tokenizer and tokenizes; the others get both as buffers."""
    out = tmp_path / "run"
    args = ["train", "--data", str(data), "--out", str(out), *SMALL, "--max-steps", "12", "--checkpoint-interval", "5"]
    proc = subprocess.run([MPIRUN, "-n", "2", sys.executable, "-c", WRITE_GUARD, str(out), *args], capture_output=True,
                          text=True, timeout=240, cwd=OUTSIDE, env=_env())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("training a 300-token BPE tokenizer") == 1    # rank 0 alone
    assert {p.name for p in out.iterdir()} >= {"log.jsonl", "checkpoint", "config.json", "model.safetensors",
                                                 "tokenizer.json", "report.html", "data"}
    assert len((out / "log.jsonl").read_text().splitlines()) == 12


def test_a_checkpoint_of_two_ranks_resumes_in_one_process_and_the_reverse(tmp_path, data, one_process):
    reference_out, reference = one_process
    # 2 ranks x 1 micro-batch for 10 steps (of a 20-step schedule), then one process goes on.
    a = tmp_path / "a"
    train(2, a, data, "--grad-accum", "1", "--max-steps", "20", "--stop-at-step", "10")
    log = train(0, a, data, "--resume", "--max-steps", "20")
    _same_curve(log, reference)
    np.testing.assert_allclose(_weights(a), _weights(reference_out), atol=2e-5)
    # One process with 2 micro-batches for 10 steps, then 2 ranks (ZeRO-1) go on.
    b = tmp_path / "b"
    train(0, b, data, "--grad-accum", "2", "--max-steps", "20", "--stop-at-step", "10")
    log = train(2, b, data, "--resume", "--max-steps", "20", "--zero", "1")
    _same_curve(log, reference)
    np.testing.assert_allclose(_weights(b), _weights(reference_out), atol=2e-5)


def test_a_global_batch_the_ranks_cannot_share_is_refused(tmp_path, data):
    out = tmp_path / "c"
    train(0, out, data, "--grad-accum", "1", "--max-steps", "4")
    proc = run(2, "train", "--data", data, "--out", out, *SMALL, "--resume", "--max-steps", "8", "--extend-schedule")
    assert proc.returncode != 0
    assert "2 ranks cannot share that out evenly" in proc.stderr and "divides 1" in proc.stderr
    assert proc.stderr.count("cannot share") == 1   # said once, by rank 0


def _rank_pid(marker: str, rank: int, deadline_s: float = 60.0) -> int:
    """The pid of the process of `rank` whose command line holds `marker` (from /proc)."""
    deadline = time.time() + deadline_s
    while time.time() < deadline:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmd = (entry / "cmdline").read_bytes()
                env = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if marker.encode() in cmd and b"mpirun" not in cmd.split(b"\0")[0] and f"PMI_RANK={rank}".encode() in env:
                return int(entry.name)
        time.sleep(0.1)
    raise AssertionError(f"no rank {rank} process of {marker}")


def _start_long_run(out: Path, data: Path, timeout_s: str) -> subprocess.Popen:
    cmd = [MPIRUN, "-n", "2", sys.executable, "-m", "pyllm", "train", "--data", str(data), "--out", str(out), *SMALL,
           "--max-steps", "100000", "--checkpoint-interval", "20", "--eval-interval", "100000"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=OUTSIDE,
                            env=_env(PYLLM_MPI_TIMEOUT=timeout_s))


def _after_some_steps(out: Path, steps: int = 30, deadline_s: float = 120.0) -> None:
    deadline = time.time() + deadline_s
    while time.time() < deadline:
        log = out / "log.jsonl"
        if log.is_file() and len(log.read_text().splitlines()) >= steps:
            return
        time.sleep(0.1)
    raise AssertionError("the run did not get going")


@pytest.mark.parametrize("fault", ["kill", "hang"])
def test_a_rank_that_dies_or_hangs_ends_the_job_naming_it(tmp_path, data, fault):
    out = tmp_path / fault
    job = _start_long_run(out, data, "4")
    victim = None
    try:
        _after_some_steps(out)
        victim = _rank_pid(str(out), 1)
        started = time.time()
        os.kill(victim, signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
        stdout, stderr = job.communicate(timeout=60)
        took = time.time() - started
    finally:
        if victim is not None and fault == "hang":
            try:
                os.kill(victim, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if job.poll() is None:
            job.kill()
            job.communicate()
    assert job.returncode != 0
    assert took < 30, took                                   # bounded: the 4 s timeout, not a hang
    assert f"rank 1: {victim}" in stdout                     # the start-up line maps process ids to ranks
    if fault == "hang":
        assert "rank(s) 1" in stderr and "got no answer within 4 s" in stderr, stderr[-2000:]
    else:
        assert str(victim) in stdout + stderr and ("KILLED" in stdout + stderr or "Killed" in stdout + stderr)
    # The last checkpoint is whole: it resumes in one process.
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] >= 20 and state["step"] % 20 == 0
    log = train(0, out, data, "--resume", "--stop-at-step", str(state["step"] + 2))
    assert [r["step"] for r in log][-2:] == [state["step"] + 1, state["step"] + 2]


def test_ctrl_c_on_mpirun_saves_and_stops_every_rank_at_the_same_step(tmp_path, data):
    out = tmp_path / "int"
    job = _start_long_run(out, data, "30")
    try:
        _after_some_steps(out)
        job.send_signal(signal.SIGINT)
        stdout, stderr = job.communicate(timeout=60)
    finally:
        if job.poll() is None:
            job.kill()
            job.communicate()
    assert job.returncode == 130, stderr[-2000:]
    steps = len((out / "log.jsonl").read_text().splitlines())
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == steps and stderr.count("pyllm train: interrupted at step") == 1


def test_without_mpi4py_a_launcher_gets_a_clear_error(monkeypatch):
    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    assert distributed.launched_by_mpirun()
    with pytest.raises(distributed.DistributedError, match=r'pip install "pyllm\[mpi\]"'):
        distributed.connect("auto")
    assert distributed.connect("none").size == 1
    with pytest.raises(ValueError, match="distributed must be one of"):
        distributed.connect("tcp")


def test_shards_cover_the_buffer():
    for total, size in ((10, 3), (1000, 2), (17, 4), (5, 8)):
        counts = distributed.shard_counts(total, size)
        assert sum(counts) == total and len(counts) == size and all(c >= 0 for c in counts)
        filled = [c for c in counts if c]
        assert all(c % 16 == 0 for c in filled[:-1]) and counts[:len(filled)] == filled   # empty ones last


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_finetuning_on_two_ranks_follows_one_process(tmp_path, data, method):
    """`mpirun -n 2 pyllm finetune`: each rank takes every other example of a batch (SFT weighted by
    its learned tokens, DPO by its pairs), so the log is one process's."""
    base = tmp_path / "base"
    train(0, base, data, "--max-steps", "3", "--block-size", "128")
    examples = tmp_path / f"{method}.jsonl"
    common = ["--model", base, "--data", examples, "--epochs", "1", "--batch-size", "4", "--lr", "1e-3",
              "--lora-rank", "4", "--no-progress"]
    one = run(0, "finetune", method, *common, "--out", tmp_path / "one", "--example", "24")
    assert one.returncode == 0, one.stderr[-2000:]
    two = run(2, "finetune", method, *common, "--out", tmp_path / "two")
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("tuned model in") == 1   # rank 0 alone reports
    logs = [[json.loads(line) for line in (tmp_path / name / "finetune_log.jsonl").read_text().splitlines()]
            for name in ("one", "two")]
    assert len(logs[0]) == 6
    keys = ["loss", "grad_norm"] + (["reward_margin", "accuracy"] if method == "dpo" else [])
    for key in keys:
        np.testing.assert_allclose([r[key] for r in logs[1]], [r[key] for r in logs[0]], rtol=2e-4, atol=2e-5,
                                   err_msg=key)
