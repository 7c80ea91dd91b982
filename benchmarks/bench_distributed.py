"""Data-parallel training on this machine: `pyllm train` at the GPT-2 124M shape as 1 process x 2
threads (2 micro-batches per step) against `mpirun -n 2` x 1 thread (1 micro-batch each; the same
global batch), replicated and ZeRO-1, each its tokens/s over the same steps; and the all-reduce of
the whole gradient (124M floats) timed on its own, against what the bucketed all-reduce leaves
exposed at the end of backward. Needs mpich and mpi4py (the test extra). Not a test.

Usage: python benchmarks/bench_distributed.py [--steps 8] [--block 256] [--batch 2]
Run with nothing else on the machine (and OPENBLAS_* unset): both cores are in use throughout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

VOCAB = 50304          # GPT-2's 50257 rounded up, as nanoGPT and llm.c do
SHAPE = ["--n-layer", "12", "--n-head", "12", "--n-embd", "768"]
MPIRUN = shutil.which("mpirun", path=str(Path(sys.executable).parent)) or shutil.which("mpirun")

ALLREDUCE = textwrap.dedent("""
    import sys, time
    import numpy as np
    from pyllm import distributed
    world = distributed.connect("mpi")
    grads = np.ones(int(sys.argv[1]), np.float32)
    times = []
    for _ in range(6):
        world.barrier()
        t0 = time.perf_counter()
        world.allreduce(grads)
        times.append(time.perf_counter() - t0)
    if world.rank == 0:
        print(sorted(times[1:])[len(times[1:]) // 2])
""")


def tokenizer_file(folder: Path) -> Path:
    """A byte-level BPE tokenizer of VOCAB tokens made without training (merges of byte pairs), so the
    model has GPT-2's embedding size whatever the corpus."""
    from pyllm.tokenizer import Tokenizer
    vocab = [bytes([b]) for b in range(256)]
    merges = []
    for a in range(256):
        for b in range(256):
            if len(vocab) == VOCAB - 1:
                break
            merges.append((a, b))
            vocab.append(bytes([a, b]))
    tok = Tokenizer(vocab + [b""], merges, "gpt2", {"<|endoftext|>": VOCAB - 1})
    path = folder / "tokenizer.json"
    tok.save(path)
    return path


def run(ranks: int, threads: int, out: Path, tok: Path, args, *extra) -> dict:
    cmd = [sys.executable, "-m", "pyllm", "train", "--out", str(out), "--tokenizer", str(tok), *SHAPE,
           "--block-size", str(args.block), "--batch-size", str(args.batch), "--max-steps", str(args.steps),
           "--eval-interval", "100000", "--checkpoint-interval", "100000", "--threads", str(threads),
           "--no-progress", "--sample-tokens", "0", *extra]
    if ranks > 1:
        cmd = [MPIRUN, "-n", str(ranks)] + cmd
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENBLAS_")}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tempfile.gettempdir(), env=env, timeout=3600)
    if proc.returncode:
        raise SystemExit(proc.stdout[-2000:] + proc.stderr[-4000:])
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steady = log[2:]   # step 1 allocates the buffers, step 2 settles
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
            "wait_s": statistics.median(r.get("comm_wait_s", 0.0) for r in steady),
            "loss": log[-1]["loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    if not MPIRUN:
        raise SystemExit("no mpirun: pip install mpich mpi4py")
    from pyllm import kernels
    from pyllm.model import ModelConfig
    from pyllm.models import parameter_specs
    import math
    cfg = ModelConfig(vocab_size=VOCAB, block_size=args.block, n_layer=12, n_head=12, n_embd=768)
    params = sum(math.prod(s.shape) for s in parameter_specs(cfg))
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = root / "corpus.txt"
        from pyllm.data import read_default_corpus
        data.write_text(read_default_corpus(4_000_000), encoding="utf-8")
        tok = tokenizer_file(root)
        common = ["--data", str(data)]
        one = run(1, 2, root / "one", tok, args, *common, "--grad-accum", "2")
        two = run(2, 1, root / "two", tok, args, *common, "--grad-accum", "1")
        zero = run(2, 1, root / "zero", tok, args, *common, "--grad-accum", "1", "--zero", "1")
        raw = subprocess.run([MPIRUN, "-n", "2", sys.executable, "-c", ALLREDUCE, str(params)], capture_output=True,
                             text=True, timeout=600, cwd=tmp)
        allreduce_s = float(raw.stdout.strip().splitlines()[-1]) if raw.returncode == 0 else float("nan")
    tokens = args.batch * args.block * 2
    print(f"CPU: {cpu} ({os.cpu_count()} cores), kernels {kernels.get_isa()}; GPT-2 124M shape "
          f"({params / 1e6:.1f}M parameters, {4 * params / 2 ** 20:.0f} MiB of gradients), "
          f"{tokens} tokens per step ({args.batch}x{args.block} per micro-batch, 2 per step), {args.steps} steps, "
          f"median of steps 3..{args.steps}\n")
    print("| run | tokens/s | vs 1 x 2 threads | communication waited for per step | last loss |")
    print("|---|---:|---:|---:|---:|")
    for name, r in (("1 process x 2 threads, --grad-accum 2", one), ("2 ranks x 1 thread, --grad-accum 1", two),
                    ("2 ranks x 1 thread, --zero 1", zero)):
        print(f"| {name} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / one['tokens_per_s']:.2f}x | "
              f"{1000 * r['wait_s']:.0f} ms | {r['loss']:.4f} |")
    print(f"\nOne blocking all-reduce of the whole gradient between the 2 ranks (MPICH, shared memory): "
          f"{1000 * allreduce_s:.0f} ms ({4 * params / allreduce_s / 1e9:.2f} GB/s of gradient); the bucketed "
          f"all-reduce left {1000 * two['wait_s']:.0f} ms of it waiting after backward.")


if __name__ == "__main__":
    main()
