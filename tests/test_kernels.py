"""pyllm.kernels (C++) against its numpy twin pyllm.reference, on every compiled SIMD path.

Shapes are chosen to be awkward for SIMD code: sizes 1, 3, 17, 63, 64, 65, 129 (not multiples
of the vector width), T = 1, batch dimensions, GQA, decode (Tq < Tk). Tolerances are float32
rounding: elementwise kernels rtol ~1e-5; reductions get an absolute tolerance scaled by the
square root of their length and by the magnitude of the result.

Also here: thread-count determinism (bit-identical results with 1, 2, 3 threads), inputs never
modified, fresh outputs, silent conversion of other float dtypes and strided views, and every
documented error (TypeError / ValueError naming the argument).
"""

from __future__ import annotations

import inspect
import math
import os
import threading

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import assert_bitwise_equal, assert_close, load_reference, run_doctests

R = load_reference()

SIZES = [1, 3, 17, 63, 64, 65, 129]   # around SIMD widths (4, 8, 16) and their multiples

KERNEL_NAMES = [
    "matmul", "matmul_backward", "softmax", "softmax_backward",
    "layernorm", "layernorm_forward", "layernorm_backward",
    "rmsnorm", "rmsnorm_forward", "rmsnorm_backward",
    "gelu", "gelu_backward", "silu", "silu_backward", "swiglu", "swiglu_backward", "geglu", "geglu_backward",
    "rope_tables", "rope", "rope_backward", "rope_at", "kv_write",
    "attention", "attention_forward", "attention_backward",
    "cross_entropy", "cross_entropy_forward", "cross_entropy_backward",
    "embedding", "embedding_backward", "adamw",
]


@pytest.fixture
def K(kernels):
    return kernels


def randn(rng, *shape, scale=1.0, offset=0.0):
    return (rng.standard_normal(shape) * scale + offset).astype(np.float32)


def scaled(expected, rel):
    """An absolute tolerance of `rel` times the largest magnitude in `expected` (at least rel)."""
    arrays = expected if isinstance(expected, (tuple, list)) else (expected,)
    m = max((float(np.max(np.abs(np.asarray(e, np.float64)), initial=0.0))
             for e in arrays if e is not None), default=0.0)
    return rel * max(m, 1.0)


def shape_id(shape):
    return "x".join(map(str, shape))


# ----------------------------------------------------------------------------- API surface

def test_same_names_and_signatures_as_reference(K):
    for name in KERNEL_NAMES:
        assert hasattr(K, name), f"pyllm.kernels has no {name}"
        ref_sig = inspect.signature(getattr(R, name))
        try:
            k_sig = inspect.signature(getattr(K, name))
        except (TypeError, ValueError):  # a builtin without a signature: nothing to compare
            continue
        ref_params = [(p.name, p.kind, p.default) for p in ref_sig.parameters.values()]
        k_params = [(p.name, p.kind, p.default) for p in k_sig.parameters.values()]
        assert k_params == ref_params, f"{name}: signature {k_sig} differs from reference {ref_sig}"


def test_rope_tables_is_the_reference_helper(K):
    for args in [(5, 8), (np.array([3, 7, 100]), 16), (1, 2)]:
        for got, exp in zip(K.rope_tables(*args), R.rope_tables(*args)):
            assert_bitwise_equal(got, exp)
    got = K.rope_tables(4, 6, theta=500000.0)
    exp = R.rope_tables(4, 6, theta=500000.0)
    assert_bitwise_equal(got[0], exp[0])
    assert_bitwise_equal(got[1], exp[1])
    factors = np.array([1.0, 2.5, 8.0, 31.0])   # a scaled rope (Llama 3): frequencies divided
    for got, exp in zip(K.rope_tables(np.array([0, 9, 4000]), 8, 10000.0, factors),
                        R.rope_tables(np.array([0, 9, 4000]), 8, 10000.0, factors)):
        assert_bitwise_equal(got, exp)
    for bad in (np.ones(3), np.array([1.0, 0.0, 1.0, 1.0]), np.array([1.0, np.nan, 1.0, 1.0])):
        with pytest.raises(ValueError, match="freq_factors"):
            K.rope_tables(4, 8, 10000.0, bad)


def test_kernels_doctests(K, restore_threads):
    previous_isa = K.get_isa()
    try:
        attempted, failures = run_doctests(K)
    finally:
        K.set_isa(previous_isa)
    assert attempted > 0
    assert not failures, "pyllm.kernels doctest(s) failed:\n" + "\n".join(failures)


def test_runtime_controls(K, restore_threads):
    isas = K.available_isas()
    assert isinstance(isas, list) and isas and all(isinstance(s, str) for s in isas)
    assert "generic" in isas and isas[0] == "generic"
    assert len(set(isas)) == len(isas)
    assert K.get_isa() in isas
    n = K.get_num_threads()
    assert isinstance(n, int) and n >= 1
    for t in (1, 3, 2):
        K.set_num_threads(t)
        assert K.get_num_threads() == t


def test_default_isa_is_the_best_available(K):
    import conftest

    if os.environ.get("PYLLM_ISA"):
        pytest.skip("PYLLM_ISA chooses the ISA")
    assert conftest.initial_isa == K.available_isas()[-1]
    assert K.get_isa() == conftest.initial_isa, "a test changed the ISA without restoring it"


def test_set_num_threads_rejects_zero(K, restore_threads):
    before = K.get_num_threads()
    with pytest.raises(ValueError):
        K.set_num_threads(0)
    assert K.get_num_threads() == before


def test_set_isa_rejects_unknown_and_unsupported(K):
    before = K.get_isa()
    with pytest.raises(ValueError, match="not-an-isa"):
        K.set_isa("not-an-isa")
    for name in ("avx2", "avx512", "neon", "sve"):
        if name not in K.available_isas():
            with pytest.raises(ValueError):
                K.set_isa(name)
    assert K.get_isa() == before


def test_set_isa_switches(K):
    before = K.get_isa()
    try:
        for name in K.available_isas():
            K.set_isa(name)
            assert K.get_isa() == name
            out = K.matmul(np.ones((3, 5), np.float32), np.ones((5, 2), np.float32))
            assert_close(out, np.full((3, 2), 5.0, np.float32), rtol=0, atol=0)
    finally:
        K.set_isa(before)


# ----------------------------------------------------------------------------- matmul

MATMUL_SHAPES = [  # (M, K, N)
    (1, 1, 1), (1, 3, 17), (3, 1, 63), (17, 63, 1), (63, 17, 3), (1, 257, 100), (100, 1, 257),
    (3, 100, 1), (17, 3, 257), (100, 257, 63), (257, 100, 17), (63, 64, 65), (64, 64, 64),
    (65, 129, 63), (129, 65, 100), (300, 200, 500),
]


def _check_matmul(K, a, b, bias, trans_b):
    Kdim = a.shape[-1]
    exp = R.matmul(a, b, bias, trans_b=trans_b)
    got = K.matmul(a, b, bias, trans_b=trans_b)
    assert_close(got, exp, rtol=1e-4, atol=1e-5 * math.sqrt(Kdim), name="matmul")


def _check_matmul_backward(K, rng, a, b, trans_b, bias):
    N = b.shape[0] if trans_b else b.shape[1]
    dout = randn(rng, *(a.shape[:-1] + (N,)))
    exp = R.matmul_backward(dout, a, b, trans_b=trans_b, bias=bias)
    got = K.matmul_backward(dout, a, b, trans_b=trans_b, bias=bias)
    M = a.size // a.shape[-1]
    for g, e, nm, length in zip(got, exp, ("da", "db", "dbias"), (N, M, M)):
        assert_close(g, e, rtol=1e-4, atol=1e-5 * math.sqrt(length), name=nm)


