"""`pyllm bench`: a one-minute look at the C++ kernels against their numpy twins on this machine.

Not the benchmark suite: benchmarks/ (pytest-benchmark) holds the full set of shapes and the
numbers the README reports; this is the quick check a user runs after installing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from pyllm import kernels, reference


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
