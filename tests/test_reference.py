"""The numpy reference (pyllm.reference) is the oracle for the C++ kernels, so it is checked here
on its own: every backward against finite differences of its forward, attention against an
explicit per-head loop, cross-entropy against -log softmax, AdamW against a hand computation.

Finite differences: the reference computes in float32, so derivatives are taken of the float64
sum loss(x) = sum(forward(x) * W) with a 4th-order central stencil and a step of 5e-3 (truncation
error negligible, float32 round-off divided by the step). The analytic gradient is the reference
backward fed with W as the upstream gradient. Each gradient is checked elementwise (small inputs)
and along directions: the gradient itself and random ones; tolerance ~2e-2 relative.
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest

from conftest import assert_close, load_reference, run_doctests

R = load_reference()

F32_EPS = float(np.finfo(np.float32).eps)


# ----------------------------------------------------------------------------- finite differences

def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def _loss(forward, weights, inputs):
    outs = _as_tuple(forward(**inputs))
    assert len(outs) >= len(weights)
    return sum(float(np.sum(np.asarray(o, np.float64) * np.asarray(w, np.float64)))
               for o, w in zip(outs, weights))


def _loss_scale(forward, weights, inputs):
    outs = _as_tuple(forward(**inputs))
    return sum(float(np.sum(np.abs(np.asarray(o, np.float64) * np.asarray(w, np.float64))))
               for o, w in zip(outs, weights))


def _directional_fd(forward, weights, inputs, name, direction, h):
    x0 = np.asarray(inputs[name], np.float64)

    def at(t):
        kw = dict(inputs)
        kw[name] = x0 + t * direction
        return _loss(forward, weights, kw)

    # 4th-order central difference.
    return (8.0 * (at(h) - at(-h)) - (at(2 * h) - at(-2 * h))) / (12.0 * h)


def check_gradients(forward, inputs, weights, grads, rng, *, h=5e-3, rtol=2e-3,
                    n_random=2, elementwise_max=400):
    """Check analytic `grads` {name: array} of loss = sum_i sum(forward(**inputs)[i] * weights[i]).

    forward returns one array or a tuple (only the first len(weights) outputs enter the loss).
    """
    weights = _as_tuple(weights) if not isinstance(weights, list) else tuple(weights)
    scale = _loss_scale(forward, weights, inputs)
    # Worst-case float32 round-off of the loss, as seen through the stencil (sum of |coeffs|/12h).
    floor = 8.0 * F32_EPS * (scale + 1.0) * (18.0 / (12.0 * h))
    for name, g in grads.items():
        x0 = np.asarray(inputs[name])
        g = np.asarray(g, np.float64)
        assert g.shape == x0.shape, f"d{name}: shape {g.shape} != input shape {x0.shape}"
        assert np.all(np.isfinite(g)), f"d{name} has non-finite values"
        gnorm = float(np.linalg.norm(g))

        dirs = []
        if gnorm > 0:
            dirs.append(("gradient", g / np.sqrt(np.mean(g * g))))
        for i in range(n_random):
            d = rng.standard_normal(x0.shape)
            dirs.append((f"random{i}", d / max(np.sqrt(np.mean(d * d)), 1e-3)))
        for label, d in dirs:   # every direction has unit RMS: each element moves by ~h
            fd = _directional_fd(forward, weights, inputs, name, d, h)
            an = float(np.sum(g * d))
            tol = rtol * abs(an) + 1e-4 * gnorm + floor
            assert abs(fd - an) <= tol, (
                f"d{name} along {label} direction: finite difference {fd:.6g} vs analytic {an:.6g} "
                f"(|diff| {abs(fd - an):.3g} > tol {tol:.3g}; |grad| {gnorm:.3g})")

        if x0.size <= elementwise_max:
            num = np.zeros(x0.shape)
            flat = num.reshape(-1)
            for j in range(x0.size):
                e = np.zeros(x0.size)
                e[j] = 1.0
                flat[j] = _directional_fd(forward, weights, inputs, name, e.reshape(x0.shape), h)
            gmax = float(np.abs(g).max()) if g.size else 0.0
            assert_close(g, num, rtol=rtol, atol=2e-4 * gmax + floor, name=f"d{name} (elementwise FD)",
                         check_dtype=False)


def _randn(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


# ----------------------------------------------------------------------------- matmul

@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("a_shape", [(4, 5), (2, 3, 5), (1, 1)], ids=["2d", "3d", "1x1"])
def test_matmul_backward_fd(rng, trans_b, with_bias, a_shape):
    K = a_shape[-1]
    N = 3
    a = _randn(rng, *a_shape)
    b = _randn(rng, *((N, K) if trans_b else (K, N)))
    bias = _randn(rng, N) if with_bias else None
    out = R.matmul(a, b, bias, trans_b=trans_b)
    assert out.shape == a_shape[:-1] + (N,) and out.dtype == np.float32
    W = _randn(rng, *out.shape)
    da, db, dbias = R.matmul_backward(W, a, b, trans_b=trans_b, bias=with_bias)
    assert da.dtype == np.float32 and db.dtype == np.float32
    inputs = {"a": a, "b": b}
    grads = {"a": da, "b": db}
    if with_bias:
        inputs["bias"] = bias
        grads["bias"] = dbias
    else:
        assert dbias is None

    def fwd(a, b, bias=None):
        return R.matmul(a, b, bias, trans_b=trans_b)

    check_gradients(fwd, inputs, W, grads, rng)


def test_matmul_forward_matches_float64(rng):
    a, b, bias = _randn(rng, 2, 7, 13), _randn(rng, 13, 5), _randn(rng, 5)
    expected = np.einsum("btk,kn->btn", a.astype(np.float64), b.astype(np.float64)) + bias
    assert_close(R.matmul(a, b, bias), expected, rtol=1e-5, atol=1e-5, check_dtype=False)
    assert_close(R.matmul(a, np.ascontiguousarray(b.T), bias, trans_b=True), expected,
                 rtol=1e-5, atol=1e-5, check_dtype=False)


# ----------------------------------------------------------------------------- softmax

@pytest.mark.parametrize("shape", [(3, 7), (2, 3, 5), (1, 1)])
def test_softmax_backward_fd(rng, shape):
    x = _randn(rng, *shape, scale=2.0)
    y = R.softmax(x)
    W = _randn(rng, *shape)
    dx = R.softmax_backward(W, y)
    check_gradients(lambda x: R.softmax(x), {"x": x}, W, {"x": dx}, rng)


def test_softmax_forward_large_logits():
    x = np.array([[1e4, -1e4, 0.0, 1e4], [80.0, -80.0, 79.0, 0.0], [5.0, 5.0, 5.0, 5.0]], np.float32)
    y = R.softmax(x)
    assert np.all(np.isfinite(y))
    assert_close(y.sum(-1), np.ones(3), rtol=1e-6, atol=1e-6, check_dtype=False)
    assert_close(y[0], [0.5, 0.0, 0.0, 0.5], atol=1e-7, check_dtype=False)
    assert_close(y[2], [0.25] * 4, atol=1e-7, check_dtype=False)


# ----------------------------------------------------------------------------- norms

@pytest.mark.parametrize("shape", [(3, 8), (2, 2, 5), (1, 1), (1, 2)])
def test_layernorm_backward_fd(rng, shape):
    C = shape[-1]
    x = _randn(rng, *shape) + 0.5
    if C == 2:  # keep the two values apart: the function is ~sign(x0 - x1) on a scale of sqrt(eps)
        x[..., 1] = x[..., 0] + np.where(x[..., 1] >= x[..., 0], 1.0, -1.0).astype(np.float32)
    w = _randn(rng, C) + 1.0
    b = _randn(rng, C)
    out, mean, rstd = R.layernorm_forward(x, w, b)
    assert mean.shape == shape[:-1] and rstd.shape == shape[:-1]
    assert_close(out, R.layernorm(x, w, b), rtol=0, atol=0)
    W = _randn(rng, *shape)
    dx, dw, db = R.layernorm_backward(W, x, w, mean, rstd)

    def fwd(x, w, b):
        return R.layernorm(x, w, b)

    check_gradients(fwd, {"x": x, "w": w, "b": b}, W, {"x": dx, "w": dw, "b": db}, rng)


def test_layernorm_forward_statistics(rng):
    x = _randn(rng, 4, 33, scale=3.0) + 7.0
    out, mean, rstd = R.layernorm_forward(x, np.ones(33, np.float32), np.zeros(33, np.float32))
    x64 = x.astype(np.float64)
    assert_close(mean, x64.mean(-1), rtol=1e-6, atol=1e-6, check_dtype=False)
    assert_close(rstd, 1.0 / np.sqrt(x64.var(-1) + 1e-5), rtol=1e-5, check_dtype=False)
    assert_close(out.mean(-1), np.zeros(4), atol=1e-5, check_dtype=False)
    assert_close(out.std(-1), np.ones(4), rtol=1e-4, check_dtype=False)


@pytest.mark.parametrize("shape", [(3, 8), (2, 2, 5), (1, 1)])
def test_rmsnorm_backward_fd(rng, shape):
    C = shape[-1]
    x = _randn(rng, *shape)
    if C == 1:  # x / |x| is flat except within ~sqrt(eps) of 0: keep away from there
        x = np.where(x >= 0, 1.0, -1.0).astype(np.float32) * np.maximum(np.abs(x), 0.5)
    w = _randn(rng, C) + 1.0
    out, rstd = R.rmsnorm_forward(x, w)
    assert rstd.shape == shape[:-1]
    x64 = x.astype(np.float64)
    assert_close(out, x64 / np.sqrt((x64 * x64).mean(-1, keepdims=True) + 1e-6) * w, rtol=1e-5,
                 atol=1e-6)
    W = _randn(rng, *shape)
    dx, dw = R.rmsnorm_backward(W, x, w, rstd)
    check_gradients(lambda x, w: R.rmsnorm(x, w), {"x": x, "w": w}, W, {"x": dx, "w": dw}, rng)


# ----------------------------------------------------------------------------- activations

def _activation_inputs(rng):
    x = _randn(rng, 4, 9, scale=2.0)
    x[0, :6] = [-9.0, -4.0, -0.5, 0.0, 0.5, 6.0]
    return x


def test_gelu_backward_fd(rng):
    x = _activation_inputs(rng)
    W = _randn(rng, *x.shape)
    check_gradients(lambda x: R.gelu(x), {"x": x}, W, {"x": R.gelu_backward(W, x)}, rng)


def test_silu_backward_fd(rng):
    x = _activation_inputs(rng)
    W = _randn(rng, *x.shape)
    check_gradients(lambda x: R.silu(x), {"x": x}, W, {"x": R.silu_backward(W, x)}, rng)


def test_swiglu_backward_fd(rng):
    gate = _activation_inputs(rng)
    up = _randn(rng, *gate.shape)
    W = _randn(rng, *gate.shape)
    dgate, dup = R.swiglu_backward(W, gate, up)
    check_gradients(lambda gate, up: R.swiglu(gate, up), {"gate": gate, "up": up}, W,
                    {"gate": dgate, "up": dup}, rng)


def test_activation_formulas_and_extremes():
    x = np.array([-1e4, -100.0, -20.0, -3.0, -1.0, 0.0, 1.0, 3.0, 20.0, 100.0, 1e4], np.float32)
    x64 = x.astype(np.float64)
    gelu64 = 0.5 * x64 * (1 + np.tanh(math.sqrt(2 / math.pi) * (x64 + 0.044715 * x64 ** 3)))
    sig64 = 0.5 * (1.0 + np.tanh(0.5 * x64))
    with np.errstate(all="raise"):
        g, s = R.gelu(x), R.silu(x)
        dg, ds = R.gelu_backward(np.ones_like(x), x), R.silu_backward(np.ones_like(x), x)
    assert_close(g, gelu64, rtol=1e-6, atol=1e-6)
    assert_close(s, x64 * sig64, rtol=1e-6, atol=1e-6)
    for arr in (dg, ds):
        assert np.all(np.isfinite(arr))
    assert_close(dg[[0, -1]], [0.0, 1.0], atol=1e-6)
    assert_close(ds[[0, -1]], [0.0, 1.0], atol=1e-6)


# ----------------------------------------------------------------------------- rope

def test_rope_tables():
    cos, sin = R.rope_tables(5, 8)
    assert cos.shape == sin.shape == (5, 4) and cos.dtype == sin.dtype == np.float32
    assert_close(cos * cos + sin * sin, np.ones((5, 4)), atol=1e-6, check_dtype=False)
    inv_freq = 1.0 / 10000.0 ** (np.arange(0, 8, 2) / 8)
    assert_close(cos, np.cos(np.arange(5)[:, None] * inv_freq), atol=1e-6, check_dtype=False)
    c2, s2 = R.rope_tables(np.array([3, 4]), 8)
    assert_close(c2, cos[3:5], rtol=0, atol=0)
    assert_close(s2, sin[3:5], rtol=0, atol=0)
    with pytest.raises(ValueError, match="even"):
        R.rope_tables(4, 7)


@pytest.mark.parametrize("shape", [(1, 2, 3, 4), (2, 1, 5, 2), (1, 1, 1, 6)])
def test_rope_backward_fd(rng, shape):
    x = _randn(rng, *shape)
    cos, sin = R.rope_tables(np.arange(shape[2]) + 2, shape[3], theta=100.0)
    W = _randn(rng, *shape)
    dx = R.rope_backward(W, cos, sin)
    check_gradients(lambda x: R.rope(x, cos, sin), {"x": x}, W, {"x": dx}, rng)


def test_rope_is_rotate_half_rotation(rng):
    x = _randn(rng, 2, 3, 4, 6)
    cos, sin = R.rope_tables(4, 6)
    y = R.rope(x, cos, sin).astype(np.float64)
    h = 3
    x64 = x.astype(np.float64)
    rot = np.concatenate([-x64[..., h:], x64[..., :h]], axis=-1)        # HF rotate_half
    c = np.concatenate([cos, cos], axis=-1).astype(np.float64)
    s = np.concatenate([sin, sin], axis=-1).astype(np.float64)
    assert_close(y, x64 * c + rot * s, rtol=1e-5, atol=1e-6, check_dtype=False)
    # A rotation: norms of each (i, i+h) pair preserved; backward undoes forward.
    assert_close(np.linalg.norm(y, axis=-1), np.linalg.norm(x64, axis=-1), rtol=1e-5, check_dtype=False)
    assert_close(R.rope_backward(R.rope(x, cos, sin), cos, sin), x, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- attention

def attention_loop(q, k, v, causal):
    """Explicit per-(batch, head) float64 attention: the readable definition."""
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    B, NH, Tq, HS = q.shape
    NKV, Tk = k.shape[1], k.shape[2]
    group = NH // NKV
    out = np.zeros((B, NH, Tq, HS))
    lse = np.zeros((B, NH, Tq))
    for b in range(B):
        for h in range(NH):
            kv = h // group                       # consecutive query heads share a kv head
            for i in range(Tq):
                pos = i + (Tk - Tq)               # absolute position of query i
                keys = range(Tk) if not causal else range(pos + 1)
                s = np.array([q[b, h, i] @ k[b, kv, j] / math.sqrt(HS) for j in keys])
                m = s.max()
                e = np.exp(s - m)
                lse[b, h, i] = m + math.log(e.sum())
                p = e / e.sum()
                out[b, h, i] = sum(p[n] * v[b, kv, j] for n, j in enumerate(keys))
    return out, lse


ATTN_CASES = [
    # B, NH, NKV, Tq, Tk, HS, causal
    (1, 2, 2, 5, 5, 4, True),
    (2, 2, 2, 4, 4, 3, False),
    (1, 4, 2, 3, 3, 4, True),     # GQA
    (1, 4, 1, 2, 5, 4, True),     # multi-query, Tq < Tk (prefill on top of a KV cache)
    (1, 2, 1, 1, 6, 8, True),     # decode: one query against the cache
    (1, 2, 2, 3, 7, 2, False),
    (1, 1, 1, 1, 1, 1, True),
]


@pytest.mark.parametrize("case", ATTN_CASES, ids=lambda c: "B{}-NH{}-NKV{}-Tq{}-Tk{}-HS{}-{}".format(
    *c[:6], "causal" if c[6] else "full"))
def test_attention_matches_loop(rng, case):
    B, NH, NKV, Tq, Tk, HS, causal = case
    q, k, v = _randn(rng, B, NH, Tq, HS), _randn(rng, B, NKV, Tk, HS), _randn(rng, B, NKV, Tk, HS)
    out, lse = R.attention_forward(q, k, v, causal)
    exp_out, exp_lse = attention_loop(q, k, v, causal)
    assert_close(out, exp_out, rtol=1e-5, atol=1e-5)
    assert_close(lse, exp_lse, rtol=1e-5, atol=1e-5)
    assert_close(R.attention(q, k, v, causal), out, rtol=0, atol=0)


def test_attention_causal_mask_positions():
    # v = one-hot of the key position: out row i = attention weights of query i.
    Tq, Tk = 3, 5
    q = np.zeros((1, 1, Tq, Tk), np.float32)
    k = np.zeros((1, 1, Tk, Tk), np.float32)
    v = np.eye(Tk, dtype=np.float32)[None, None]
    p = R.attention(q, k, v, causal=True)[0, 0]
    for i in range(Tq):
        visible = i + (Tk - Tq) + 1
        assert_close(p[i], [1.0 / visible] * visible + [0.0] * (Tk - visible), atol=1e-7,
                     check_dtype=False)


@pytest.mark.parametrize("case", ATTN_CASES, ids=lambda c: "B{}-NH{}-NKV{}-Tq{}-Tk{}-HS{}-{}".format(
    *c[:6], "causal" if c[6] else "full"))
def test_attention_backward_fd(rng, case):
    B, NH, NKV, Tq, Tk, HS, causal = case
    q, k, v = _randn(rng, B, NH, Tq, HS), _randn(rng, B, NKV, Tk, HS), _randn(rng, B, NKV, Tk, HS)
    out, lse = R.attention_forward(q, k, v, causal)
    W = _randn(rng, *out.shape)
    dq, dk, dv = R.attention_backward(W, q, k, v, out, lse, causal)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape

    def fwd(q, k, v):
        return R.attention(q, k, v, causal)

    check_gradients(fwd, {"q": q, "k": k, "v": v}, W, {"q": dq, "k": dk, "v": dv}, rng,
                    elementwise_max=120)


# ----------------------------------------------------------------------------- cross-entropy

def test_cross_entropy_matches_log_softmax(rng):
    logits = _randn(rng, 2, 3, 7, scale=3.0)
    targets = rng.integers(0, 7, size=(2, 3))
    targets[0, 1] = -100
    losses, lse = R.cross_entropy_forward(logits, targets)
    assert losses.shape == lse.shape == (2, 3)
    x = logits.astype(np.float64)
    exp_lse = np.log(np.exp(x).sum(-1))
    logp = x - exp_lse[..., None]
    exp_losses = -np.take_along_axis(logp, np.where(targets < 0, 0, targets)[..., None], -1)[..., 0]
    exp_losses[0, 1] = 0.0
    assert_close(lse, exp_lse, rtol=1e-6, atol=1e-6)
    assert_close(losses, exp_losses, rtol=1e-5, atol=1e-6)
    mean = R.cross_entropy(logits, targets)
    assert np.ndim(mean) == 0
    assert_close(mean, exp_losses.sum() / 5, rtol=1e-5, atol=1e-6, check_dtype=False)
    # custom ignore_index
    t2 = np.where(targets == -100, 3, targets)
    t2[1, 2] = 6
    l2, _ = R.cross_entropy_forward(logits, t2, ignore_index=6)
    assert l2[1, 2] == 0.0


@pytest.mark.parametrize("ignored", [0, 2], ids=["none-ignored", "two-ignored"])
def test_cross_entropy_backward_fd(rng, ignored):
    logits = _randn(rng, 5, 6, scale=2.0)
    targets = rng.integers(0, 6, size=5)
    targets[:ignored] = -100
    dloss = 1.7
    _, lse = R.cross_entropy_forward(logits, targets)
    dlogits = R.cross_entropy_backward(logits, targets, lse, dloss)
    if ignored:
        assert np.all(dlogits[:ignored] == 0.0)
    assert_close(dlogits.sum(-1), np.zeros(5), atol=1e-6, check_dtype=False)

    def fwd(logits):
        return R.cross_entropy(logits, targets)

    check_gradients(fwd, {"logits": logits}, [np.float64(dloss)], {"logits": dlogits}, rng)


def test_cross_entropy_all_ignored(rng):
    logits = _randn(rng, 3, 4)
    targets = np.full(3, -100)
    loss = R.cross_entropy(logits, targets)
    assert loss == 0.0
    _, lse = R.cross_entropy_forward(logits, targets)
    d = R.cross_entropy_backward(logits, targets, lse, 1.0)
    assert d.shape == logits.shape and np.all(d == 0.0)


def test_cross_entropy_large_logits_finite():
    logits = np.array([[1e4, -1e4, 0.0], [80.0, -80.0, 79.0], [3.0, 3.0, 3.0]], np.float32)
    targets = np.array([1, 2, 0])
    losses, lse = R.cross_entropy_forward(logits, targets)
    assert np.all(np.isfinite(losses)) and np.all(np.isfinite(lse))
    assert_close(losses, [2e4, 1.0 + math.log1p(math.exp(-1.0)), math.log(3.0)], rtol=1e-6, atol=1e-5,
                 check_dtype=False)


# ----------------------------------------------------------------------------- embedding

def test_embedding_backward_fd_repeated_ids(rng):
    V, C = 6, 3
    weight = _randn(rng, V, C)
    ids = np.array([[1, 4, 1], [1, 0, 5]])
    out = R.embedding(ids, weight)
    assert out.shape == (2, 3, C) and out.dtype == np.float32
    assert_close(out[0, 0], weight[1], rtol=0, atol=0)
    W = _randn(rng, 2, 3, C)
    dweight = R.embedding_backward(W, ids, V)
    expected = np.zeros((V, C))
    for i, row in zip(ids.reshape(-1), W.reshape(-1, C)):
        expected[i] += row
    assert_close(dweight, expected, rtol=1e-6, atol=1e-6)
    assert np.all(dweight[[2, 3]] == 0.0)
    check_gradients(lambda weight: R.embedding(ids, weight), {"weight": weight}, W,
                    {"weight": dweight}, rng)


def test_embedding_backward_into_dweight(rng):
    if "dweight" not in inspect.signature(R.embedding_backward).parameters:
        pytest.skip("reference embedding_backward has no dweight argument")
    V, C = 5, 4
    ids = np.array([4, 0, 4, 4])
    dout = _randn(rng, 4, C)
    buf = _randn(rng, V, C)
    start = buf.copy()
    assert R.embedding_backward(dout, ids, V, dweight=buf) is buf
    assert_close(buf - start, R.embedding_backward(dout, ids, V), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- adamw

def test_adamw_two_steps_match_hand_computation(rng):
    shape = (3, 5)
    p0 = _randn(rng, *shape)
    grads = [_randn(rng, *shape), _randn(rng, *shape)]
    lr, b1, b2, eps, wd, gs = 1e-2, 0.9, 0.95, 1e-8, 0.1, 0.5

    param, m, v = p0.copy(), np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    for step, g in enumerate(grads, start=1):
        assert R.adamw(param, g, m, v, lr=lr, step=step, beta1=b1, beta2=b2, eps=eps,
                       weight_decay=wd, grad_scale=gs) is None

    # Plain Python, float64, element by element.
    exp_p, exp_m, exp_v = [], [], []
    for idx in np.ndindex(shape):
        p, mm, vv = float(p0[idx]), 0.0, 0.0
        for step, g in enumerate(grads, start=1):
            gg = float(g[idx]) * gs
            mm = b1 * mm + (1 - b1) * gg
            vv = b2 * vv + (1 - b2) * gg * gg
            m_hat = mm / (1 - b1 ** step)
            v_hat = vv / (1 - b2 ** step)
            p = p - lr * (m_hat / (math.sqrt(v_hat) + eps) + wd * p)
        exp_p.append(p)
        exp_m.append(mm)
        exp_v.append(vv)
    assert param.dtype == m.dtype == v.dtype == np.float32
    assert_close(m, np.reshape(exp_m, shape), rtol=1e-5, atol=1e-7, check_dtype=False)
    assert_close(v, np.reshape(exp_v, shape), rtol=1e-5, atol=1e-9, check_dtype=False)
    assert_close(param, np.reshape(exp_p, shape), rtol=1e-5, atol=1e-6, check_dtype=False)


def test_adamw_step_one_moves_by_lr(rng):
    # Bias correction at step 1: m_hat / sqrt(v_hat) = sign(g), so every element moves by ~lr.
    param = _randn(rng, 50)
    g = _randn(rng, 50)
    before = param.copy()
    R.adamw(param, g, np.zeros(50, np.float32), np.zeros(50, np.float32), lr=1e-3, step=1)
    assert_close(before - param, 1e-3 * np.sign(g), rtol=1e-4, atol=1e-9, check_dtype=False)


# ----------------------------------------------------------------------------- docstrings

def test_reference_doctests():
    attempted, failures = run_doctests(R)
    assert attempted > 0
    assert not failures, "reference doctest(s) failed:\n" + "\n".join(failures)