@pytest.mark.parametrize("trans_b", [False, True], ids=["b", "bT"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("mkn", MATMUL_SHAPES, ids=shape_id)
def test_matmul(K, isa, rng, mkn, with_bias, trans_b):
    M, Kd, N = mkn
    a = randn(rng, M, Kd)
    b = randn(rng, *((N, Kd) if trans_b else (Kd, N)))
    bias = randn(rng, N) if with_bias else None
    _check_matmul(K, a, b, bias, trans_b)
    _check_matmul_backward(K, rng, a, b, trans_b, with_bias)


@pytest.mark.parametrize("trans_b", [False, True], ids=["b", "bT"])
@pytest.mark.parametrize("a_shape", [(2, 17, 63), (3, 1, 129), (2, 2, 3, 65), (4, 64)], ids=shape_id)
def test_matmul_batched(K, isa, rng, a_shape, trans_b):
    Kd, N = a_shape[-1], 33
    a = randn(rng, *a_shape)
    b = randn(rng, *((N, Kd) if trans_b else (Kd, N)))
    bias = randn(rng, N)
    assert K.matmul(a, b, bias, trans_b=trans_b).shape == a_shape[:-1] + (N,)
    _check_matmul(K, a, b, bias, trans_b)
    _check_matmul(K, a, b, None, trans_b)
    _check_matmul_backward(K, rng, a, b, trans_b, True)


def test_matmul_backward_without_bias_returns_none(K, rng):
    a, b = randn(rng, 4, 5), randn(rng, 5, 3)
    da, db, dbias = K.matmul_backward(randn(rng, 4, 3), a, b)
    assert dbias is None and da.shape == a.shape and db.shape == b.shape


@given(M=st.integers(1, 80), Kd=st.integers(1, 80), N=st.integers(1, 80), trans_b=st.booleans(),
       with_bias=st.booleans(), batch=st.sampled_from([(), (2,), (1, 3)]), seed=st.integers(0, 2**32 - 1))
def test_matmul_hypothesis(K, isa, M, Kd, N, trans_b, with_bias, batch, seed):
    rng = np.random.default_rng(seed)
    a = randn(rng, *batch, M, Kd)
    b = randn(rng, *((N, Kd) if trans_b else (Kd, N)))
    bias = randn(rng, N) if with_bias else None
    _check_matmul(K, a, b, bias, trans_b)
    _check_matmul_backward(K, rng, a, b, trans_b, with_bias)


# ----------------------------------------------------------------------------- softmax

def _check_softmax(K, rng, x, rtol=1e-5):
    exp = R.softmax(x)
    got = K.softmax(x)
    assert np.all(np.isfinite(got)), "softmax produced non-finite values"
    assert_close(got, exp, rtol=rtol, atol=1e-7, name="softmax")
    dout = randn(rng, *x.shape)
    assert_close(K.softmax_backward(dout, exp), R.softmax_backward(dout, exp),
                 rtol=1e-4, atol=2e-6, name="softmax_backward")


SOFTMAX_SHAPES = [(n, c) for n in (1, 5) for c in SIZES] + [(2, 3, 65), (3, 1, 17), (2, 2, 3, 129), (7,)]


@pytest.mark.parametrize("shape", SOFTMAX_SHAPES, ids=shape_id)
def test_softmax(K, isa, rng, shape):
    _check_softmax(K, rng, randn(rng, *shape, scale=3.0))


@pytest.mark.parametrize("magnitude", [80.0, 1e4], ids=["80", "1e4"])
@pytest.mark.parametrize("C", [1, 3, 17, 64, 65, 129], ids=lambda c: f"C{c}")
def test_softmax_large_magnitudes(K, isa, rng, magnitude, C):
    x = randn(rng, 6, C) * np.float32(magnitude)
    x[1] = magnitude                      # all-equal row at the large value
    x[2] = -magnitude                     # all-equal row at the large negative value
    x[3] = 0.0                            # all-equal zeros
    x[4, ::2] = magnitude                 # half +M, half -M
    x[4, 1::2] = -magnitude
    _check_softmax(K, rng, x)
    y = K.softmax(x)
    assert_close(y.sum(-1), np.ones(6, np.float32), rtol=0, atol=1e-5, name="row sums")
    assert_close(y[1:4], np.full((3, C), 1.0 / C, np.float32), rtol=1e-6, atol=0, name="equal rows")


@given(shape=st.lists(st.integers(1, 70), min_size=1, max_size=3).map(tuple),
       scale=st.sampled_from([0.1, 1.0, 10.0, 100.0]), seed=st.integers(0, 2**32 - 1))
def test_softmax_hypothesis(K, isa, shape, scale, seed):
    rng = np.random.default_rng(seed)
    _check_softmax(K, rng, randn(rng, *shape, scale=scale))


# ----------------------------------------------------------------------------- norms

NORM_SHAPES = [(n, c) for n in (1, 4) for c in SIZES] + [(2, 3, 65), (3, 1, 17), (2, 2, 2, 64), (2, 768)]


def _check_layernorm(K, rng, x, eps=1e-5, cond=1.0):
    """`cond` ~ |mean| / std of the rows: float32 results (kernel's and reference's alike) lose
    about log10(cond) digits, so the tolerances grow with it."""
    C = x.shape[-1]
    N = x.size // C
    t = max(1e-5, 2e-6 * cond)
    bt = max(1e-4, 1e-5 * cond)
    w, b = randn(rng, C, offset=1.0), randn(rng, C)
    exp = R.layernorm_forward(x, w, b, eps)
    got = K.layernorm_forward(x, w, b, eps)
    assert_close(got[0], exp[0], rtol=t, atol=scaled(exp[0], t), name="layernorm out")
    assert_close(got[1], exp[1], rtol=1e-5, atol=scaled(exp[1], 1e-6), name="layernorm mean")
    assert_close(got[2], exp[2], rtol=t, atol=0, name="layernorm rstd")
    assert_close(K.layernorm(x, w, b, eps), exp[0], rtol=t, atol=scaled(exp[0], t), name="layernorm")
    dout = randn(rng, *x.shape)
    mean, rstd = exp[1], exp[2]
    e_dx, e_dw, e_db = R.layernorm_backward(dout, x, w, mean, rstd)
    g_dx, g_dw, g_db = K.layernorm_backward(dout, x, w, mean, rstd)
    # dx's natural scale is rstd * |dout * w| (the terms that cancel), not max |dx|: with C = 1
    # the exact dx is 0 but float32 (FMA-contracted) arithmetic leaves ~eps * rstd * |dout * w|.
    dx_scale = max(float(np.max(np.abs(e_dx), initial=0.0)),
                   float(np.max(rstd, initial=0.0)) * float(np.max(np.abs(dout * w), initial=0.0)))
    assert_close(g_dx, e_dx, rtol=bt, atol=bt / 5 * max(dx_scale, 1.0), name="layernorm dx")
    assert_close(g_dw, e_dw, rtol=bt, atol=scaled(e_dw, bt / 5) + 1e-5 * math.sqrt(N), name="layernorm dw")
    assert_close(g_db, e_db, rtol=1e-4, atol=1e-5 * math.sqrt(N), name="layernorm db")


def _check_rmsnorm(K, rng, x, eps=1e-6):
    C = x.shape[-1]
    N = x.size // C
    w = randn(rng, C, offset=1.0)
    exp = R.rmsnorm_forward(x, w, eps)
    got = K.rmsnorm_forward(x, w, eps)
    assert_close(got[0], exp[0], rtol=1e-5, atol=scaled(exp[0], 1e-5), name="rmsnorm out")
    assert_close(got[1], exp[1], rtol=1e-5, atol=0, name="rmsnorm rstd")
    assert_close(K.rmsnorm(x, w, eps), exp[0], rtol=1e-5, atol=scaled(exp[0], 1e-5), name="rmsnorm")
    dout = randn(rng, *x.shape)
    e_dx, e_dw = R.rmsnorm_backward(dout, x, w, exp[1])
    g_dx, g_dw = K.rmsnorm_backward(dout, x, w, exp[1])
    dx_scale = max(float(np.max(np.abs(e_dx), initial=0.0)),
                   float(np.max(exp[1], initial=0.0)) * float(np.max(np.abs(dout * w), initial=0.0)))
    assert_close(g_dx, e_dx, rtol=1e-4, atol=2e-5 * max(dx_scale, 1.0), name="rmsnorm dx")
    assert_close(g_dw, e_dw, rtol=1e-4, atol=scaled(e_dw, 1e-5) + 1e-5 * math.sqrt(N), name="rmsnorm dw")


@pytest.mark.parametrize("shape", NORM_SHAPES, ids=shape_id)
def test_layernorm(K, isa, rng, shape):
    _check_layernorm(K, rng, randn(rng, *shape, scale=2.0, offset=0.3), cond=1.2)


@pytest.mark.parametrize("shape", NORM_SHAPES, ids=shape_id)
def test_rmsnorm(K, isa, rng, shape):
    _check_rmsnorm(K, rng, randn(rng, *shape, scale=2.0))


@pytest.mark.parametrize("C", [17, 64, 129, 768])
def test_layernorm_large_offset_rows(K, isa, rng, C):
    # Rows with |mean| >> std: a one-pass E[x^2] - E[x]^2 variance in float32 loses the variance.
    x = randn(rng, 4, C, offset=100.0)
    _check_layernorm(K, rng, x, cond=100.0)


def test_norms_constant_rows_and_custom_eps(K, isa, rng):
    x = np.full((3, 65), 2.5, np.float32)                 # zero variance: rstd = 1/sqrt(eps)
    _check_layernorm(K, rng, x, eps=1e-3)
    _check_rmsnorm(K, rng, np.zeros((2, 17), np.float32), eps=1e-4)
    _check_rmsnorm(K, rng, randn(rng, 3, 33), eps=0.5)


@given(N=st.integers(1, 20), C=st.integers(1, 200), scale=st.sampled_from([0.01, 1.0, 30.0]),
       offset=st.sampled_from([0.0, 1.0, -5.0]), seed=st.integers(0, 2**32 - 1))
def test_layernorm_hypothesis(K, isa, N, C, scale, offset, seed):
    rng = np.random.default_rng(seed)
    x = randn(rng, N, C, scale=scale, offset=offset)
    _check_layernorm(K, rng, x, cond=(abs(offset) + scale) / scale)


@given(N=st.integers(1, 20), C=st.integers(1, 200), scale=st.sampled_from([0.01, 1.0, 30.0]),
       seed=st.integers(0, 2**32 - 1))
def test_rmsnorm_hypothesis(K, isa, N, C, scale, seed):
    rng = np.random.default_rng(seed)
    _check_rmsnorm(K, rng, randn(rng, N, C, scale=scale))


# ----------------------------------------------------------------------------- activations

ELEMENTWISE_SHAPES = [(n,) for n in SIZES] + [(2, 3, 17), (4, 129), (1000,), (5, 7, 11)]
EXTREMES = np.array([-1e4, -200.0, -88.0, -80.0, -20.0, -10.0, -5.0, -1.0, -1e-3, -0.0, 0.0, 1e-3,
                     1.0, 5.0, 10.0, 20.0, 80.0, 88.0, 200.0, 1e4], np.float32)


def _activation_atol(x, dout=None):
    """Per-element absolute tolerances for gelu/silu and their backward.

    Both are built on sigmoid/tanh, whose float32 value near 0 or 1 carries an absolute error of
    ~ulp(1) = 6e-8; for x << 0 the result is that error times ~|x| (forward) or ~|x| * du/dx
    (backward: up to ~20 |dout| for gelu at x ~ -5), in the reference as much as in a kernel.
    """
    x = np.abs(np.asarray(x, np.float64))
    if dout is None:
        return 1e-6 + 1e-7 * x
    grow = 1.0 + x * (1.0 + 0.14 * x * x)          # ~ |x| * du/dx of gelu's tanh argument
    return 1e-6 + 3e-7 * np.abs(np.asarray(dout, np.float64)) * np.minimum(grow, 1e3)


def _check_unary(K, rng, name, x):
    fwd, bwd = getattr(K, name), getattr(K, name + "_backward")
    exp = getattr(R, name)(x)
    got = fwd(x)
    assert np.all(np.isfinite(got)), f"{name} produced non-finite values"
    assert_close(got, exp, rtol=1e-5, atol=_activation_atol(x), name=name)
    dout = randn(rng, *x.shape)
    e_dx = getattr(R, name + "_backward")(dout, x)
    g_dx = bwd(dout, x)
    assert np.all(np.isfinite(g_dx)), f"{name}_backward produced non-finite values"
    assert_close(g_dx, e_dx, rtol=1e-5, atol=_activation_atol(x, dout), name=name + "_backward")


@pytest.mark.parametrize("name", ["gelu", "silu"])
@pytest.mark.parametrize("shape", ELEMENTWISE_SHAPES, ids=shape_id)
def test_activation(K, isa, rng, name, shape):
    _check_unary(K, rng, name, randn(rng, *shape, scale=3.0))


@pytest.mark.parametrize("name", ["gelu", "silu"])
def test_activation_extremes(K, isa, rng, name):
    _check_unary(K, rng, name, EXTREMES)
    _check_unary(K, rng, name, np.tile(EXTREMES, (3, 1)).T.copy())


@pytest.mark.parametrize("gated", ["swiglu", "geglu"])
@pytest.mark.parametrize("shape", ELEMENTWISE_SHAPES, ids=shape_id)
def test_gated(K, isa, rng, shape, gated):
    gate, up = randn(rng, *shape, scale=3.0), randn(rng, *shape)
    _check_gated(K, rng, gate, up, gated)


def _check_gated(K, rng, gate, up, name):
    exp = getattr(R, name)(gate, up)
    got = getattr(K, name)(gate, up)
    assert np.all(np.isfinite(got)), f"{name} produced non-finite values"
    assert_close(got, exp, rtol=1e-5, atol=_activation_atol(gate) * np.maximum(np.abs(up), 1), name=name)
    dout = randn(rng, *gate.shape)
    e_dg, e_du = getattr(R, name + "_backward")(dout, gate, up)
    g_dg, g_du = getattr(K, name + "_backward")(dout, gate, up)
    assert np.all(np.isfinite(g_dg)) and np.all(np.isfinite(g_du))
    assert_close(g_dg, e_dg, rtol=1e-5, atol=_activation_atol(gate, dout * up), name=f"{name} dgate")
    assert_close(g_du, e_du, rtol=1e-5, atol=_activation_atol(gate) * np.maximum(np.abs(dout), 1),
                 name=f"{name} dup")


@pytest.mark.parametrize("gated", ["swiglu", "geglu"])
def test_gated_extremes(K, isa, rng, gated):
    _check_gated(K, rng, EXTREMES, randn(rng, *EXTREMES.shape), gated)


# ----------------------------------------------------------------------------- rope

ROPE_SHAPES = [(1, 1, 1, 2), (1, 2, 3, 4), (2, 3, 17, 16), (1, 4, 65, 64), (2, 2, 5, 80),
               (1, 1, 129, 128), (1, 2, 7, 6), (1, 1, 2, 34)]


@pytest.mark.parametrize("shape", ROPE_SHAPES, ids=shape_id)
@pytest.mark.parametrize("start", [0, 1000], ids=["pos0", "pos1000"])
def test_rope(K, isa, rng, shape, start):
    T, HS = shape[2], shape[3]
    cos, sin = R.rope_tables(np.arange(T) + start, HS)
    x = randn(rng, *shape)
    assert_close(K.rope(x, cos, sin), R.rope(x, cos, sin), rtol=1e-5, atol=1e-6, name="rope")
    dout = randn(rng, *shape)
    assert_close(K.rope_backward(dout, cos, sin), R.rope_backward(dout, cos, sin), rtol=1e-5,
                 atol=1e-6, name="rope_backward")


# ----------------------------------------------------------------------------- attention

ATTN_HEADS = [(1, 1, 1), (2, 2, 1), (1, 4, 2), (1, 3, 3)]   # (B, NH, NKV)


def _check_attention(K, rng, B, NH, NKV, Tq, Tk, HS, causal, scale=1.0):
    q = randn(rng, B, NH, Tq, HS, scale=scale)
    k = randn(rng, B, NKV, Tk, HS, scale=scale)
    v = randn(rng, B, NKV, Tk, HS)
    e_out, e_lse = R.attention_forward(q, k, v, causal)
    g_out, g_lse = K.attention_forward(q, k, v, causal)
    assert_close(g_out, e_out, rtol=1e-4, atol=2e-5, name="attention out")
    assert_close(g_lse, e_lse, rtol=1e-5, atol=scaled(e_lse, 2e-6), name="attention lse")
    assert_close(K.attention(q, k, v, causal), e_out, rtol=1e-4, atol=2e-5, name="attention")
    dout = randn(rng, B, NH, Tq, HS)
    exp = R.attention_backward(dout, q, k, v, e_out, e_lse, causal)
    got = K.attention_backward(dout, q, k, v, e_out, e_lse, causal)
    for g, e, nm in zip(got, exp, ("dq", "dk", "dv")):
        assert_close(g, e, rtol=1e-3, atol=scaled(e, 1e-4), name=f"attention {nm}")


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("T", [1, 2, 17, 100, 130], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("HS", [1, 3, 16, 64, 80], ids=lambda h: f"HS{h}")
def test_attention(K, isa, rng, HS, T, causal):
    B, NH, NKV = ATTN_HEADS[(HS + T) % len(ATTN_HEADS)]
    _check_attention(K, rng, B, NH, NKV, T, T, HS, causal)


ATTN_CACHE_CASES = [  # (B, NH, NKV, Tq, Tk, HS, causal): queries continuing a KV cache
    (1, 2, 1, 1, 1, 16, True), (2, 4, 2, 1, 17, 64, True), (1, 4, 1, 1, 130, 80, True),
    (1, 2, 2, 5, 17, 16, True), (1, 3, 1, 17, 100, 3, True), (1, 2, 1, 3, 100, 64, False),
    (2, 2, 2, 17, 3, 16, False),   # non-causal Tq > Tk is allowed
    (2, 6, 2, 1, 600, 72, True), (1, 8, 1, 1, 513, 64, False),   # a decode step over chunks of the cache
]


@pytest.mark.parametrize("case", ATTN_CACHE_CASES, ids=lambda c: "B{}-NH{}-NKV{}-Tq{}-Tk{}-HS{}-{}".format(
    *c[:6], "causal" if c[6] else "full"))
def test_attention_kv_cache(K, isa, rng, case):
    _check_attention(K, rng, *case)


@pytest.mark.parametrize("case", [(2, 4, 2, 37, 37, 16, 5), (1, 2, 1, 130, 130, 8, 64), (1, 2, 2, 3, 300, 16, 7),
                                  (2, 2, 1, 1, 520, 16, 300), (1, 1, 1, 70, 200, 32, 1), (2, 6, 3, 65, 65, 24, 200)],
                         ids=lambda c: "B{}-NH{}-NKV{}-Tq{}-Tk{}-HS{}-window{}".format(*c))
def test_attention_within_a_sliding_window(K, isa, rng, case):
    """Each query sees the last `window` keys up to its position: forward (tiles, few queries, a
    decode step over a long cache, float16 too) and backward (both paths) against the twin."""
    B, NH, NKV, Tq, Tk, HS, window = case
    q, k, v = randn(rng, B, NH, Tq, HS, scale=2.0), randn(rng, B, NKV, Tk, HS, scale=2.0), randn(rng, B, NKV, Tk, HS)
    out, lse = K.attention_forward(q, k, v, True, window=window)
    exp_out, exp_lse = R.attention_forward(q, k, v, True, window=window)
    assert_close(out, exp_out, 1e-4, 1e-5)
    assert_close(lse, exp_lse, 1e-4, 1e-5)
    half_out, _ = K.attention_forward(q, k.astype(np.float16), v.astype(np.float16), True, window=window)
    ref_half, _ = R.attention_forward(q, k.astype(np.float16), v.astype(np.float16), True, window=window)
    assert_close(half_out, ref_half, 1e-4, 1e-5)
    lengths = np.array([Tk - b for b in range(B)]) if Tk - B >= Tq else None
    if lengths is not None:
        assert_close(K.attention_forward(q, k, v, True, kv_lengths=lengths, window=window)[0],
                     R.attention_forward(q, k, v, True, kv_lengths=lengths, window=window)[0], 1e-4, 1e-5)
    if Tq == Tk:
        dout = randn(rng, B, NH, Tq, HS)
        for got, exp in zip(K.attention_backward(dout, q, k, v, out, lse, True, window=window),
                            R.attention_backward(dout, q, k, v, exp_out, exp_lse, True, window=window)):
            assert_close(got, exp, 1e-3, 1e-4)
    if window >= Tk:   # a window as long as the sequence changes nothing
        assert_close(out, K.attention_forward(q, k, v, True)[0], 1e-6, 1e-7)


@pytest.mark.parametrize("case", [(1, 1, 1, 1, 1, 1, True, None), (2, 4, 2, 17, 17, 16, True, None),
                                  (1, 3, 1, 130, 130, 80, True, None), (1, 2, 2, 5, 70, 3, True, None),
                                  (2, 2, 1, 9, 4, 8, False, None), (1, 2, 1, 100, 100, 16, True, 7),
                                  (1, 2, 1, 65, 200, 32, True, 64)],
                         ids=lambda c: "B{}-NH{}-NKV{}-Tq{}-Tk{}-HS{}-{}-window{}".format(
                             *c[:6], "causal" if c[6] else "full", c[7]))
def test_attention_probabilities_equal_the_twins(K, isa, rng, case):
    """The weights attention_forward(return_probs=True) reports: the twin's softmax, rows that sum
    to 1, 0 where a query sees no key (after it, or before its window); large scores too."""
    B, NH, NKV, Tq, Tk, HS, causal, window = case
    q, k, v = randn(rng, B, NH, Tq, HS, scale=4.0), randn(rng, B, NKV, Tk, HS, scale=4.0), randn(rng, B, NKV, Tk, HS)
    out, lse, probs = K.attention_forward(q, k, v, causal, window=window, return_probs=True)
    e_out, e_lse, e_probs = R.attention_forward(q, k, v, causal, window=window, return_probs=True)
    assert probs.shape == (B, NH, Tq, Tk)
    assert_close(probs, e_probs, rtol=1e-4, atol=2e-6, name="probs")
    assert_close(out, e_out, rtol=1e-4, atol=2e-5, name="out")
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=3e-5)
    if causal:
        hidden = R._causal_mask(Tq, Tk, window)
        assert (probs[:, :, hidden] == 0).all()
    # The same as the output: probs @ v (each query head reading its kv head).
    assert_close(probs @ np.repeat(v, NH // NKV, axis=1), out, rtol=1e-4, atol=2e-5, name="probs @ v")


def test_attention_probabilities_refusals(K):
    q = np.zeros((1, 1, 2, 4), np.float32)
    with pytest.raises(ValueError, match="return_probs needs float32"):
        K.attention_forward(q, q.astype(np.float16), q.astype(np.float16), True, return_probs=True)
    with pytest.raises(ValueError, match="return_probs needs"):
        K.attention_forward(q, q, q, True, kv_lengths=[2], return_probs=True)
    with pytest.raises(ValueError, match="lse"):
        K.unchecked.attention_probabilities(np.zeros((1, 1, 2, 2), np.float32), q, q, np.zeros(1, np.float32), True)


def test_attention_window_refusals(K):
    q = np.zeros((1, 1, 2, 4), np.float32)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="window"):
            K.attention_forward(q, q, q, True, window=bad)
    with pytest.raises(ValueError, match="causal"):
        K.attention_forward(q, q, q, False, window=2)


@pytest.mark.parametrize("case", ATTN_CACHE_CASES + [(3, 9, 3, 1, 300, 64, True), (2, 6, 2, 70, 200, 72, True),
                                                     (4, 9, 3, 1, 700, 64, True)],
                         ids=lambda c: "B{}-NH{}-NKV{}-Tq{}-Tk{}-HS{}-{}".format(*c[:6], "causal" if c[6] else "full"))
def test_attention_reads_a_float16_kv_cache(K, isa, rng, case):
    # A half-precision cache: kv_write rounds as numpy does, attention widens what it reads.
    B, NH, NKV, Tq, Tk, HS, causal = case
    q = randn(rng, B, NH, Tq, HS, scale=2.0)
    src_k, src_v = randn(rng, B, Tk, NKV, HS, scale=2.0), randn(rng, B, Tk, NKV, HS)
    k, v = np.zeros((B, NKV, Tk + 3, HS), np.float16), np.zeros((B, NKV, Tk + 3, HS), np.float16)
    exp_k, exp_v = k.copy(), v.copy()
    pos0 = np.zeros(B, np.int64)
    K.kv_write(k, src_k, pos0)
    K.kv_write(v, src_v, pos0)
    R.kv_write(exp_k, src_k, pos0)
    R.kv_write(exp_v, src_v, pos0)
    assert_bitwise_equal(k, exp_k)
    assert_bitwise_equal(v, exp_v)
    lengths = np.maximum(Tk - 97 * np.arange(B), Tq if causal else 1).astype(np.int64)   # ragged rows
    e_out, e_lse = R.attention_forward(q, k, v, causal, kv_lengths=lengths)
    g_out, g_lse = K.attention_forward(q, k, v, causal, kv_lengths=lengths)
    assert_close(g_out, e_out, rtol=1e-4, atol=2e-5, name="attention out, float16 cache")
    assert_close(g_lse, e_lse, rtol=1e-5, atol=scaled(e_lse, 2e-6), name="attention lse, float16 cache")
    with pytest.raises(ValueError, match="float16"):
        K.unchecked.attention_forward_half(np.empty_like(q), np.empty((B, NH, Tq), np.float32), q, k,
                                           v.astype(np.float32), causal, None)


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("Tq", [1, 5])
def test_a_batch_reads_and_writes_any_rows_of_the_cache(K, isa, rng, dtype, Tq):
    # A continuous batch: batch rows 0, 1, 2 are cache rows 3, 0, 4 of a 5-row cache.
    B, held, NH, NKV, HS, cap = 3, 5, 6, 2, 64, 300
    rows = np.array([3, 0, 4])
    cache_k = randn(rng, held, NKV, cap, HS).astype(dtype)
    cache_v = randn(rng, held, NKV, cap, HS).astype(dtype)
    exp_k, exp_v = cache_k.copy(), cache_v.copy()
    pos0 = np.array([270, 0, 40])
    src_k, src_v = randn(rng, B, Tq, NKV, HS), randn(rng, B, Tq, NKV, HS)
    K.kv_write(cache_k, src_k, pos0, rows=rows)
    K.kv_write(cache_v, src_v, pos0, rows=rows)
    R.kv_write(exp_k, src_k, pos0, rows=rows)
    R.kv_write(exp_v, src_v, pos0, rows=rows)
    assert_bitwise_equal(cache_k, exp_k)
    assert_bitwise_equal(cache_v, exp_v)
    q = randn(rng, B, NH, Tq, HS)
    lengths = pos0 + Tq
    got, got_lse = K.attention_forward(q, cache_k, cache_v, True, kv_lengths=lengths, kv_rows=rows)
    want, want_lse = R.attention_forward(q, cache_k, cache_v, True, kv_lengths=lengths, kv_rows=rows)
    assert_close(got, want, rtol=1e-4, atol=2e-5, name="attention on cache rows")
    assert_close(got_lse, want_lse, rtol=1e-5, atol=scaled(want_lse, 2e-6), name="lse on cache rows")
    for b, r in enumerate(rows):   # each batch row as the only row of its own cache: the same bits
        alone = K.attention_forward(q[b:b + 1], cache_k[r:r + 1], cache_v[r:r + 1], True, kv_lengths=lengths[b:b + 1])
        assert_bitwise_equal(got[b:b + 1], alone[0])
    for bad in ([3, 3, 4], [3, 0, 5], [3, 0]):
        with pytest.raises(ValueError, match="rows"):
            K.kv_write(cache_k, src_k, pos0, rows=bad)
        with pytest.raises(ValueError, match="rows"):
            K.attention_forward(q, cache_k, cache_v, True, kv_lengths=lengths, kv_rows=bad)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_attention_sharp_scores(K, isa, rng, causal):
    # Large q, k: nearly one-hot attention rows, scores ~ +-100 (exp overflows without max-shift).
    _check_attention(K, rng, 1, 2, 1, 33, 33, 16, causal, scale=5.0)


def test_attention_end_to_end_backward(K, isa, rng):
    # The kernel's own saved (out, lse) fed to its backward, against the reference pipeline.
    q, k, v = randn(rng, 2, 4, 19, 16), randn(rng, 2, 2, 19, 16), randn(rng, 2, 2, 19, 16)
    dout = randn(rng, 2, 4, 19, 16)
    g_out, g_lse = K.attention_forward(q, k, v, True)
    e_out, e_lse = R.attention_forward(q, k, v, True)
    got = K.attention_backward(dout, q, k, v, g_out, g_lse, True)
    exp = R.attention_backward(dout, q, k, v, e_out, e_lse, True)
    for g, e, nm in zip(got, exp, ("dq", "dk", "dv")):
        assert_close(g, e, rtol=1e-3, atol=scaled(e, 1e-4), name=nm)


@st.composite
def attention_shapes(draw):
    B = draw(st.integers(1, 2))
    NKV = draw(st.integers(1, 2))
    NH = NKV * draw(st.integers(1, 3))
    causal = draw(st.booleans())
    Tq = draw(st.integers(1, 40))
    Tk = draw(st.integers(Tq if causal else 1, 48))
    HS = draw(st.integers(1, 70))
    return B, NH, NKV, Tq, Tk, HS, causal


@given(shapes=attention_shapes(), seed=st.integers(0, 2**32 - 1))
def test_attention_hypothesis(K, isa, shapes, seed):
    _check_attention(K, np.random.default_rng(seed), *shapes)


# ----------------------------------------------------------------------------- cross-entropy

def _check_cross_entropy(K, rng, logits, targets, ignore_index=-100, dloss=1.0):
    scale = float(np.max(np.abs(logits), initial=1.0))
    atol = 2e-6 * max(scale, 1.0)           # a few ulps of the largest logit
    e_losses, e_lse = R.cross_entropy_forward(logits, targets, ignore_index)
    g_losses, g_lse = K.cross_entropy_forward(logits, targets, ignore_index)
    assert np.all(np.isfinite(g_losses)) and np.all(np.isfinite(g_lse))
    assert_close(g_lse, e_lse, rtol=1e-6, atol=atol, name="cross_entropy lse")
    assert_close(g_losses, e_losses, rtol=1e-5, atol=atol, name="cross_entropy losses")
    keep = np.asarray(targets) != ignore_index
    assert np.all(g_losses[~keep] == 0.0), "ignored rows must have loss exactly 0"
    e_mean = R.cross_entropy(logits, targets, ignore_index)
    g_mean = K.cross_entropy(logits, targets, ignore_index)
    assert np.ndim(g_mean) == 0 and isinstance(g_mean, (float, np.floating))
    assert_close(np.float64(g_mean), np.float64(e_mean), rtol=1e-5, atol=atol, name="cross_entropy")
    # Backward on the same (reference) lse, so only the backward kernel is compared.
    e_d = R.cross_entropy_backward(logits, targets, e_lse, dloss, ignore_index)
    g_d = K.cross_entropy_backward(logits, targets, e_lse, dloss, ignore_index)
    count = max(int(keep.sum()), 1)
    assert_close(g_d, e_d, rtol=1e-5, atol=2e-6 * abs(dloss) / count, name="cross_entropy_backward")
    assert np.all(g_d.reshape(-1, logits.shape[-1])[~keep.reshape(-1)] == 0.0)


CE_SHAPES = [(1, 1), (3, 2), (5, 17), (4, 63), (4, 64), (4, 65), (2, 129), (2, 3, 100), (3, 1000)]


@pytest.mark.parametrize("shape", CE_SHAPES, ids=shape_id)
@pytest.mark.parametrize("dloss", [1.0, 0.37])
def test_cross_entropy(K, isa, rng, shape, dloss):
    V = shape[-1]
    logits = randn(rng, *shape, scale=3.0)
    targets = rng.integers(0, V, size=shape[:-1])
    if targets.size > 2:
        targets.reshape(-1)[1] = -100      # an ignored row
        targets.reshape(-1)[-1] = V - 1    # the last class
    _check_cross_entropy(K, rng, logits, targets, dloss=dloss)


@pytest.mark.parametrize("V", [1, 17, 64, 129])
def test_cross_entropy_all_ignored(K, isa, rng, V):
    logits = randn(rng, 4, V)
    targets = np.full(4, -100)
    assert float(K.cross_entropy(logits, targets)) == 0.0
    losses, _ = K.cross_entropy_forward(logits, targets)
    assert np.all(losses == 0.0)
    _, lse = R.cross_entropy_forward(logits, targets)
    d = K.cross_entropy_backward(logits, targets, lse)
    assert d.shape == logits.shape and np.all(d == 0.0)
    _check_cross_entropy(K, rng, logits, targets)


def test_cross_entropy_custom_ignore_index(K, isa, rng):
    logits = randn(rng, 6, 10)
    targets = np.array([0, 3, 3, 9, 1, 3])
    _check_cross_entropy(K, rng, logits, targets, ignore_index=3)
    _check_cross_entropy(K, rng, logits, targets, ignore_index=-1)


@pytest.mark.parametrize("magnitude", [80.0, 1e4], ids=["80", "1e4"])
@pytest.mark.parametrize("V", [3, 17, 65, 129])
def test_cross_entropy_large_magnitudes(K, isa, rng, magnitude, V):
    logits = randn(rng, 6, V) * np.float32(magnitude)
    logits[1] = magnitude                 # all-equal rows
    logits[2] = -magnitude
    logits[3, ::2] = magnitude
    logits[3, 1::2] = -magnitude
    targets = rng.integers(0, V, size=6)
    targets[0] = int(np.argmax(logits[0]))     # the max class: loss ~ 0
    targets[4] = int(np.argmin(logits[4]))     # the min class: loss ~ 2 * magnitude
    _check_cross_entropy(K, rng, logits, targets)


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint8, np.int16])
def test_integer_id_dtypes_accepted(K, rng, dtype):
    logits = randn(rng, 5, 7)
    targets = np.array([0, 6, 3, 3, 1])
    got = K.cross_entropy_forward(logits, targets.astype(dtype))
    exp = R.cross_entropy_forward(logits, targets)
    assert_close(got[0], exp[0], rtol=1e-5, atol=1e-6)
    weight = randn(rng, 7, 5)
    assert_close(K.embedding(targets.astype(dtype), weight), R.embedding(targets, weight), rtol=0, atol=0)
    dout = randn(rng, 5, 5)
    assert_close(K.embedding_backward(dout, targets.astype(dtype), 7),
                 R.embedding_backward(dout, targets, 7), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- embedding

EMB_CASES = [  # (V, C, ids shape)
    (1, 1, (1,)), (1, 17, (5,)), (3, 3, (2, 4)), (65, 63, (7,)), (10, 64, (3, 5)), (50, 65, (2, 2, 3)),
    (1000, 129, (40,)),
]


@pytest.mark.parametrize("case", EMB_CASES, ids=lambda c: f"V{c[0]}-C{c[1]}-ids{shape_id(c[2])}")
def test_embedding(K, isa, rng, case):
    V, C, ids_shape = case
    weight = randn(rng, V, C)
    ids = rng.integers(0, V, size=ids_shape)
    ids.reshape(-1)[0] = V - 1
    if ids.size > 2:
        ids.reshape(-1)[-1] = ids.reshape(-1)[0]      # a repeated id
    assert_close(K.embedding(ids, weight), R.embedding(ids, weight), rtol=0, atol=0, name="embedding")
    dout = randn(rng, *ids_shape, C)
    assert_close(K.embedding_backward(dout, ids, V), R.embedding_backward(dout, ids, V), rtol=1e-5,
                 atol=1e-6, name="embedding_backward")


def test_embedding_backward_heavily_repeated_ids(K, isa, rng):
    V, C = 5, 65
    ids = rng.integers(0, 3, size=(8, 50))       # ids 3 and 4 never used
    dout = randn(rng, 8, 50, C)
    got = K.embedding_backward(dout, ids, V)
    exp = R.embedding_backward(dout, ids, V)
    assert_close(got, exp, rtol=1e-4, atol=1e-5 * math.sqrt(ids.size), name="embedding_backward")
    assert np.all(got[3:] == 0.0)
    exp64 = np.zeros((V, C))
    np.add.at(exp64, ids.reshape(-1), dout.reshape(-1, C).astype(np.float64))
    assert_close(got, exp64, rtol=1e-4, atol=1e-5 * math.sqrt(ids.size), check_dtype=False)


def test_embedding_backward_accumulates_into_dweight(K, isa, rng):
    if "dweight" not in inspect.signature(R.embedding_backward).parameters:
        pytest.skip("embedding_backward has no dweight argument")
    V, C = 11, 65
    ids = np.array([[3, 0, 3], [10, 3, 1]])
    dout = randn(rng, 2, 3, C)
    buf = randn(rng, V, C)
    start = buf.copy()
    res = K.embedding_backward(dout, ids, V, dweight=buf)
    assert res is buf, "with dweight given, embedding_backward must return that very array"
    expected = R.embedding_backward(dout, ids, V, dweight=start.copy())
    assert_close(buf, expected, rtol=1e-6, atol=1e-6)
    assert_close(buf - start, R.embedding_backward(dout, ids, V), rtol=1e-5, atol=1e-6)
    # Twice: the second call adds again on top of the first.
    K.embedding_backward(dout, ids, V, dweight=buf)
    assert_close(buf - start, 2 * R.embedding_backward(dout, ids, V), rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("problem", ["float64", "non-contiguous", "read-only", "shape", "list"])
def test_embedding_backward_bad_dweight(K, problem):
    if "dweight" not in inspect.signature(R.embedding_backward).parameters:
        pytest.skip("embedding_backward has no dweight argument")
    V, C = 7, 5
    ids, dout = np.array([0, 6, 6]), _f(3, C)
    if problem == "float64":
        buf = np.zeros((V, C))
    elif problem == "non-contiguous":
        buf = np.zeros((V, 2 * C), np.float32)[:, ::2]
    elif problem == "read-only":
        buf = np.zeros((V, C), np.float32)
        buf.flags.writeable = False
    elif problem == "shape":
        buf = np.zeros((V + 1, C), np.float32)
    else:
        buf = np.zeros((V, C)).tolist()
    with pytest.raises((TypeError, ValueError), match=r"\bdweight\b"):
        K.embedding_backward(dout, ids, V, dweight=buf)


# ----------------------------------------------------------------------------- adamw

@pytest.mark.parametrize("shape", [(1,), (17,), (3, 65), (129, 7), (4096,)], ids=shape_id)
@pytest.mark.parametrize("hp", [
    dict(lr=1e-3),
    dict(lr=3e-3, weight_decay=0.1, grad_scale=0.5),
    dict(lr=1e-2, beta1=0.8, beta2=0.999, eps=1e-6, weight_decay=0.01, grad_scale=2.0),
], ids=["default", "wd-scale", "custom"])
def test_adamw(K, isa, rng, shape, hp):
    p_k = randn(rng, *shape)
    p_r = p_k.copy()
    m_k, v_k = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    m_r, v_r = m_k.copy(), v_k.copy()
    for step in range(1, 6):
        g = randn(rng, *shape)
        if g.size > 2:
            g.reshape(-1)[0] = 0.0                       # zero gradient: only decay acts
        g_copy = g.copy()
        assert K.adamw(p_k, g, m_k, v_k, step=step, **hp) is None
        R.adamw(p_r, g, m_r, v_r, step=step, **hp)
        assert_bitwise_equal(g, g_copy, name="grad must not be modified")
        # rtol 2e-6: float32 rounding of the moments; the kernel derives 1 - beta in double, as
        # the reference does (in float32, 1 - float32(0.999) would be 1.3e-5 off).
        # m is an EMA of signed gradients: cancellation leaves ulp-of-|g| absolute errors.
        assert_close(m_k, m_r, rtol=2e-6, atol=scaled(m_r, 5e-7), name=f"m after step {step}")
        assert_close(v_k, v_r, rtol=2e-6, atol=scaled(v_r, 1e-7), name=f"v after step {step}")
        assert_close(p_k, p_r, rtol=1e-6, atol=step * 2e-7 + 1e-4 * hp["lr"], name=f"param after step {step}")


def test_adamw_late_step_and_converted_grad(K, isa, rng):
    # A large step (bias corrections ~1) and a float64, strided grad (converted silently).
    shape = (5, 33)
    p_k, m_k, v_k = randn(rng, *shape), np.abs(randn(rng, *shape)) * 0.1, np.abs(randn(rng, *shape)) * 0.01
    p_r, m_r, v_r = p_k.copy(), m_k.copy(), v_k.copy()
    g = rng.standard_normal((5, 66))[:, ::2]
    K.adamw(p_k, g, m_k, v_k, lr=1e-3, step=10000, weight_decay=0.1)
    R.adamw(p_r, g.astype(np.float32), m_r, v_r, lr=1e-3, step=10000, weight_decay=0.1)
    assert_close(m_k, m_r, rtol=1e-5, atol=1e-7)
    assert_close(v_k, v_r, rtol=1e-5, atol=1e-9)
    assert_close(p_k, p_r, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- determinism

def _results_with_threads(K, fn, threads):
    outs = []
    for n in threads:
        K.set_num_threads(n)
        outs.append(fn())
    return outs


def _flatten(result):
    if isinstance(result, tuple):
        return [r for r in result if r is not None]
    return [result]


def _det_matmul(M, Kd, N, trans_b=False):
    def build(rng):
        a, b, bias = randn(rng, M, Kd), randn(rng, *((N, Kd) if trans_b else (Kd, N))), randn(rng, N)
        return lambda K: K.matmul(a, b, bias, trans_b=trans_b)
    return build


def _det_matmul_backward(M, Kd, N, trans_b=False):
    def build(rng):
        a, b, dout = randn(rng, M, Kd), randn(rng, *((N, Kd) if trans_b else (Kd, N))), randn(rng, M, N)
        return lambda K: K.matmul_backward(dout, a, b, trans_b=trans_b, bias=True)
    return build


def _det_attention(backward):
    def build(rng):
        q, k, v = randn(rng, 2, 4, 130, 64), randn(rng, 2, 2, 130, 64), randn(rng, 2, 2, 130, 64)
        if not backward:
            return lambda K: K.attention_forward(q, k, v, True)
        out, lse = R.attention_forward(q, k, v, True)
        dout = randn(rng, 2, 4, 130, 64)
        return lambda K: K.attention_backward(dout, q, k, v, out, lse, True)
    return build


def _det_norm_backward(kind):
    def build(rng):
        x, w, b, dout = randn(rng, 3, 600, 129), randn(rng, 129), randn(rng, 129), randn(rng, 3, 600, 129)
        if kind == "layernorm":
            _, mean, rstd = R.layernorm_forward(x, w, b)
            return lambda K: K.layernorm_backward(dout, x, w, mean, rstd)
        _, rstd = R.rmsnorm_forward(x, w)
        return lambda K: K.rmsnorm_backward(dout, x, w, rstd)
    return build


def _det_embedding_backward(rng):
    ids = rng.integers(0, 50, size=(8, 700))
    dout = randn(rng, 8, 700, 65)
    return lambda K: K.embedding_backward(dout, ids, 50)


def _det_cross_entropy(backward):
    def build(rng):
        logits = randn(rng, 300, 1000, scale=3.0)
        targets = rng.integers(0, 1000, size=300)
        targets[::7] = -100
        if backward:
            _, lse = R.cross_entropy_forward(logits, targets)
            return lambda K: K.cross_entropy_backward(logits, targets, lse, 0.7)
        return lambda K: (np.asarray(K.cross_entropy(logits, targets)),
                          *K.cross_entropy_forward(logits, targets))
    return build


def _det_softmax(rng):
    x = randn(rng, 300, 1000)
    return lambda K: K.softmax(x)


DETERMINISM_CASES = {
    "matmul-257x300x129": _det_matmul(257, 300, 129),
    "matmul-2048x768x64": _det_matmul(2048, 768, 64),
    "matmul-transb-2048x768x64": _det_matmul(2048, 768, 64, trans_b=True),
    "matmul_backward-257x300x129": _det_matmul_backward(257, 300, 129),
    "matmul_backward-2048x768x64": _det_matmul_backward(2048, 768, 64),
    "matmul_backward-transb-2048x768x64": _det_matmul_backward(2048, 768, 64, trans_b=True),
    "attention_forward": _det_attention(False),
    "attention_backward": _det_attention(True),
    "layernorm_backward": _det_norm_backward("layernorm"),
    "rmsnorm_backward": _det_norm_backward("rmsnorm"),
    "embedding_backward": _det_embedding_backward,
    "cross_entropy": _det_cross_entropy(False),
    "cross_entropy_backward": _det_cross_entropy(True),
    "softmax": _det_softmax,
}


@pytest.mark.parametrize("case", list(DETERMINISM_CASES))
def test_thread_count_determinism(K, isa, restore_threads, rng, case):
    fn = DETERMINISM_CASES[case](rng)
    results = _results_with_threads(K, lambda: fn(K), [1, 2, 3, 1])
    first = _flatten(results[0])
    for n, res in zip([2, 3, 1], results[1:]):
        for i, (a, b) in enumerate(zip(_flatten(res), first)):
            assert_bitwise_equal(a, b, name=f"{case} output {i} with {n} threads vs 1 thread")


def test_concurrent_calls_from_python_threads(K, rng):
    # Kernels release the GIL: several Python threads calling at once must get correct results.
    a, b = randn(rng, 257, 300), randn(rng, 300, 129)
    q, k, v = randn(rng, 1, 4, 65, 32), randn(rng, 1, 2, 65, 32), randn(rng, 1, 2, 65, 32)
    exp_mm, exp_att = K.matmul(a, b), K.attention(q, k, v)
    errors = []

    def work():
        try:
            for _ in range(5):
                assert_bitwise_equal(K.matmul(a, b), exp_mm)
                assert_bitwise_equal(K.attention(q, k, v), exp_att)
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


# ----------------------------------------------------------------------------- a call for every kernel

def _call_specs(rng):
    """name -> (positional args, keyword args): one valid, small, awkward call of each kernel."""
    s = {}
    a, b, bias = randn(rng, 2, 5, 7), randn(rng, 7, 3), randn(rng, 3)
    s["matmul"] = ((a, b, bias), {})
    s["matmul_backward"] = ((randn(rng, 2, 5, 3), a, b), {"bias": True})
    x = randn(rng, 4, 17)
    s["softmax"] = ((x,), {})
    s["softmax_backward"] = ((randn(rng, 4, 17), R.softmax(x)), {})
    w, bb = randn(rng, 17, offset=1.0), randn(rng, 17)
    s["layernorm"] = ((x, w, bb), {})
    s["layernorm_forward"] = ((x, w, bb), {})
    _, mean, rstd = R.layernorm_forward(x, w, bb)
    s["layernorm_backward"] = ((randn(rng, 4, 17), x, w, mean, rstd), {})
    s["rmsnorm"] = ((x, w), {})
    s["rmsnorm_forward"] = ((x, w), {})
    s["rmsnorm_backward"] = ((randn(rng, 4, 17), x, w, R.rmsnorm_forward(x, w)[1]), {})
    s["gelu"] = ((x,), {})
    s["gelu_backward"] = ((randn(rng, 4, 17), x), {})
    s["silu"] = ((x,), {})
    s["silu_backward"] = ((randn(rng, 4, 17), x), {})
    up = randn(rng, 4, 17)
    s["swiglu"] = ((x, up), {})
    s["swiglu_backward"] = ((randn(rng, 4, 17), x, up), {})
    s["geglu"] = ((x, up), {})
    s["geglu_backward"] = ((randn(rng, 4, 17), x, up), {})
    cos, sin = R.rope_tables(np.arange(5) + 3, 8)
    s["rope"] = ((randn(rng, 1, 2, 5, 8), cos, sin), {})
    s["rope_backward"] = ((randn(rng, 1, 2, 5, 8), cos, sin), {})
    q, k, v = randn(rng, 1, 4, 5, 8), randn(rng, 1, 2, 6, 8), randn(rng, 1, 2, 6, 8)
    s["attention"] = ((q, k, v), {"causal": True})
    s["attention_forward"] = ((q, k, v), {"causal": True})
    out, lse = R.attention_forward(q, k, v, True)
    s["attention_backward"] = ((randn(rng, 1, 4, 5, 8), q, k, v, out, lse), {"causal": True})
    logits = randn(rng, 6, 11)
    targets = np.array([0, 10, -100, 4, 4, 7])
    s["cross_entropy"] = ((logits, targets), {})
    s["cross_entropy_forward"] = ((logits, targets), {})
    s["cross_entropy_backward"] = ((logits, targets, R.cross_entropy_forward(logits, targets)[1]),
                                   {"dloss": 0.5})
    ids, weight = np.array([[1, 6, 1], [0, 2, 6]]), randn(rng, 7, 5)
    s["embedding"] = ((ids, weight), {})
    s["embedding_backward"] = ((randn(rng, 2, 3, 5), ids, 7), {})
    return s


CALL_NAMES = list(_call_specs(np.random.default_rng(0)).keys())


def _param_names(name):
    return list(inspect.signature(getattr(R, name)).parameters)


def _float_args(name, args):
    names = _param_names(name)
    return [(i, names[i]) for i, arg in enumerate(args)
            if isinstance(arg, np.ndarray) and arg.dtype == np.float32]


def _int_args(name, args):
    names = _param_names(name)
    return [(i, names[i]) for i, arg in enumerate(args)
            if isinstance(arg, np.ndarray) and arg.dtype.kind in "iu"]


def _compare_outputs(got, exp, name, rtol=1e-5, rel_atol=1e-5):
    if isinstance(exp, tuple):
        assert isinstance(got, tuple) and len(got) == len(exp), f"{name}: expected a {len(exp)}-tuple"
        for i, (g, e) in enumerate(zip(got, exp)):
            _compare_outputs(g, e, f"{name}[{i}]", rtol, rel_atol)
        return
    if exp is None:
        assert got is None, f"{name}: expected None"
        return
    if np.ndim(exp) == 0:
        assert np.ndim(got) == 0, f"{name}: expected a scalar, got shape {np.shape(got)}"
        assert_close(np.float64(got), np.float64(exp), rtol=rtol, atol=scaled(exp, rel_atol), name=name)
        return
    assert isinstance(got, np.ndarray), f"{name}: expected an ndarray, got {type(got)}"
    assert got.flags.c_contiguous, f"{name}: output is not C-contiguous"
    assert_close(got, exp, rtol=rtol, atol=scaled(exp, rel_atol), name=name)


@pytest.mark.parametrize("name", CALL_NAMES)
def test_every_kernel_matches_reference_on_sample_call(K, isa, rng, name):
    args, kwargs = _call_specs(rng)[name]
    _compare_outputs(getattr(K, name)(*args, **kwargs), getattr(R, name)(*args, **kwargs), name,
                     rtol=1e-4, rel_atol=2e-5)


@pytest.mark.parametrize("name", CALL_NAMES)
def test_inputs_not_modified(K, rng, name):
    args, kwargs = _call_specs(rng)[name]
    copies = [a.copy() if isinstance(a, np.ndarray) else a for a in args]
    getattr(K, name)(*args, **kwargs)
    for i, (a, c) in enumerate(zip(args, copies)):
        if isinstance(a, np.ndarray):
            assert_bitwise_equal(a, c, name=f"{name}: argument {_param_names(name)[i]} was modified")


@pytest.mark.parametrize("name", CALL_NAMES)
def test_outputs_are_fresh_arrays(K, rng, name):
    # Each call returns new arrays (backward kernels accumulate in C++: the Python side must
    # zero fresh buffers each time), sharing no memory with the inputs or with earlier results.
    args, kwargs = _call_specs(rng)[name]
    fn = getattr(K, name)
    first = _flatten(fn(*args, **kwargs))
    first_copy = [np.array(r, copy=True) for r in first]
    second = _flatten(fn(*args, **kwargs))
    for i, (r1, r1c, r2) in enumerate(zip(first, first_copy, second)):
        assert_bitwise_equal(r2, r1c, name=f"{name} output {i}: second call differs (accumulation?)")
        assert_bitwise_equal(r1, r1c, name=f"{name} output {i}: first result changed by second call")
        if isinstance(r1, np.ndarray) and r1.ndim:
            assert not np.shares_memory(r1, r2), f"{name} output {i}: calls share an output buffer"
            for a in args:
                if isinstance(a, np.ndarray):
                    assert not np.shares_memory(r1, a), f"{name} output {i} is a view of an input"
            assert r1.flags.writeable, f"{name} output {i} is read-only"


# ----------------------------------------------------------------------------- conversions

def _variants(arr):
    """(label, array with the same values as float32 `arr` in another dtype or memory layout,
    the float32 values the kernel should then see)."""
    yield "float64", arr.astype(np.float64), arr
    f16 = arr.astype(np.float16)
    yield "float16", f16, f16.astype(np.float32)
    wide = np.repeat(arr[..., None], 2, axis=-1).reshape(arr.shape[:-1] + (2 * arr.shape[-1],))
    yield "strided", wide[..., ::2], arr
    rev = np.ascontiguousarray(arr[::-1])
    yield "negative-stride", rev[::-1], arr
    if arr.ndim >= 2:
        yield "fortran", np.asfortranarray(arr), arr
    ro = arr.copy()
    ro.flags.writeable = False
    yield "read-only", ro, arr


def _conversion_cases():
    specs = _call_specs(np.random.default_rng(0))
    cases = []
    for name, (args, _) in specs.items():
        for i, pname in _float_args(name, args):
            for label, _, _ in _variants(args[i]):
                cases.append(pytest.param(name, i, label, id=f"{name}-{pname}-{label}"))
    return cases


@pytest.mark.parametrize("name, index, label", _conversion_cases())
def test_float_conversions(K, name, index, label):
    args, kwargs = _call_specs(np.random.default_rng(0))[name]
    variant, seen = next((v, s) for lab, v, s in _variants(args[index]) if lab == label)
    args_variant = list(args)
    args_variant[index] = variant
    args_seen = list(args)
    args_seen[index] = np.ascontiguousarray(seen)
    fn = getattr(K, name)
    _compare_outputs(fn(*args_variant, **kwargs), fn(*args_seen, **kwargs), f"{name}[{label}]",
                     rtol=1e-6, rel_atol=1e-6)


def test_attention_on_transposed_views(K, isa, rng):
    # The usual layout in a model: (B, T, NH, HS) projections viewed as (B, NH, T, HS).
    qkv = randn(rng, 2, 9, 3, 4, 16)              # B, T, (q|k|v), NH, HS
    q, k, v = (qkv[:, :, j].transpose(0, 2, 1, 3) for j in range(3))
    assert not q.flags.c_contiguous
    exp = R.attention(np.ascontiguousarray(q), np.ascontiguousarray(k), np.ascontiguousarray(v))
    assert_close(K.attention(q, k, v), exp, rtol=1e-4, atol=2e-5)


# ----------------------------------------------------------------------------- heads at strides

STRIDED_CASES = [  # (B, T, NH, NKV, HS, causal)
    (1, 1, 1, 1, 2, True), (2, 5, 4, 2, 16, True), (1, 17, 3, 1, 6, True), (2, 9, 2, 2, 64, False),
    (1, 65, 4, 4, 34, True), (3, 3, 6, 3, 80, True),
]


@pytest.mark.parametrize("case", STRIDED_CASES, ids=lambda c: "B{}-T{}-NH{}-NKV{}-HS{}-{}".format(
    *c[:5], "causal" if c[5] else "full"))
def test_attention_on_column_blocks_of_a_fused_projection(K, isa, rng, case):
    # What the model passes: q, k and v as strided views of one (N, QKV) projection output, the
    # result written into an (N, NH HS) buffer, the gradients into an (N, QKV) buffer; a padding
    # column after each row proves that nothing outside the views is touched.
    B, T, NH, NKV, HS, causal = case
    width = (NH + 2 * NKV) * HS
    qkv = randn(rng, B * T, width + 1)

    def views(buffer):
        heads = buffer[:, :width].reshape(B, T, NH + 2 * NKV, HS)
        return (heads[:, :, :NH].transpose(0, 2, 1, 3), heads[:, :, NH:NH + NKV].transpose(0, 2, 1, 3),
                heads[:, :, NH + NKV:].transpose(0, 2, 1, 3))

    q, k, v = views(qkv)
    atty = np.full((B * T, NH * HS + 1), 7.0, np.float32)
    out = atty[:, :NH * HS].reshape(B, T, NH, HS).transpose(0, 2, 1, 3)
    lse = np.empty((B, NH, T), np.float32)
    K.unchecked.attention_forward(out, lse, q, k, v, causal, None)
    e_out, e_lse = R.attention_forward(*(np.ascontiguousarray(t) for t in (q, k, v)), causal)
    assert_close(out, e_out, rtol=1e-4, atol=2e-5, name="out")
    assert_close(lse, e_lse, rtol=1e-5, atol=scaled(e_lse, 2e-6), name="lse")
    assert (atty[:, -1] == 7.0).all()
    dout_buf = randn(rng, B * T, NH * HS + 1)
    dout = dout_buf[:, :NH * HS].reshape(B, T, NH, HS).transpose(0, 2, 1, 3)
    dqkv = np.full_like(qkv, 7.0)
    dq, dk, dv = views(dqkv)
    K.unchecked.attention_backward(dq, dk, dv, dout, q, k, v, out, lse, causal)
    exp = R.attention_backward(*(np.ascontiguousarray(t) for t in (dout, q, k, v, out, lse)), causal)
    for g, e, nm in zip((dq, dk, dv), exp, ("dq", "dk", "dv")):
        assert_close(g, e, rtol=1e-3, atol=scaled(e, 1e-4), name=nm)
    assert (dqkv[:, -1] == 7.0).all()


@pytest.mark.parametrize("case", [(1, 1, 1, 1, 4, 5), (3, 1, 4, 2, 16, 20), (2, 3, 2, 1, 64, 12), (2, 4, 3, 3, 6, 9)],
                         ids=lambda c: "B{}-Tq{}-NH{}-NKV{}-HS{}-cap{}".format(*c))
def test_decode_step_kernels_equal_their_twins(K, isa, rng, case):
    # A ragged batch continuing a KV cache: rope at each row's own position, kv_write into the
    # cache, attention over each row's own length.
    B, Tq, NH, NKV, HS, cap = case
    lengths = rng.integers(0, cap - Tq + 1, B).astype(np.int64)
    cos, sin = R.rope_tables(cap, HS)
    x = randn(rng, B, Tq, NH + 2 * NKV, HS)
    q, k, v = x[:, :, :NH], x[:, :, NH:NH + NKV], x[:, :, NH + NKV:]
    assert_close(K.rope_at(q, cos, sin, lengths), R.rope_at(q, cos, sin, lengths), rtol=1e-5, atol=1e-6,
                 name="rope_at")
    rotated_k = R.rope_at(k, cos, sin, lengths)
    in_place = x.copy()
    K.unchecked.rope_forward(in_place[:, :, NH:NH + NKV], in_place[:, :, NH:NH + NKV], cos, sin, lengths)
    assert_close(in_place[:, :, NH:NH + NKV], rotated_k, rtol=1e-5, atol=1e-6, name="rope in place")
    assert_bitwise_equal(in_place[:, :, :NH], x[:, :, :NH])
    cache_k, cache_v = randn(rng, B, NKV, cap, HS), randn(rng, B, NKV, cap, HS)
    exp_k, exp_v = cache_k.copy(), cache_v.copy()
    R.kv_write(exp_k, in_place[:, :, NH:NH + NKV], lengths)   # a copy: bit for bit
    R.kv_write(exp_v, v, lengths)
    K.kv_write(cache_k, in_place[:, :, NH:NH + NKV], lengths)
    K.kv_write(cache_v, v, lengths)
    assert_bitwise_equal(cache_k, exp_k)
    assert_bitwise_equal(cache_v, exp_v)
    q_rot = R.rope_at(q, cos, sin, lengths)
    out, lse = np.empty((B, NH, Tq, HS), np.float32), np.empty((B, NH, Tq), np.float32)
    K.unchecked.attention_forward(out, lse, q_rot.transpose(0, 2, 1, 3), cache_k, cache_v, True, lengths + Tq)
    e_out, e_lse = R.attention_forward(np.ascontiguousarray(q_rot.transpose(0, 2, 1, 3)), exp_k, exp_v, True,
                                       lengths + Tq)
    assert_close(out, e_out, rtol=1e-4, atol=2e-5, name="out")
    assert_close(lse, e_lse, rtol=1e-5, atol=scaled(e_lse, 2e-6), name="lse")


def test_strided_kernels_refuse_what_does_not_fit(K):
    q = np.zeros((1, 2, 3, 4), np.float32)
    with pytest.raises(ValueError, match="inconsistent"):
        K.unchecked.attention_forward(np.zeros_like(q), np.zeros((1, 2, 3), np.float32), q,
                                      np.zeros((1, 3, 3, 4), np.float32), np.zeros((1, 3, 3, 4), np.float32), True, None)
    with pytest.raises(ValueError, match="contiguous"):
        K.unchecked.attention_forward(np.zeros_like(q), np.zeros((1, 2, 3), np.float32), q[..., ::2], q[..., ::2],
                                      q[..., ::2], True, None)
    with pytest.raises(ValueError, match="lse"):
        K.unchecked.attention_forward(np.zeros_like(q), np.zeros(5, np.float32), q, q, q, True, None)
    cos, sin = R.rope_tables(4, 4)
    x = np.zeros((2, 3, 1, 4), np.float32)
    with pytest.raises(ValueError, match="pos0"):
        K.rope_at(x, cos, sin, [0, 2])      # row 1 needs positions 2..4 of a 4-row table
    with pytest.raises(ValueError, match="pos0"):
        K.kv_write(np.zeros((2, 1, 4, 4), np.float32), x, [2, 0])
    with pytest.raises(ValueError, match="writeable"):
        K.unchecked.rope_forward(np.broadcast_to(x, x.shape), x, cos, sin, None)


def test_the_unchecked_entrance_refuses_out_of_bounds_calls(K):
    # The model's hot path skips pyllm.kernels' checks; what the bindings still refuse is what
    # would read or write outside the arrays.
    logits, losses, lse = np.zeros((2, 5), np.float32), np.zeros(2, np.float32), np.zeros(2, np.float32)
    with pytest.raises(ValueError, match="target"):
        K.unchecked.cross_entropy_forward(losses, lse, logits, np.array([0, 5]), 2, 5, -100)
    with pytest.raises(ValueError, match="target"):
        K.unchecked.cross_entropy_backward(logits, logits, lse, np.array([-3, 1]), 1.0, 2, 5, -100)
    K.unchecked.cross_entropy_forward(losses, lse, logits, np.array([-100, 4]), 2, 5, -100)   # ignored: fine
    out, a = np.zeros(8, np.float32), np.zeros(8, np.float32)
    with pytest.raises(ValueError, match="too large|negative"):
        K.unchecked.matmul_forward(out, a, a, None, 2 ** 61, 8, 8, False)    # 2^61 * 8 wraps to 0
    with pytest.raises(ValueError, match="negative"):
        K.unchecked.matmul_forward(out, a, a, None, -1, 1, 1, False)
    cos, sin = R.rope_tables(4, 4)
    x = np.zeros((1, 2, 1, 4), np.float32)
    with pytest.raises(ValueError, match="pos0"):
        K.unchecked.rope_forward(x, x, cos, sin, np.array([2 ** 63 - 1]))
    with pytest.raises(ValueError, match="pos0"):
        K.unchecked.kv_write(np.zeros((1, 1, 4, 4), np.float32), x, np.array([2 ** 63 - 1]))


PACKED = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]


def _blocks(rng, ggml_type, N, K):
    """Random but valid ggml rows: random packed values, finite float16 scales."""
    values, nbytes = R.BLOCKS[ggml_type]
    blocks = rng.integers(0, 256, (N * K // values, nbytes), dtype=np.uint8)
    for at in {R.Q4_1: (0, 2), R.Q5_1: (0, 2), R.Q4_K: (0, 2), R.Q6_K: (208,)}.get(ggml_type, (0,)):
        blocks[:, at:at + 2] = rng.uniform(-0.02, 0.02, (len(blocks), 1)).astype(np.float16).view(np.uint8)
    return blocks.reshape(N, K // values * nbytes)


@pytest.mark.parametrize("name", PACKED)
@pytest.mark.parametrize("N,Kd,M", [(1, 32, 1), (7, 96, 1), (33, 576, 3), (64, 1536, 5), (5, 32, 9), (130, 448, 2),
                                    (17, 2080, 16)], ids=lambda v: str(v))
def test_packed_rows_equal_their_twin_and_do_not_depend_on_the_batch(K, isa, rng, name, N, Kd, M):
    t = K.QUANT_TYPES[name]
    w = _blocks(rng, t, N, Kd)
    packed = K.pack_quant(w, t, (N, Kd))
    assert_bitwise_equal(packed, R.pack_quant(w, t, (N, Kd)))
    assert_bitwise_equal(R.unpack_quant(packed, t, (N, Kd)), w)
    a = randn(rng, M, Kd, scale=3.0)
    got = K.matmul_rows(a, packed, t, (N, Kd))
    expected = R.matmul_rows(a, packed, t, (N, Kd))
    assert_close(got, expected, rtol=1e-4, atol=scaled(expected, 2e-5), name="matmul_rows")
    for i in range(M):   # each row alone gives what it gives in the batch, bit for bit
        assert_bitwise_equal(K.matmul_rows(a[i:i + 1], packed, t, (N, Kd))[0], got[i])
    # The native kernels read the packed layout too, with the twin's values.
    for int8 in (False, True):
        want = R.matmul_quant(a, w, t, (N, Kd), int8)
        assert_close(K.matmul_quant(a, packed, t, (N, Kd), int8, packed=True), want, rtol=1e-4,
                     atol=scaled(want, 2e-5), name=f"matmul_quant packed, int8 {int8}")
    assert_bitwise_equal(K.dequantize(packed, t, (N, Kd), packed=True), K.dequantize(w, t, (N, Kd)))
    dout = randn(rng, M, N)
    assert_bitwise_equal(K.matmul_quant_backward(dout, packed, t, (N, Kd), packed=True),
                         K.matmul_quant_backward(dout, w, t, (N, Kd)))


@pytest.mark.parametrize("name", PACKED)
def test_packed_parts_in_one_call_are_each_the_single_call(K, isa, rng, name):
    # Llama's gate and up read one input: one call over both parts, each part matmul_rows's result.
    t = K.QUANT_TYPES[name]
    shapes = [(37, 576), (6, 576), (0, 576), (130, 576)]
    parts = [(K.pack_quant(_blocks(rng, t, N, Kd), t, (N, Kd)), (N, Kd)) for N, Kd in shapes]
    a = randn(rng, 5, 576, scale=2.0)
    for got, (w, shape) in zip(K.matmul_rows_parts(a, parts, t), parts):
        assert_bitwise_equal(got, K.matmul_rows(a, w, t, shape))
    with pytest.raises(ValueError, match="K differ"):
        K.matmul_rows_parts(a, [parts[0], (K.pack_quant(_blocks(rng, t, 2, 64), t, (2, 64)), (2, 64))], t)
    with pytest.raises(ValueError, match="no weight"):
        K.matmul_rows_parts(a, [], t)


@pytest.mark.parametrize("name", ["Q4_0", "Q5_1", "Q8_0", "Q4_K", "Q6_K"])
@pytest.mark.parametrize("N", [1, 17, 40])
def test_embedding_rows_of_quantized_tables_equal_their_twin(K, isa, rng, name, N):
    t = K.QUANT_TYPES[name]
    Kd = 256 if name in ("Q4_K", "Q6_K") else 96
    w = _blocks(rng, t, N, Kd)
    ids = rng.integers(0, N, (3, 5))
    ids[0, 0], ids[-1, -1] = 0, N - 1
    layouts = [(w, False)] + ([(K.pack_quant(w, t, (N, Kd)), True)] if name in PACKED else [])
    for data, packed in layouts:
        got = K.embed_quant(data, t, (N, Kd), ids, packed=packed)
        assert got.shape == (3, 5, Kd)
        assert_close(got, R.embed_quant(data, t, (N, Kd), ids, packed), rtol=0, atol=0, name="embed_quant")
        assert_bitwise_equal(K.embed_quant(data, t, (N, Kd), ids[1, 2], packed=packed), got[1, 2])
        for bad in (-1, N):
            with pytest.raises(ValueError, match="outside"):
                K.embed_quant(data, t, (N, Kd), [0, bad], packed=packed)
    with pytest.raises(TypeError, match="integers"):
        K.embed_quant(w, t, (N, Kd), np.zeros(2, np.float32))


def test_packed_layouts_are_refused_for_types_without_one(K):
    w = np.zeros((2, 144), np.uint8)
    with pytest.raises(ValueError, match="no packed layout"):
        K.pack_quant(w, K.QUANT_TYPES["Q4_K"], (2, 256))
    with pytest.raises(ValueError, match="no packed layout"):
        K.matmul_quant(np.ones((1, 256), np.float32), w, K.QUANT_TYPES["Q4_K"], (2, 256), packed=True)


def test_the_ggml_type_table_agrees_with_the_twin(K):
    # The C++ table (csrc/kernels/quant_types.h) and the numpy decoders' own statement of the layouts.
    assert set(K.GGML_TYPES) == set(R.BLOCKS)
    for ggml_id, (values, nbytes) in R.BLOCKS.items():
        t = K.GGML_TYPES[ggml_id]
        assert (t.block_values, t.block_bytes) == (values, nbytes), t.name
    assert K.QUANT_TYPES == {t.name: t.id for t in K.GGML_TYPES.values() if t.block_values > 1}
    assert {t.name for t in K.GGML_TYPES.values() if t.packed} == set(PACKED)


def test_the_unchecked_entrance_is_every_kernel_of_the_table(K):
    names = [n for n in vars(K.unchecked) if not n.startswith("_")]
    assert names == K._C.kernel_names() and len(names) >= 25


# ----------------------------------------------------------------------------- bad arguments

def _bad_dtype_values(arr):
    yield "int", arr.astype(np.int64)
    yield "int32", arr.astype(np.int32)
    yield "bool", arr > 0
    yield "complex", arr.astype(np.complex64)
    yield "object", arr.astype(object)
    yield "str", np.full(arr.shape, "x")


def _type_error_cases():
    specs = _call_specs(np.random.default_rng(0))
    cases = []
    for name, (args, _) in specs.items():
        for i, pname in _float_args(name, args):
            for label, _ in _bad_dtype_values(args[i]):
                cases.append(pytest.param(name, i, pname, label, id=f"{name}-{pname}-{label}"))
    return cases


@pytest.mark.parametrize("name, index, pname, label", _type_error_cases())
def test_non_float_data_is_type_error(K, name, index, pname, label):
    args, kwargs = _call_specs(np.random.default_rng(0))[name]
    bad = dict(_bad_dtype_values(args[index]))[label]
    args = list(args)
    args[index] = bad
    with pytest.raises(TypeError, match=rf"\b{pname}\b"):
        getattr(K, name)(*args, **kwargs)


def _float_id_cases():
    specs = _call_specs(np.random.default_rng(0))
    return [pytest.param(name, i, pname, id=f"{name}-{pname}")
            for name, (args, _) in specs.items() for i, pname in _int_args(name, args)]


@pytest.mark.parametrize("name, index, pname", _float_id_cases())
def test_float_ids_are_type_error(K, name, index, pname):
    args, kwargs = _call_specs(np.random.default_rng(0))[name]
    args = list(args)
    args[index] = args[index].astype(np.float32)
    with pytest.raises(TypeError, match=rf"\b{pname}\b"):
        getattr(K, name)(*args, **kwargs)
    args[index] = args[index].astype(np.float64)
    with pytest.raises(TypeError, match=rf"\b{pname}\b"):
        getattr(K, name)(*args, **kwargs)


def _f(*shape):
    return np.ones(shape, np.float32)


def _value_error_cases():
    """(id, callable(K), regex the message must match, substrings it must contain)."""
    cos4, sin4 = R.rope_tables(5, 8)                      # (5, 4)
    lse_ok = np.zeros((1, 4, 5), np.float32)
    q, k, v = _f(1, 4, 5, 8), _f(1, 2, 5, 8), _f(1, 2, 5, 8)
    ce_logits, ce_t = _f(6, 11), np.array([0, 10, -100, 4, 4, 7])
    C = [
        # matmul
        ("matmul-K-mismatch", lambda K: K.matmul(_f(5, 7), _f(11, 3)), r"\b(a|b)\b", ["7", "11"]),
        ("matmul-transb-K-mismatch", lambda K: K.matmul(_f(5, 7), _f(3, 11), trans_b=True),
         r"\b(a|b)\b", ["7", "11"]),
        ("matmul-b-3d", lambda K: K.matmul(_f(5, 7), _f(1, 7, 3)), r"\bb\b", []),
        ("matmul-b-1d", lambda K: K.matmul(_f(5, 7), _f(7)), r"\bb\b", []),
        ("matmul-bias-shape", lambda K: K.matmul(_f(5, 7), _f(7, 3), _f(4)), r"\bbias\b", ["4"]),
        ("matmul-bias-2d", lambda K: K.matmul(_f(5, 7), _f(7, 3), _f(1, 3)), r"\bbias\b", []),
        ("matmul_backward-dout-N", lambda K: K.matmul_backward(_f(5, 4), _f(5, 7), _f(7, 3)),
         r"\bdout\b", []),
        ("matmul_backward-dout-M", lambda K: K.matmul_backward(_f(6, 3), _f(5, 7), _f(7, 3)),
         r"\b(dout|a)\b", []),
        ("matmul_backward-K", lambda K: K.matmul_backward(_f(5, 3), _f(5, 7), _f(8, 3)),
         r"\b(a|b)\b", []),
        # softmax
        ("softmax-0d", lambda K: K.softmax(np.float32(1.0)), r"\bx\b", []),
        ("softmax_backward-shape", lambda K: K.softmax_backward(_f(4, 17), _f(4, 16)),
         r"\b(dout|y)\b", ["17", "16"]),
        # layernorm / rmsnorm
        ("layernorm-w", lambda K: K.layernorm(_f(4, 17), _f(16), _f(17)), r"\bw\b", ["16", "17"]),
        ("layernorm-b", lambda K: K.layernorm(_f(4, 17), _f(17), _f(18)), r"\bb\b", ["18"]),
        ("layernorm-w-2d", lambda K: K.layernorm_forward(_f(4, 17), _f(1, 17), _f(17)), r"\bw\b", []),
        ("layernorm_backward-mean", lambda K: K.layernorm_backward(_f(4, 17), _f(4, 17), _f(17), _f(5), _f(4)),
         r"\bmean\b", []),
        ("layernorm_backward-rstd", lambda K: K.layernorm_backward(_f(4, 17), _f(4, 17), _f(17), _f(4), _f(4, 1)),
         r"\brstd\b", []),
        ("layernorm_backward-dout", lambda K: K.layernorm_backward(_f(4, 16), _f(4, 17), _f(17), _f(4), _f(4)),
         r"\bdout\b", []),
        ("layernorm_backward-w", lambda K: K.layernorm_backward(_f(4, 17), _f(4, 17), _f(3), _f(4), _f(4)),
         r"\bw\b", []),
        ("rmsnorm-w", lambda K: K.rmsnorm(_f(2, 3, 17), _f(3)), r"\bw\b", []),
        ("rmsnorm_forward-w", lambda K: K.rmsnorm_forward(_f(2, 3, 17), _f(17, 1)), r"\bw\b", []),
        ("rmsnorm_backward-rstd", lambda K: K.rmsnorm_backward(_f(2, 3, 17), _f(2, 3, 17), _f(17), _f(2)),
         r"\brstd\b", []),
        ("rmsnorm_backward-dout", lambda K: K.rmsnorm_backward(_f(2, 3, 16), _f(2, 3, 17), _f(17), _f(2, 3)),
         r"\bdout\b", []),
        # activations
        ("gelu_backward-shape", lambda K: K.gelu_backward(_f(4, 17), _f(17, 4)), r"\b(dout|x)\b", []),
        ("silu_backward-shape", lambda K: K.silu_backward(_f(5), _f(6)), r"\b(dout|x)\b", []),
        ("swiglu-shape", lambda K: K.swiglu(_f(4, 17), _f(4, 18)), r"\b(gate|up)\b", []),
        ("swiglu_backward-dout", lambda K: K.swiglu_backward(_f(3), _f(4), _f(4)), r"\b(dout|gate)\b", []),
        ("swiglu_backward-up", lambda K: K.swiglu_backward(_f(4), _f(4), _f(5)), r"\b(gate|up)\b", []),
        ("geglu-shape", lambda K: K.geglu(_f(4, 17), _f(4, 18)), r"\b(gate|up)\b", []),
        ("geglu_backward-dout", lambda K: K.geglu_backward(_f(3), _f(4), _f(4)), r"\b(dout|gate)\b", []),
        # rope
        ("rope-odd-HS", lambda K: K.rope(_f(1, 1, 5, 7), _f(5, 3), _f(5, 3)), r"(?i)even|\bHS\b|head", []),
        ("rope-cos-T", lambda K: K.rope(_f(1, 2, 5, 8), _f(6, 4), sin4), r"\bcos\b", []),
        ("rope-cos-HS", lambda K: K.rope(_f(1, 2, 5, 8), _f(5, 8), sin4), r"\bcos\b", []),
        ("rope-sin", lambda K: K.rope(_f(1, 2, 5, 8), cos4, _f(5, 3)), r"\bsin\b", []),
        ("rope-cos-1d", lambda K: K.rope(_f(1, 2, 5, 8), _f(20), sin4), r"\bcos\b", []),
        ("rope_backward-odd-HS", lambda K: K.rope_backward(_f(1, 1, 5, 5), _f(5, 2), _f(5, 2)),
         r"(?i)even|\bHS\b|head", []),
        ("rope_backward-sin", lambda K: K.rope_backward(_f(1, 2, 5, 8), cos4, _f(4, 4)), r"\bsin\b", []),
        # attention
        ("attention-q-3d", lambda K: K.attention(_f(4, 5, 8), k, v), r"\bq\b", []),
        ("attention-k-3d", lambda K: K.attention(q, _f(2, 5, 8), v), r"\bk\b", []),
        ("attention-NH-not-multiple", lambda K: K.attention(_f(1, 3, 5, 8), k, v),
         r"(?i)\bNH\b|\bNKV\b|head|\b(q|k)\b", []),
        ("attention-HS-differ", lambda K: K.attention(_f(1, 4, 5, 16), k, v),
         r"(?i)\bHS\b|head.?size|\b(q|k)\b", []),
        ("attention-v-shape", lambda K: K.attention(q, k, _f(1, 2, 6, 8)), r"\bv\b", []),
        ("attention-batch", lambda K: K.attention(_f(2, 4, 5, 8), k, v), r"(?i)\b(q|k|v)\b|batch", []),
        ("attention-causal-Tk<Tq", lambda K: K.attention(_f(1, 4, 6, 8), k, v, causal=True),
         r"(?i)causal|\bTk\b|\bTq\b|keys", []),
        ("attention_forward-causal-Tk<Tq", lambda K: K.attention_forward(_f(1, 2, 3, 4), _f(1, 1, 1, 4), _f(1, 1, 1, 4)),
         r"(?i)causal|\bTk\b|\bTq\b|keys", []),
        ("attention_backward-causal-Tk<Tq",
         lambda K: K.attention_backward(_f(1, 4, 6, 8), _f(1, 4, 6, 8), k, v, _f(1, 4, 6, 8), _f(1, 4, 6)),
         r"(?i)causal|\bTk\b|\bTq\b|keys", []),
        ("attention_backward-out", lambda K: K.attention_backward(_f(1, 4, 5, 8), q, k, v, _f(1, 4, 5, 7), lse_ok),
         r"\bout\b", []),
        ("attention_backward-lse", lambda K: K.attention_backward(_f(1, 4, 5, 8), q, k, v, _f(1, 4, 5, 8), _f(1, 4, 6)),
         r"\blse\b", []),
        ("attention_backward-dout", lambda K: K.attention_backward(_f(1, 4, 4, 8), q, k, v, _f(1, 4, 5, 8), lse_ok),
         r"\bdout\b", []),
        ("attention_backward-NH", lambda K: K.attention_backward(_f(1, 3, 5, 8), _f(1, 3, 5, 8), k, v,
                                                                 _f(1, 3, 5, 8), _f(1, 3, 5)),
         r"(?i)\bNH\b|\bNKV\b|head|\b(q|k)\b", []),
        # cross-entropy
        ("cross_entropy-target-V", lambda K: K.cross_entropy(ce_logits, np.array([0, 11, 1, 1, 1, 1])),
         r"\btargets?\b", ["11"]),
        ("cross_entropy-target-negative", lambda K: K.cross_entropy(ce_logits, np.array([0, -1, 1, 1, 1, 1])),
         r"\btargets?\b", ["-1"]),
        ("cross_entropy-ignore-not-default", lambda K: K.cross_entropy(ce_logits, ce_t, ignore_index=-1),
         r"\btargets?\b", ["-100"]),
        ("cross_entropy_forward-target-V", lambda K: K.cross_entropy_forward(ce_logits, np.array([0, 1, 1, 1, 1, 99])),
         r"\btargets?\b", ["99"]),
        ("cross_entropy_backward-target-V",
         lambda K: K.cross_entropy_backward(ce_logits, np.array([0, 1, 1, 1, 1, 11]), _f(6)), r"\btargets?\b", []),
        ("cross_entropy-targets-shape", lambda K: K.cross_entropy(ce_logits, np.zeros(5, np.int64)),
         r"\b(targets?|logits)\b", []),
        ("cross_entropy_backward-lse", lambda K: K.cross_entropy_backward(ce_logits, ce_t, _f(5)), r"\blse\b", []),
        # embedding
        ("embedding-id-V", lambda K: K.embedding(np.array([0, 7]), _f(7, 5)), r"\bids\b", ["7"]),
        ("embedding-id-negative", lambda K: K.embedding(np.array([[0, -1]]), _f(7, 5)), r"\bids\b", ["-1"]),
        ("embedding-weight-1d", lambda K: K.embedding(np.array([0, 1]), _f(7)), r"\bweight\b", []),
        ("embedding_backward-id-V", lambda K: K.embedding_backward(_f(2, 5), np.array([0, 7]), 7),
         r"\bids\b|vocab", []),
        ("embedding_backward-id-negative", lambda K: K.embedding_backward(_f(2, 5), np.array([0, -3]), 7),
         r"\bids\b", []),
        ("embedding_backward-dout", lambda K: K.embedding_backward(_f(3, 5), np.array([0, 1]), 7),
         r"\b(dout|ids)\b", []),
    ]
    return [pytest.param(fn, pattern, must, id=cid) for cid, fn, pattern, must in C]


@pytest.mark.parametrize("call, pattern, must_contain", _value_error_cases())
def test_bad_shapes_and_values_are_value_error(K, call, pattern, must_contain):
    with pytest.raises(ValueError, match=pattern) as info:
        call(K)
    msg = str(info.value)
    for s in must_contain:
        assert s in msg, f"error message should mention {s!r}: {msg!r}"


def _adamw_arrays(shape=(3, 4)):
    return _f(*shape), _f(*shape) * 0.1, np.zeros(shape, np.float32), np.zeros(shape, np.float32)


@pytest.mark.parametrize("which", ["param", "m", "v"])
@pytest.mark.parametrize("problem", ["float64", "float16", "non-contiguous", "read-only", "list"])
def test_adamw_state_must_be_writeable_contiguous_float32(K, which, problem):
    p, g, m, v = _adamw_arrays()
    state = {"param": p, "m": m, "v": v}
    arr = state[which]
    if problem == "float64":
        bad = arr.astype(np.float64)
    elif problem == "float16":
        bad = arr.astype(np.float16)
    elif problem == "non-contiguous":
        bad = np.zeros((3, 8), np.float32)[:, ::2]
    elif problem == "read-only":
        bad = arr.copy()
        bad.flags.writeable = False
    else:
        bad = arr.tolist()
    before = {k: np.array(val, copy=True) for k, val in state.items()}
    state[which] = bad
    with pytest.raises((TypeError, ValueError), match=rf"\b{which}\b"):
        K.adamw(state["param"], g, state["m"], state["v"], lr=1e-3, step=1)
    for k, val in state.items():   # nothing was updated half-way
        if k != which:
            assert_bitwise_equal(val, before[k], name=f"{k} changed by a rejected adamw call")


@pytest.mark.parametrize("which, shape", [("m", (3, 5)), ("v", (4, 3)), ("grad", (12,)), ("param", (3, 4, 1))])
def test_adamw_shapes_must_match(K, which, shape):
    p, g, m, v = _adamw_arrays()
    args = {"param": p, "grad": g, "m": m, "v": v}
    args[which] = np.zeros(shape, np.float32)
    with pytest.raises(ValueError, match=r"\b(param|grad|m|v)\b"):
        K.adamw(args["param"], args["grad"], args["m"], args["v"], lr=1e-3, step=1)


@pytest.mark.parametrize("step", [0, -1])
def test_adamw_step_must_be_positive(K, step):
    p, g, m, v = _adamw_arrays()
    p0 = p.copy()
    with pytest.raises(ValueError, match=r"\bstep\b"):
        K.adamw(p, g, m, v, lr=1e-3, step=step)
    assert_bitwise_equal(p, p0, name="param changed by a rejected adamw call")


@pytest.mark.parametrize("label", ["int", "bool", "complex", "object", "str"])
def test_adamw_grad_must_be_float(K, label):
    p, g, m, v = _adamw_arrays()
    bad = dict(_bad_dtype_values(g))[label]
    with pytest.raises(TypeError, match=r"\bgrad\b"):
        K.adamw(p, bad, m, v, lr=1e-3, step=1)


def test_kernels_work_in_a_forked_child(tmp_path):
    """A forked child (multiprocessing, data loaders) gets a thread pool of its own.

    Without one it would wait forever for worker threads that fork did not copy, so the check
    runs in a subprocess with a timeout: a hang fails the test instead of the suite.
    """
    import subprocess
    import sys
    import textwrap

    if not hasattr(os, "fork"):
        pytest.skip("no os.fork on this platform")
    script = textwrap.dedent("""
        import os, numpy as np
        from pyllm import kernels as K
        K.set_num_threads(2)
        a = np.ones((300, 300), np.float32)
        K.matmul(a, a)                      # the parent's pool exists and has run
        pid = os.fork()
        if pid == 0:
            ok = K.matmul(a, a)[0, 0] == 300.0 and K.get_num_threads() == 2
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert os.WEXITSTATUS(status) == 0, "the child computed a wrong result"
        assert K.matmul(a, a)[0, 0] == 300.0
    """)
    # From an empty folder: `python -c` puts the working directory first on sys.path, and the source
    # tree's pyllm/ (no compiled _C there) would shadow the installed package.
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60, cwd=tmp_path)


def test_many_back_to_back_jobs_on_more_threads_than_cores(K, restore_threads, rng):
    # The pool's join protocol: a worker that wakes late skips a job that has closed, and the caller
    # waits only for the workers that joined. Thousands of short jobs on 4 threads (more than this
    # machine's cores, so workers are often late) must all complete with the right answers.
    x = randn(rng, 1024, 130)           # large enough to be split across the pool
    expected = R.softmax(x)
    K.set_num_threads(4)
    for _ in range(1000):
        got = K.softmax(x)
    assert_close(got, expected, rtol=1e-5, atol=1e-7)
    a, b = randn(rng, 64, 256), randn(rng, 256, 300)
    expected = K.matmul(a, b)
    for _ in range(300):
        assert_bitwise_equal(K.matmul(a, b), expected)


def test_jobs_on_a_machine_with_a_busy_core_give_the_same_answers(K, restore_threads, rng):
    # With another process keeping a core busy, the pool runs jobs on the caller alone for a while
    # (its threads' items split unevenly); the answers are the same bit for bit, and the workers
    # are taken back once the core is free.
    import subprocess
    import sys
    import time

    a, b = randn(rng, 64, 256), randn(rng, 256, 300)
    K.set_num_threads(1)
    expected = K.matmul(a, b)
    K.set_num_threads(2)
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        end = time.perf_counter() + 0.5
        while time.perf_counter() < end:
            assert_bitwise_equal(K.matmul(a, b), expected)
    finally:
        hog.kill()
        hog.wait()
    for _ in range(200):
        assert_bitwise_equal(K.matmul(a, b), expected)


def test_the_read_bandwidth_probe_measures_something_plausible(K):
    gbps = K.measure_read_bandwidth(0.05)
    assert np.isfinite(gbps) and 0.1 < gbps < 10_000
