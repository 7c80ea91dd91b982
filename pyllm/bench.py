"""`pyllm bench`: a one-minute look at the C++ kernels against their numpy twins on this machine,
and `pyllm bench --profile decode`: where a decode step's time goes, operation by operation.

Not the benchmark suite: benchmarks/ (pytest-benchmark) holds the full set of shapes and the
numbers the README reports; this is the quick check a user runs after installing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from pyllm import kernels, reference
from pyllm.models import STEP_OPERATIONS, KVCache


@dataclass
class BenchResult:
    name: str
    pyllm_ms: float    # median wall time of one call
    numpy_ms: float
    flops: float       # per call; 0 when not meaningful (memory-bound kernels)

    @property
    def speedup(self) -> float:
        return self.numpy_ms / self.pyllm_ms


def _median_ms(fn: Callable[[], object], min_time: float) -> float:
    fn()  # warm-up: page faults, thread start-up
    times: list[float] = []
    deadline = time.perf_counter() + min_time
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 50):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def _cases(scale: float):
    """(name, flops, call(module)) for each kernel, GPT-2-small shapes shrunk by `scale`."""
    rng = np.random.default_rng(0)
    N, C = max(1, int(2048 * scale)), 768
    B, NH, T, HS = max(1, int(8 * scale)), 12, 256, 64
    x = rng.standard_normal((N, C), dtype=np.float32)
    w = rng.standard_normal((C, 4 * C), dtype=np.float32)
    h = rng.standard_normal((N, 4 * C), dtype=np.float32)
    ln_w, ln_b = np.ones(C, np.float32), np.zeros(C, np.float32)
    q, k, v = (rng.standard_normal((B, NH, T, HS), dtype=np.float32) for _ in range(3))
    logits = rng.standard_normal((max(1, N // 4), 50257), dtype=np.float32)
    targets = rng.integers(0, 50257, logits.shape[0])

    def attention_train(m):
        out, lse = m.attention_forward(q, k, v)
        return m.attention_backward(q, q, k, v, out, lse)

    pairs = B * NH * T * (T + 1) / 2
    return [
        (f"matmul ({N},{C})@({C},{4 * C})", 2.0 * N * C * 4 * C, lambda m: m.matmul(x, w)),
        (f"attention fwd+bwd ({B},{NH},{T},{HS})", 14.0 * HS * pairs, attention_train),
        (f"layernorm ({N},{C})", 0.0, lambda m: m.layernorm(x, ln_w, ln_b)),
        (f"gelu ({N},{4 * C})", 0.0, lambda m: m.gelu(h)),
        (f"softmax ({N},{4 * C})", 0.0, lambda m: m.softmax(h)),
        (f"cross_entropy {logits.shape}", 0.0, lambda m: m.cross_entropy(logits, targets)),
    ]


def run(scale: float = 1.0, min_time: float = 0.5) -> list[BenchResult]:
    """Times each kernel in C++ and in numpy on the same inputs.

    >>> [r.name.split()[0] for r in run(scale=0.05, min_time=0.0)][:2]
    ['matmul', 'attention']
    """
    results = []
    for name, flops, call in _cases(scale):
        ours = _median_ms(lambda: call(kernels), min_time)
        theirs = _median_ms(lambda: call(reference), min_time)
        results.append(BenchResult(name, ours, theirs, flops))
    return results


def format_table(results: list[BenchResult]) -> str:
    lines = [f"{'kernel':42s} {'pyllm ms':>9s} {'numpy ms':>9s} {'speedup':>8s} {'pyllm GFLOP/s':>14s}"]
    for r in results:
        gflops = f"{r.flops / r.pyllm_ms / 1e6:14.1f}" if r.flops else f"{'-':>14s}"
        lines.append(f"{r.name:42s} {r.pyllm_ms:9.2f} {r.numpy_ms:9.2f} {r.speedup:7.1f}x {gflops}")
    return "\n".join(lines)


@dataclass
class DecodeProfile:
    tokens_per_s: float         # decoding with the profile off
    ms_per_token: dict          # operation -> milliseconds per token (profile on)
    context: int                # positions in the cache when decoding started
    bytes_per_token: int        # what a step reads (Model.bytes_per_token half-way through)
    read_gbps: float            # the machine's measured memory read bandwidth

    def table(self) -> str:
        total = sum(self.ms_per_token.values())
        gbps = self.bytes_per_token * self.tokens_per_s / 1e9
        lines = [f"decode after {self.context} positions: {self.tokens_per_s:.1f} tokens/s "
                 f"({1e3 / self.tokens_per_s:.3f} ms a token), reading {self.bytes_per_token / 1e6:.1f} MB a token: "
                 f"{gbps:.1f} GB/s, {100 * gbps / self.read_gbps:.0f}% of the {self.read_gbps:.1f} GB/s this "
                 f"machine reads; with the profile on:",
                 f"{'operation':12s} {'ms/token':>9s} {'share':>6s}"]
        for op, ms in sorted(self.ms_per_token.items(), key=lambda kv: -kv[1]):
            lines.append(f"{op:12s} {ms:9.3f} {100 * ms / total:5.1f}%")
        lines.append(f"{'total':12s} {total:9.3f}")
        return "\n".join(lines)


def profile_decode(model, prompt: list, tokens: int = 100) -> DecodeProfile:
    """Greedy decoding of `tokens` tokens after `prompt` twice: timed as a whole, then with the C++
    step's per-operation clock on (operations named as pyllm.models.STEP_OPERATIONS)."""
    if not prompt or tokens < 1:
        raise ValueError("profile_decode needs a prompt and at least one token")
    capacity = len(prompt) + tokens + 1
    if capacity > model.config.block_size:
        raise ValueError(f"{len(prompt)} prompt tokens and {tokens} new ones do not fit the "
                         f"{model.config.block_size}-token context")

    def run(profile):
        cache = KVCache(model.config, 1, capacity, model.kv_dtype)
        logits = model.forward_step(np.asarray([prompt], np.int64), cache)
        token = np.array([[int(np.argmax(logits[0]))]], np.int64)
        start = time.perf_counter()
        for _ in range(tokens):
            logits = model.forward_step(token, cache, profile=profile)
            token[0, 0] = int(np.argmax(logits[0]))
        return time.perf_counter() - start

    run(None)                           # warm-up: buffers, the plan, page faults
    elapsed = run(None)
    profile = np.zeros(len(STEP_OPERATIONS))
    run(profile)
    return DecodeProfile(tokens / elapsed, {op: 1e-6 * ns / tokens for op, ns in zip(STEP_OPERATIONS, profile) if ns},
                         len(prompt), model.bytes_per_token(len(prompt) + tokens // 2),
                         max(kernels.measure_read_bandwidth(0.2) for _ in range(3)))   # shared hosts only lower it

