"""Every pyllm.kernels function timed against its numpy twin (pyllm.reference) on GPT-2-small shapes.

Not a correctness suite (tests/ covers edge cases and every ISA): each benchmark only checks that the
two implementations agree on its own inputs, so that no number here times a wrong answer.

Each case below is one benchmark group ("kernel shape") with two members, impl=pyllm and impl=numpy,
run on the same seeded inputs. extra_info carries what benchmarks/report.py needs: the FLOP count,
GFLOP/s (= flops / median time), the speedup target, and for matmul the % of the measured FMA peak.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest

import pyllm.kernels as kernels
import pyllm.reference as reference
from conftest import THREADS, set_numpy_blas_threads

# Shape legend (pyllm.reference's): B batch, T time, C channels, V vocabulary, NH heads, HS head size,
# N rows (B*T). GPT-2 small (C=768, NH=12, HS=64, V=50257) at B=8 sequences of T=256 tokens.
B, T, C, NH, HS, V = 8, 256, 768, 12, 64, 50257
N = B * T                    # 2048 rows through every per-token layer
FF = 4 * C                   # 3072: the MLP's hidden width
CE_N = 512                   # cross-entropy rows: (512, 50257) logits are 103 MB, (2048, V) would be 412 MB
ADAMW_N = 10_000_000         # AdamW over 10M parameters (GPT-2 small has 124M; the rate is what counts)

MATMUL_TARGET = 0.9          # pyllm's GEMM against OpenBLAS: near parity is the goal
ATTENTION_TRAIN_TARGET = 5.0 # fused causal attention fwd+bwd against numpy's full T x T matrices
COPY_TARGET = 1.0            # a pure copy (kv_write): numpy's strided copy moves the same bytes
DEFAULT_TARGET = 3.0         # everything else


@dataclass(frozen=True)
class Case:
    """One benchmark group: a kernel call on fixed inputs, timed for pyllm and for numpy."""

    name: str                      # kernel name, or "kernel fwd+bwd", or the matmul product timed
    shape: str                     # what it runs on, as printed in the report
    inputs: Callable[[], tuple]    # fresh seeded arrays; called anew wherever inputs are needed
    call: Callable                 # call(module, *inputs) -> result, module = kernels or reference
    uses: tuple[str, ...]          # the pyllm.kernels names it calls; a missing one skips the case
    flops: float                   # the same count for both sides (nominal for non-GEMM kernels)
    target: float = DEFAULT_TARGET # speedup (numpy time / pyllm time) the row should reach
    numpy_call: Callable | None = None  # call(*inputs) for numpy when it is not reference's twin
    rtol: float = 1e-4
    atol: float = 1e-5             # multiplied by max |numpy result|: judged at the output's scale
    inplace: bool = False          # updates its inputs: results compared after one call on fresh ones
    numpy_blas_threads: int | None = None  # numpy at its best when that is fewer BLAS threads

    @property
    def group(self) -> str:
        return f"{self.name} {self.shape}"

    def fn(self, impl: str) -> Callable:
        if impl == "numpy" and self.numpy_call is not None:
            return self.numpy_call
        return functools.partial(self.call, kernels if impl == "pyllm" else reference)


def twin(name: str, shape: str, inputs: Callable[[], tuple], flops: float, **kw) -> Case:
    """A case whose kernel is called identically in pyllm.kernels and pyllm.reference."""
    return Case(name, shape, inputs, lambda m, *a: getattr(m, name)(*a), (name,), flops, **kw)


def randn(rng: np.random.Generator, *shape: int, scale: float = 1.0) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)


def seeded(make: Callable[[np.random.Generator], tuple]) -> Callable[[], tuple]:
    """inputs() that builds the same arrays on every call (seed 0)."""
    return lambda: make(np.random.default_rng(0))


# ----------------------------------------------------------------------------- matmul

def matmul_cases() -> list[Case]:
    M, K, Nn = N, C, FF   # the MLP's first projection: x (2048, 768) @ W (768, 3072)
    gemm = 2.0 * M * K * Nn
    mm = dict(target=MATMUL_TARGET)

    def a_at_dout(r):
        a = randn(r, M, K)
        return a, np.ascontiguousarray(a.T), randn(r, M, Nn)

    return [
        Case("matmul", f"({M},{K})@({K},{Nn})+bias",
             seeded(lambda r: (randn(r, M, K), randn(r, K, Nn), randn(r, Nn))),
             lambda m, a, b, bias: m.matmul(a, b, bias), ("matmul",), gemm + M * Nn, **mm),
        Case("matmul", f"({M // 2},{K})@({K},{Nn})",
             seeded(lambda r: (randn(r, M // 2, K), randn(r, K, Nn))),
             lambda m, a, b: m.matmul(a, b), ("matmul",), gemm / 2, **mm),
        # Llama's layout: weights stored (out, in), forward is x @ W^T.
        Case("matmul trans_b", f"({M},{K})@({Nn},{K})^T",
             seeded(lambda r: (randn(r, M, K), randn(r, Nn, K))),
             lambda m, a, w: m.matmul(a, w, trans_b=True), ("matmul",), gemm, **mm),
        # The two products of the backward pass, each against numpy's own best spelling of it.
        # da = dout @ W^T: pyllm's trans_b path on W (768, 3072) as stored.
        Case("matmul da=dout@W^T", f"({M},{Nn})@({K},{Nn})^T",
             seeded(lambda r: (randn(r, M, Nn), randn(r, K, Nn))),
             lambda m, dout, w: m.matmul(dout, w, trans_b=True), ("matmul",), gemm,
             numpy_call=lambda dout, w: dout @ w.T, **mm),
        # dW = A^T @ dout: matmul has no trans_a flag, so pyllm gets A^T as a contiguous copy made
        # outside the timed call; this row times the GEMM itself (matmul_backward below times the
        # real thing, which reads A through strides). numpy gets the a.T view, which BLAS takes as is.
        Case("matmul dW=A^T@dout", f"({K},{M})@({M},{Nn})", seeded(a_at_dout),
             lambda m, a, a_t, dout: m.matmul(a_t, dout), ("matmul",), gemm,
             numpy_call=lambda a, a_t, dout: a.T @ dout, **mm),
        Case("matmul_backward", f"({M},{K})@({K},{Nn})+bias",
             seeded(lambda r: (randn(r, M, Nn), randn(r, M, K), randn(r, K, Nn))),
             lambda m, dout, a, b: m.matmul_backward(dout, a, b, bias=True), ("matmul_backward",),
             2 * gemm + M * Nn, **mm),
    ]


# ----------------------------------------------------------------------------- softmax, norms

# Non-GEMM FLOP counts are nominal, per element, counting exp/tanh/sqrt/div as one each; both sides
# get the same count, so the GFLOP/s ratio is the speedup. These kernels are bound by memory anyway.

def softmax_cases() -> list[Case]:
    rows, cols = 8192, 1024          # 8.4M values: 8 sequences x 1024 positions of 1024-wide score rows
    n = rows * cols
    return [
        twin("softmax", f"({rows},{cols})", seeded(lambda r: (randn(r, rows, cols, scale=3.0),)),
             5.0 * n),   # max, subtract, exp, sum, scale
        twin("softmax_backward", f"({rows},{cols})",
             seeded(lambda r: (randn(r, rows, cols), reference.softmax(randn(r, rows, cols, scale=3.0)))),
             4.0 * n),   # dout*y, row sum, subtract, multiply
    ]


def norm_cases() -> list[Case]:
    n = N * C
    shape = f"({N},{C})"

    def ln(r):
        x, w, b = randn(r, N, C), 1.0 + randn(r, C, scale=0.1), randn(r, C, scale=0.1)
        return x, w, b

    def ln_bwd(r):
        x, w, b = ln(r)
        _, mean, rstd = reference.layernorm_forward(x, w, b)
        return randn(r, N, C), x, w, mean, rstd

    def rms(r):
        return randn(r, N, C), 1.0 + randn(r, C, scale=0.1)

    def rms_bwd(r):
        x, w = rms(r)
        return randn(r, N, C), x, w, reference.rmsnorm_forward(x, w)[1]

    return [
        twin("layernorm", shape, seeded(ln), 7.0 * n),           # sum, sub, sq, sum, *rstd, *w, +b
        twin("layernorm_forward", shape, seeded(ln), 7.0 * n),
        twin("layernorm_backward", shape, seeded(ln_bwd), 13.0 * n),
        twin("rmsnorm", shape, seeded(rms), 4.0 * n),            # sq, sum, *rstd, *w
        twin("rmsnorm_forward", shape, seeded(rms), 4.0 * n),
        twin("rmsnorm_backward", shape, seeded(rms_bwd), 9.0 * n),
    ]


# ----------------------------------------------------------------------------- activations

def activation_cases() -> list[Case]:
    n = N * FF
    shape = f"({N},{FF})"
    one = seeded(lambda r: (randn(r, N, FF),))
    two = seeded(lambda r: (randn(r, N, FF), randn(r, N, FF)))
    three = seeded(lambda r: (randn(r, N, FF), randn(r, N, FF), randn(r, N, FF)))
    return [
        twin("gelu", shape, one, 9.0 * n),
        twin("gelu_backward", shape, two, 16.0 * n),
        twin("silu", shape, one, 4.0 * n),                       # exp, add, div, mul
        twin("silu_backward", shape, two, 8.0 * n),
        twin("swiglu", shape, two, 5.0 * n),
        twin("swiglu_backward", shape, three, 12.0 * n),
        twin("geglu", shape, two, 10.0 * n),
        twin("geglu_backward", shape, three, 20.0 * n),
    ]


# ----------------------------------------------------------------------------- rotary embedding

def rope_cases() -> list[Case]:
    n = B * NH * T * HS
    shape = f"({B},{NH},{T},{HS})"
    tables_T, tables_HS = 4096, 128   # a long-context Llama table: 4096 positions x 64 angles

    def rope_in(r):
        return (randn(r, B, NH, T, HS),) + reference.rope_tables(T, HS)

    return [
        twin("rope_tables", f"({tables_T},{tables_HS})", lambda: (tables_T, tables_HS),
             3.0 * tables_T * tables_HS / 2),                    # angle, cos, sin
        twin("rope", shape, seeded(rope_in), 3.0 * n),            # 4 mul + 2 add per pair
        twin("rope_backward", shape, seeded(rope_in), 3.0 * n),
    ]


# ----------------------------------------------------------------------------- attention

def attention_cases() -> list[Case]:
    shape = f"({B},{NH},{T},{HS}) causal"
    pairs = B * NH * T * (T + 1) / 2           # (query, key) pairs the causal mask keeps
    fwd = 4.0 * HS * pairs                       # q k^T and p v: 2 flops per multiply-add each
    bwd = 10.0 * HS * pairs                      # recomputed q k^T, dv, dp, dq, dk
    # softmax then two more GEMMs: errors compound. numpy's twin runs 96 small per-head GEMMs,
    # which OpenBLAS does faster and far more steadily on one thread than on two (measured here:
    # fwd+bwd ~0.27 s on one thread, 0.3-4 s on two), so numpy gets its better setting.
    loose = dict(rtol=1e-3, atol=1e-4, numpy_blas_threads=1)

    def qkv(r):
        return randn(r, B, NH, T, HS), randn(r, B, NH, T, HS), randn(r, B, NH, T, HS)

    def bwd_in(r):
        q, k, v = qkv(r)
        out, lse = reference.attention_forward(q, k, v)
        return randn(r, B, NH, T, HS), q, k, v, out, lse

    def train(m, q, k, v, dout):
        out, lse = m.attention_forward(q, k, v)
        return (out, lse) + tuple(m.attention_backward(dout, q, k, v, out, lse))

    return [
        twin("attention", shape, seeded(qkv), fwd),
        twin("attention_forward", shape, seeded(qkv), fwd),
        twin("attention_backward", shape, seeded(bwd_in), bwd, **loose),
        Case("attention fwd+bwd", shape, seeded(lambda r: qkv(r) + (randn(r, B, NH, T, HS),)),
             train, ("attention_forward", "attention_backward"), fwd + bwd,
             target=ATTENTION_TRAIN_TARGET, **loose),
    ]


# ----------------------------------------------------------------------------- cross-entropy

def cross_entropy_cases() -> list[Case]:
    n = CE_N * V
    shape = f"({CE_N},{V})"

    def logits_targets(r):
        targets = r.integers(0, V, CE_N)
        targets[::16] = -100                     # some ignored rows, as padding makes them
        return randn(r, CE_N, V, scale=2.0), targets

    def bwd_in(r):
        logits, targets = logits_targets(r)
        return logits, targets, reference.cross_entropy_forward(logits, targets)[1]

    def train(m, logits, targets):
        losses, lse = m.cross_entropy_forward(logits, targets)
        return losses, lse, m.cross_entropy_backward(logits, targets, lse)

    return [
        twin("cross_entropy", shape, seeded(logits_targets), 4.0 * n),   # max, sub, exp, sum
        twin("cross_entropy_forward", shape, seeded(logits_targets), 4.0 * n),
        twin("cross_entropy_backward", shape, seeded(bwd_in), 3.0 * n),  # sub, exp, scale
        Case("cross_entropy fwd+bwd", shape, seeded(logits_targets), train,
             ("cross_entropy_forward", "cross_entropy_backward"), 7.0 * n),
    ]


# ----------------------------------------------------------------------------- embedding, adamw

def embedding_cases() -> list[Case]:
    shape = f"ids ({B},{T}) into ({V},{C})"
    return [
        twin("embedding", shape,
             seeded(lambda r: (r.integers(0, V, (B, T)), randn(r, V, C))), 0.0),  # a gather: no flops
        twin("embedding_backward", shape,
             seeded(lambda r: (randn(r, B, T, C), r.integers(0, V, (B, T)), V)), 1.0 * N * C),
        # Training's call: rows added into the existing (V, C) gradient buffer, so the 154 MB
        # fresh zeroed array (which dominates the row above, on both sides) is not what is timed.
        Case("embedding_backward into dweight", shape,
             seeded(lambda r: (randn(r, B, T, C), r.integers(0, V, (B, T)), randn(r, V, C))),
             lambda m, dout, ids, dw: m.embedding_backward(dout, ids, V, dweight=dw),
             ("embedding_backward",), 1.0 * N * C, inplace=True),
    ]


def adamw_cases() -> list[Case]:
    def state(r):   # param, grad, m, v
        return (randn(r, ADAMW_N), randn(r, ADAMW_N), randn(r, ADAMW_N, scale=0.1),
                np.abs(randn(r, ADAMW_N, scale=0.1)))

    def step(m, param, grad, m1, v):
        m.adamw(param, grad, m1, v, lr=1e-3, step=10, weight_decay=0.1)
        return param, m1, v

    return [Case("adamw", f"({ADAMW_N},)", seeded(state), step, ("adamw",),
                 18.0 * ADAMW_N, inplace=True)]   # moments 7, bias corrections 2, sqrt/div 3, decay+step 6


def sampling_cases() -> list[Case]:
    """One draw per decode step from a vocabulary-sized row: chat's default (temperature 0.8,
    top-k 50) and nucleus sampling (top-p 0.9), with a repetition penalty over 200 tokens."""
    def row(r):
        return (randn(r, 1, V, scale=3.0),)

    def draw(options):
        history = np.arange(0, 2000, 10)[None, :]
        return lambda m, logits: m.sample(logits, seed=np.array([7], np.uint64), step=3, history=history, **options)

    return [Case("sample", f"(1, {V}) {label}", seeded(row), draw(options), ("sample",), 5.0 * V, rtol=0, atol=0)
            for label, options in (("top-k 50", dict(temperature=0.8, top_k=50, repetition_penalty=1.1)),
                                   ("top-p 0.9", dict(temperature=0.8, top_p=0.9, repetition_penalty=1.1)))]


# ----------------------------------------------------------------------------- decode-step kernels

def decode_cases() -> list[Case]:
    """What a batched step over a KV cache adds to the model's products: rope at each row's own
    position, and the new keys appended to the cache; 8 rows of 12 heads of 64, a 1024-position
    cache, 1 new token per row (decode) and 256 (a prefill)."""
    cap, lengths = 1024, np.arange(B, dtype=np.int64) * 90
    cases = []
    for new in (1, T):
        def rope_in(r, new=new):
            return (randn(r, B, new, NH, HS),) + reference.rope_tables(cap, HS) + (lengths,)

        def cache_in(r, new=new):
            return randn(r, B, NH, cap, HS), randn(r, B, new, NH, HS), lengths

        def append(m, cache, src, pos0):
            m.kv_write(cache, src, pos0)
            return cache

        shape = f"({B},{new},{NH},{HS})"
        cases += [twin("rope_at", f"{shape} at ragged positions", seeded(rope_in), 3.0 * B * new * NH * HS),
                  Case("kv_write", f"{shape} into ({B},{NH},{cap},{HS})", seeded(cache_in), append, ("kv_write",),
                       float(B * new * NH * HS), target=COPY_TARGET, inplace=True, rtol=0, atol=0)]
    return cases


# ----------------------------------------------------------------------------- quantized weights

# SmolLM2-135M's projections (N, K): gate/up in Q4_1 (the default file's type), down in Q4_K (K of
# 576 is not whole 256-value super-blocks: llama.cpp's Q4_K_M keeps those in other types).
QUANT_SHAPES = {"Q4_1": (1536, 576), "Q4_K": (576, 1536)}


def quantized_blocks(r: np.random.Generator, ggml_type: int, N: int, K: int) -> np.ndarray:
    """Random but valid ggml blocks: random packed values, finite float16 scales where the layout
    keeps them (the layouts as pyllm.reference states them)."""
    values, nbytes = reference.BLOCKS[ggml_type]
    blocks = r.integers(0, 256, (N * K // values, nbytes), dtype=np.uint8)
    scales = {reference.Q8_0: (0,), reference.Q4_0: (0,), reference.Q4_1: (0, 2), reference.Q5_0: (0,),
              reference.Q5_1: (0, 2), reference.Q4_K: (0, 2), reference.Q6_K: (208,)}[ggml_type]
    for at in scales:
        blocks[:, at:at + 2] = (r.uniform(0.001, 0.01, (len(blocks), 1)).astype(np.float16)).view(np.uint8)
    return blocks.reshape(N, -1)


def quant_cases() -> list[Case]:
    cases = []
    for name, (N, Kd) in QUANT_SHAPES.items():
        ggml_type = {"Q4_1": reference.Q4_1, "Q4_K": reference.Q4_K}[name]
        for M, label in ((1, "decode"), (128, "prompt")):
            def inputs(r, M=M, N=N, Kd=Kd, ggml_type=ggml_type):
                return randn(r, M, Kd), quantized_blocks(r, ggml_type, N, Kd)

            def call(m, a, w, N=N, Kd=Kd, ggml_type=ggml_type):
                return m.matmul_quant(a, w, ggml_type, (N, Kd), True)

            cases.append(Case("matmul_quant", f"{name} ({M},{Kd})@({N},{Kd})^T {label}, int8 activations",
                              seeded(inputs), call, ("matmul_quant",), 2.0 * M * N * Kd, rtol=1e-3, atol=1e-4))
    return cases


CASES = (matmul_cases() + softmax_cases() + norm_cases() + activation_cases() + rope_cases()
         + attention_cases() + cross_entropy_cases() + embedding_cases() + adamw_cases() + sampling_cases()
         + decode_cases() + quant_cases())


# ----------------------------------------------------------------------------- the benchmark

def leaves(result) -> list:
    return [x for r in result for x in leaves(r)] if isinstance(result, (tuple, list)) else [result]


def assert_agree(case: Case, ours, theirs) -> None:
    """pyllm's result against numpy's: same structure, shapes, float32, and values within tolerance."""
    ours, theirs = leaves(ours), leaves(theirs)
    assert len(ours) == len(theirs), f"{case.group}: {len(ours)} outputs vs numpy's {len(theirs)}"
    for i, (a, e) in enumerate(zip(ours, theirs)):
        if e is None:
            assert a is None, f"{case.group} output {i}: expected None"
            continue
        e = np.asarray(e)
        if isinstance(a, np.ndarray) and e.dtype == np.float32:
            assert a.dtype == np.float32, f"{case.group} output {i}: dtype {a.dtype}, not float32"
        scale = float(np.abs(e).max()) if e.size else 0.0
        np.testing.assert_allclose(np.asarray(a), e, rtol=case.rtol, atol=case.atol * scale,
                                   err_msg=f"{case.group} output {i}: pyllm and numpy disagree")


@pytest.mark.parametrize("impl", ["pyllm", "numpy"])
@pytest.mark.parametrize("case", CASES, ids=[c.group.replace(" ", "_") for c in CASES])
def test_kernel(benchmark, machine, case: Case, impl: str):
    for name in case.uses:
        if not hasattr(kernels, name):
            pytest.skip(f"pyllm.kernels has no {name}")
        if getattr(kernels, name) is getattr(reference, name, None):
            pytest.skip(f"pyllm.kernels.{name} is the numpy twin itself: nothing to compare")
    benchmark.group = case.group
    benchmark.extra_info.update(impl=impl, kernel=case.name, shape=case.shape,
                                flops=case.flops, target=case.target)

    fn = case.fn(impl)
    if impl == "numpy" and case.numpy_blas_threads:
        benchmark.extra_info["numpy_blas_threads"] = case.numpy_blas_threads
        set_numpy_blas_threads(case.numpy_blas_threads)
    try:
        result = benchmark(fn, *case.inputs())
    finally:
        set_numpy_blas_threads(THREADS)
    if case.inplace:   # the timed calls kept updating their inputs; compare one step from the start
        result = fn(*case.inputs())
    other = case.fn("numpy" if impl == "pyllm" else "pyllm")(*case.inputs())
    assert_agree(case, *((result, other) if impl == "pyllm" else (other, result)))

    if benchmark.stats is not None and case.flops:   # None under --benchmark-disable
        gflops = case.flops / benchmark.stats.stats.median / 1e9
        benchmark.extra_info["gflops"] = gflops
        if case.name.startswith("matmul"):
            benchmark.extra_info["pct_peak"] = 100.0 * gflops / machine["fma_peak_gflops"]
