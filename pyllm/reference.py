"""Pure-numpy twin of every C++ kernel (and plain-Python BPE): the readable spec, the test oracle,
the benchmark baseline.

Not fast and not for production use: `pyllm.kernels` has the same names and signatures, in C++.

Shape legend used everywhere: B batch, T time (sequence), C channels, V vocabulary,
NH query heads, NKV key/value heads, HS head size, N = any number of rows (e.g. B*T).
Every function takes and returns float32 arrays (ids and targets are integers).
Backward functions return fresh gradient arrays. (In C++, input gradients are written and
parameter gradients accumulated; see csrc/kernels/kernels.h.)
"""

from __future__ import annotations

import math

import numpy as np

_GELU_SCALE = math.sqrt(2.0 / math.pi)


def _f32(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


# ----------------------------------------------------------------------------- matmul

def matmul(a, b, bias=None, *, trans_b=False):
    """a (..., K) @ b (K, N) (+ bias (N,)); with trans_b, b is (N, K) and a @ b.T is taken.

    >>> matmul(np.ones((2, 3), np.float32), np.ones((3, 4), np.float32)).shape
    (2, 4)
    """
    a, b = _f32(a), _f32(b)
    out = a @ (b.T if trans_b else b)
    if bias is not None:
        out = out + _f32(bias)
    return out.astype(np.float32)


def matmul_backward(dout, a, b, *, trans_b=False, bias=False):
    """Gradients of matmul: (da, db, dbias) with da = dout @ b.T, db = a.T @ dout (same layout as b).

    dbias is None unless bias=True.
    >>> da, db, dbias = matmul_backward(np.ones((2, 4), np.float32), np.ones((2, 3), np.float32),
    ...                                 np.ones((3, 4), np.float32), bias=True)
    >>> da.shape, db.shape, dbias.shape
    ((2, 3), (3, 4), (4,))
    """
    dout, a, b = _f32(dout), _f32(a), _f32(b)
    K = a.shape[-1]
    N = dout.shape[-1]
    d2, a2 = dout.reshape(-1, N), a.reshape(-1, K)
    if trans_b:                    # out = a @ b.T, b is (N, K)
        da = d2 @ b
        db = d2.T @ a2
    else:                          # out = a @ b, b is (K, N)
        da = d2 @ b.T
        db = a2.T @ d2
    dbias = d2.sum(axis=0) if bias else None
    return da.reshape(a.shape).astype(np.float32), db.astype(np.float32), dbias


# ----------------------------------------------------------------------------- softmax

def softmax(x):
    """Softmax over the last axis; the row max is subtracted so large logits do not overflow.

    >>> softmax(np.array([[0.0, 0.0]], np.float32))
    array([[0.5, 0.5]], dtype=float32)
    """
    x = _f32(x)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def softmax_backward(dout, y):
    """dx for y = softmax(x): y * (dout - sum(dout * y)) along the last axis."""
    dout, y = _f32(dout), _f32(y)
    return (y * (dout - (dout * y).sum(axis=-1, keepdims=True))).astype(np.float32)


# ----------------------------------------------------------------------------- norms

def layernorm_forward(x, w, b, eps=1e-5):
    """LayerNorm over the last axis C; returns (out, mean, rstd), mean/rstd shaped x.shape[:-1]."""
    x, w, b = _f32(x), _f32(w), _f32(b)
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    rstd = 1.0 / np.sqrt(var + eps)
    out = (x - mean) * rstd * w + b
    return out.astype(np.float32), mean[..., 0].astype(np.float32), rstd[..., 0].astype(np.float32)


def layernorm(x, w, b, eps=1e-5):
    """LayerNorm over the last axis: (x - mean) / sqrt(var + eps) * w + b.

    >>> layernorm(np.array([[1.0, 3.0]], np.float32), np.ones(2, np.float32), np.zeros(2, np.float32))
    array([[-0.999995,  0.999995]], dtype=float32)
    """
    return layernorm_forward(x, w, b, eps)[0]


def layernorm_backward(dout, x, w, mean, rstd):
    """Gradients of layernorm: (dx, dw, db); dw and db are summed over all rows."""
    dout, x, w = _f32(dout), _f32(x), _f32(w)
    mean, rstd = _f32(mean)[..., None], _f32(rstd)[..., None]
    norm = (x - mean) * rstd
    dnorm = dout * w
    dx = rstd * (dnorm - dnorm.mean(axis=-1, keepdims=True)
                 - norm * (dnorm * norm).mean(axis=-1, keepdims=True))
    C = x.shape[-1]
    dw = (dout * norm).reshape(-1, C).sum(axis=0)
    db = dout.reshape(-1, C).sum(axis=0)
    return dx.astype(np.float32), dw.astype(np.float32), db.astype(np.float32)


def rmsnorm_forward(x, w, eps=1e-6):
    """RMSNorm over the last axis; returns (out, rstd), rstd shaped x.shape[:-1]."""
    x, w = _f32(x), _f32(w)
    rstd = 1.0 / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps)
    return (x * rstd * w).astype(np.float32), rstd[..., 0].astype(np.float32)


def rmsnorm(x, w, eps=1e-6):
    """RMSNorm over the last axis: x / sqrt(mean(x^2) + eps) * w (Llama's norm).

    >>> rmsnorm(np.array([[2.0, 2.0]], np.float32), np.ones(2, np.float32))
    array([[0.9999999, 0.9999999]], dtype=float32)
    """
    return rmsnorm_forward(x, w, eps)[0]


def rmsnorm_backward(dout, x, w, rstd):
    """Gradients of rmsnorm: (dx, dw); dw is summed over all rows."""
    dout, x, w = _f32(dout), _f32(x), _f32(w)
    rstd = _f32(rstd)[..., None]
    norm = x * rstd
    dnorm = dout * w
    dx = rstd * (dnorm - norm * (dnorm * norm).mean(axis=-1, keepdims=True))
    dw = (dout * norm).reshape(-1, x.shape[-1]).sum(axis=0)
    return dx.astype(np.float32), dw.astype(np.float32)


# ----------------------------------------------------------------------------- activations

def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))   # tanh form: no overflow warning for large |x|


def gelu(x):
    """GELU, tanh approximation (GPT-2's): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).

    >>> gelu(np.array([0.0, 1.0], np.float32))
    array([0.      , 0.841192], dtype=float32)
    """
    x = _f32(x)
    return (0.5 * x * (1.0 + np.tanh(_GELU_SCALE * (x + 0.044715 * x ** 3)))).astype(np.float32)


def gelu_backward(dout, x):
    """dx for gelu."""
    dout, x = _f32(dout), _f32(x)
    u = _GELU_SCALE * (x + 0.044715 * x ** 3)
    t = np.tanh(u)
    du = _GELU_SCALE * (1.0 + 3.0 * 0.044715 * x * x)
    return (dout * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du)).astype(np.float32)


def silu(x):
    """SiLU (swish): x * sigmoid(x).

    >>> silu(np.array([0.0], np.float32))
    array([0.], dtype=float32)
    """
    x = _f32(x)
    return (x * _sigmoid(x)).astype(np.float32)


def silu_backward(dout, x):
    """dx for silu: sigmoid(x) * (1 + x * (1 - sigmoid(x)))."""
    dout, x = _f32(dout), _f32(x)
    s = _sigmoid(x)
    return (dout * s * (1.0 + x * (1.0 - s))).astype(np.float32)


def swiglu(gate, up):
    """SwiGLU feed-forward gate: silu(gate) * up (Llama's MLP).

    >>> swiglu(np.zeros(2, np.float32), np.ones(2, np.float32))
    array([0., 0.], dtype=float32)
    """
    gate, up = _f32(gate), _f32(up)
    return (silu(gate) * up).astype(np.float32)


def swiglu_backward(dout, gate, up):
    """Gradients of swiglu: (dgate, dup)."""
    dout, gate, up = _f32(dout), _f32(gate), _f32(up)
    return silu_backward(dout * up, gate), (dout * silu(gate)).astype(np.float32)


def geglu(gate, up):
    """GeGLU feed-forward gate: gelu(gate) * up, GELU's tanh form (Gemma's MLP).

    >>> geglu(np.ones(2, np.float32), np.full(2, 2.0, np.float32))
    array([1.682384, 1.682384], dtype=float32)
    """
    gate, up = _f32(gate), _f32(up)
    return (gelu(gate) * up).astype(np.float32)


def geglu_backward(dout, gate, up):
    """Gradients of geglu: (dgate, dup)."""
    dout, gate, up = _f32(dout), _f32(gate), _f32(up)
    return gelu_backward(dout * up, gate), (dout * gelu(gate)).astype(np.float32)


# ----------------------------------------------------------------------------- rotary embedding

def rope_tables(positions, head_size, theta=10000.0, freq_factors=None):
    """cos and sin tables for rotary embeddings, each (T, HS/2), for the given positions (the
    frequencies divided by freq_factors when given).

    `positions` is an int (meaning 0..T-1) or a 1-D array of positions.
    >>> cos, sin = rope_tables(4, 8)
    >>> cos.shape
    (4, 4)
    """
    if head_size % 2:
        raise ValueError(f"rope needs an even head size, got {head_size}")
    pos = np.arange(positions) if np.ndim(positions) == 0 else np.asarray(positions)
    inv_freq = 1.0 / theta ** (np.arange(0, head_size, 2, dtype=np.float64) / head_size)
    if freq_factors is not None:
        inv_freq = inv_freq / np.asarray(freq_factors, np.float64)
    angles = pos.astype(np.float64)[:, None] * inv_freq[None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def rope(x, cos, sin):
    """Rotary position embedding, Hugging Face "rotate half" layout, on x (B, NH, T, HS).

    Pairs are (x[..., i], x[..., i + HS/2]), rotated by the angle in cos/sin (T, HS/2).
    >>> cos, sin = rope_tables(1, 2)
    >>> rope(np.ones((1, 1, 1, 2), np.float32), cos, sin)
    array([[[[1., 1.]]]], dtype=float32)
    """
    x, cos, sin = _f32(x), _f32(cos), _f32(sin)
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(np.float32)


def rope_backward(dout, cos, sin):
    """dx for rope: the same rotation by the negative angle."""
    return rope(dout, cos, -_f32(sin))


def rope_at(x, cos, sin, pos0):
    """rope on x (B, T, H, HS), tokens first, batch row b rotated from position pos0[b] of the
    tables cos/sin (P, HS/2)."""
    x = _f32(x)
    T = x.shape[1]
    rows = [rope(x[b].transpose(1, 0, 2), cos[p:p + T], sin[p:p + T]).transpose(1, 0, 2)
            for b, p in enumerate(np.asarray(pos0, np.int64))]
    return np.stack(rows).astype(np.float32) if rows else x.copy()


def kv_write(cache, src, pos0, rows=None):
    """cache (R, H, capacity, HS)[rows[b], :, pos0[b] + t] = src (B, T, H, HS)[b, t], in place
    (rows[b] = b when rows is None)."""
    src = _f32(src)
    T = src.shape[1]
    for b, p in enumerate(np.asarray(pos0, np.int64)):
        r = b if rows is None else int(rows[b])
        cache[r, :, p:p + T] = src[b].transpose(1, 0, 2)


# ----------------------------------------------------------------------------- attention

def _causal_mask(Tq, Tk, window=None):
    # Query i sits at absolute position i + (Tk - Tq): the last Tq of Tk positions (KV cache); with
    # a window it sees only the last `window` keys up to its own position.
    keys, position = np.arange(Tk)[None, :], np.arange(Tq)[:, None] + (Tk - Tq)
    mask = keys > position
    if window:
        mask |= keys <= position - window
    return mask


def attention_forward(q, k, v, causal=True, kv_lengths=None, kv_rows=None, window=None, return_probs=False):
    """Scaled dot-product attention; returns (out (B, NH, Tq, HS), lse (B, NH, Tq)), and with
    return_probs also the softmax weights (B, NH, Tq, Tk).

    q is (B, NH, Tq, HS); k and v are (B, NKV, Tk, HS) with NH a multiple of NKV (grouped-query
    attention). lse is the log-sum-exp of each row of scaled scores, what backward needs.
    kv_lengths (B,), if given, keeps only the first kv_lengths[b] keys of batch row b (a ragged
    batch of KV caches); the causal alignment then uses that row's length. kv_rows (B,), if given,
    makes batch row b read row kv_rows[b] of k and v. window (causal): each query sees only the
    last `window` keys up to its own position (sliding-window attention).
    """
    if kv_rows is not None:
        rows = np.asarray(kv_rows, np.int64)
        return attention_forward(q, np.asarray(k)[rows], np.asarray(v)[rows], causal, kv_lengths, window=window)
    if kv_lengths is not None:
        rows = [attention_forward(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n], causal, window=window)
                for b, n in enumerate(np.asarray(kv_lengths))]
        return (np.concatenate([r[0] for r in rows]), np.concatenate([r[1] for r in rows]))
    q, k, v = _f32(q), _f32(k), _f32(v)
    B, NH, Tq, HS = q.shape
    group = NH // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    scores = (q @ k.transpose(0, 1, 3, 2)) * (1.0 / math.sqrt(HS))
    if causal:
        scores = np.where(_causal_mask(Tq, k.shape[2], window), -np.inf, scores)
    m = scores.max(axis=-1, keepdims=True)
    e = np.exp(scores - m)
    s = e.sum(axis=-1, keepdims=True)
    probs = e / s
    out = probs @ v
    lse = (m + np.log(s))[..., 0]
    if return_probs:
        return out.astype(np.float32), lse.astype(np.float32), probs.astype(np.float32)
    return out.astype(np.float32), lse.astype(np.float32)


def attention(q, k, v, causal=True):
    """softmax(q k^T / sqrt(HS), causal mask) v for q (B, NH, Tq, HS), k, v (B, NKV, Tk, HS).

    >>> q = np.zeros((1, 1, 2, 4), np.float32); v = np.arange(8, dtype=np.float32).reshape(1, 1, 2, 4)
    >>> attention(q, q, v)[0, 0, 1]
    array([2., 3., 4., 5.], dtype=float32)
    """
    return attention_forward(q, k, v, causal)[0]


def attention_backward(dout, q, k, v, out, lse, causal=True, window=None):
    """Gradients of attention: (dq, dk, dv), from the saved out and lse of attention_forward."""
    dout, q, k, v, out, lse = (_f32(t) for t in (dout, q, k, v, out, lse))
    B, NH, Tq, HS = q.shape
    NKV, Tk = k.shape[1], k.shape[2]
    group = NH // NKV
    kr, vr = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    scale = 1.0 / math.sqrt(HS)
    scores = (q @ kr.transpose(0, 1, 3, 2)) * scale
    if causal:
        scores = np.where(_causal_mask(Tq, Tk, window), -np.inf, scores)
    p = np.exp(scores - lse[..., None])
    dv = p.transpose(0, 1, 3, 2) @ dout
    dp = dout @ vr.transpose(0, 1, 3, 2)
    ds = p * (dp - (dout * out).sum(axis=-1, keepdims=True))
    dq = (ds @ kr) * scale
    dk = (ds.transpose(0, 1, 3, 2) @ q) * scale
    dk = dk.reshape(B, NKV, group, Tk, HS).sum(axis=2)
    dv = dv.reshape(B, NKV, group, Tk, HS).sum(axis=2)
    return dq.astype(np.float32), dk.astype(np.float32), dv.astype(np.float32)


# ----------------------------------------------------------------------------- cross-entropy

def cross_entropy_forward(logits, targets, ignore_index=-100):
    """Per-row loss and log-sum-exp of logits (..., V) against integer targets (...).

    Returns (losses, lse), both shaped targets.shape; rows whose target is ignore_index get loss 0.
    """
    logits = _f32(logits)
    V = logits.shape[-1]
    x = logits.reshape(-1, V)
    t = np.asarray(targets).reshape(-1)
    m = x.max(axis=-1)
    lse = m + np.log(np.exp(x - m[:, None]).sum(axis=-1))
    keep = t != ignore_index
    picked = x[np.arange(len(t)), np.where(keep, t, 0)]
    losses = np.where(keep, lse - picked, 0.0)
    shape = np.shape(targets)
    return losses.reshape(shape).astype(np.float32), lse.reshape(shape).astype(np.float32)


def cross_entropy(logits, targets, ignore_index=-100):
    """Mean next-token loss -log softmax(logits)[target] over rows whose target is not ignored.

    Returns 0.0 when every row is ignored.
    >>> float(cross_entropy(np.zeros((1, 4), np.float32), np.array([2])))  # log(4)
    1.3862943649291992
    """
    losses, _ = cross_entropy_forward(logits, targets, ignore_index)
    count = max(int((np.asarray(targets) != ignore_index).sum()), 1)
    return np.float32(losses.sum(dtype=np.float64) / count)


def cross_entropy_backward(logits, targets, lse, dloss=1.0, ignore_index=-100):
    """dlogits of the mean loss, scaled by dloss: (softmax(logits) - onehot(target)) * dloss / count."""
    logits = _f32(logits)
    V = logits.shape[-1]
    x = logits.reshape(-1, V)
    t = np.asarray(targets).reshape(-1)
    keep = t != ignore_index
    count = max(int(keep.sum()), 1)
    d = np.exp(x - _f32(lse).reshape(-1, 1))
    d[np.arange(len(t))[keep], t[keep]] -= 1.0
    d *= np.where(keep, dloss / count, 0.0)[:, None]
    return d.reshape(logits.shape).astype(np.float32)


# ----------------------------------------------------------------------------- embedding

def embedding(ids, weight):
    """Rows of weight (V, C) picked by integer ids (...): returns (..., C).

    >>> embedding(np.array([1]), np.eye(2, dtype=np.float32))
    array([[0., 1.]], dtype=float32)
    """
    return _f32(weight)[np.asarray(ids)]


def embedding_backward(dout, ids, vocab_size, *, dweight=None):
    """dweight (V, C): each row of dout (..., C) scatter-added into the row of its id.

    With dweight given, the rows are added into it in place and it is returned.
    """
    dout = _f32(dout)
    C = dout.shape[-1]
    dw = np.zeros((vocab_size, C), np.float32) if dweight is None else dweight
    np.add.at(dw, np.asarray(ids).reshape(-1), dout.reshape(-1, C))
    return dw


# ----------------------------------------------------------------------------- optimizer

def adamw(param, grad, m, v, *, lr, step, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0,
          grad_scale=1.0):
    """One AdamW update, in place on param, m and v (all float32, same shape); returns None.

    grad is multiplied by grad_scale first (gradient clipping); step counts from 1 and drives
    the bias correction; weight decay is decoupled (param *= 1 - lr * weight_decay).
    """
    g = grad.astype(np.float32) * np.float32(grad_scale)
    m *= beta1
    m += (1.0 - beta1) * g
    v *= beta2
    v += (1.0 - beta2) * g * g
    m_hat = m / (1.0 - beta1 ** step)
    v_hat = v / (1.0 - beta2 ** step)
    param -= (lr * (m_hat / (np.sqrt(v_hat) + eps) + weight_decay * param)).astype(np.float32)


# ----------------------------------------------------------------------------- quantized weights

# ggml's block layouts, restated here on purpose: this is the readable spec the C++ decoders are
# tested against (the C++ table is csrc/kernels/quant_types.h; a test checks the two agree).
F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q6_K, BF16 = 0, 1, 2, 3, 6, 7, 8, 12, 14, 30
BLOCKS = {F32: (1, 4), F16: (1, 2), BF16: (1, 2), Q8_0: (32, 34), Q4_0: (32, 18), Q4_1: (32, 20),
          Q5_0: (32, 22), Q5_1: (32, 24), Q4_K: (256, 144), Q6_K: (256, 210)}   # (values, bytes) per block


def dequantize(w, ggml_type, shape, packed=False):
    """The float32 (N, K) matrix of ggml-quantized bytes w (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q6_K);
    packed: w in pack_quant's layout."""
    N, K = shape
    if packed:
        w = unpack_quant(w, ggml_type, shape)
    return dequantize_values(w, ggml_type, N * K).reshape(N, K)


def _roundf(x):
    """C's roundf: to the nearest integer, halves away from zero (x float32; exact)."""
    t = np.trunc(x)
    return np.where(np.abs(x - t) >= 0.5, t + np.sign(x), t)


def _nearest_int(v):
    """ggml's nearest_int: ties to even, through the float32 mantissa of v + 1.5 * 2^23."""
    bits = (np.asarray(v, np.float32) + np.float32(12582912.0)).astype(np.float32).view(np.int32)
    return (bits & 0x007FFFFF) - 0x00400000


def _make_qkx2_quants(x, w, nmax, rmin, rdelta, nstep):
    """ggml's make_qkx2_quants on rows of x (S, n) with weights w, every sum in float32 and in
    ggml's order: (scale (S,), minimum to subtract (S,), levels (S, n) uint8)."""
    f = np.float32
    S, n = x.shape
    lo, hi, sum_w = x[:, 0].copy(), x[:, 0].copy(), w[:, 0].copy()
    sum_x = sum_w * x[:, 0]
    for i in range(1, n):
        lo, hi = np.where(x[:, i] < lo, x[:, i], lo), np.where(x[:, i] > hi, x[:, i], hi)
        sum_w = sum_w + w[:, i]
        sum_x = sum_x + w[:, i] * x[:, i]
    lo = np.where(lo > 0, f(0), lo)
    flat = hi == lo
    span = np.where(flat, f(1), hi - lo)
    iscale = f(nmax) / span
    scale = f(1) / iscale
    L = np.clip(_nearest_int(iscale[:, None] * (x - lo[:, None])), 0, nmax).astype(np.uint8)
    best = np.zeros(S, f)
    for i in range(n):
        diff = scale * L[:, i] + lo - x[:, i]
        best = best + w[:, i] * (diff * diff)
    mn = lo.copy()
    for step in range(nstep + 1):   # ggml's loop reads the minimum as the candidates update it
        span = np.where(flat, f(1), hi - mn)
        iscale = (f(rmin) + f(rdelta) * f(step) + f(nmax)) / span
        laux = np.clip(_nearest_int(iscale[:, None] * (x - mn[:, None])), 0, nmax).astype(np.uint8)
        sum_l = sum_l2 = sum_xl = np.zeros(S, f)
        for i in range(n):
            wl = w[:, i] * laux[:, i].astype(f)
            sum_l, sum_l2, sum_xl = sum_l + wl, sum_l2 + wl * laux[:, i].astype(f), sum_xl + wl * x[:, i]
        D = sum_w * sum_l2 - sum_l * sum_l
        with np.errstate(divide="ignore", invalid="ignore"):
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            positive = this_min > 0
            this_scale = np.where(positive, sum_xl / sum_l2, this_scale)
        this_min = np.where(positive, f(0), this_min)
        error = np.zeros(S, f)
        for i in range(n):
            diff = this_scale * laux[:, i] + this_min - x[:, i]
            error = error + w[:, i] * (diff * diff)
        better = (D > 0) & (error < best) & ~flat
        L = np.where(better[:, None], laux, L)
        best, scale, mn = np.where(better, error, best), np.where(better, this_scale, scale), np.where(better, this_min, mn)
    L = np.where(flat[:, None], np.uint8(0), L)
    return np.where(flat, f(0), scale).astype(f), (-np.where(flat, lo, mn)).astype(f), L


def _quantize_q4_k(x):
    """ggml's quantize_row_q4_K_ref on blocks of 256 (rows of x): (blocks, 144) uint8."""
    f = np.float32
    B = x.shape[0]
    sub = x.reshape(B * 8, 32)
    sum_x2 = np.zeros(B * 8, f)
    for i in range(32):
        sum_x2 = sum_x2 + sub[:, i] * sub[:, i]
    av_x = np.sqrt(sum_x2 / f(32))
    scales, mins, L = _make_qkx2_quants(sub, av_x[:, None] + np.abs(sub), 15, -1.0, 0.1, 20)
    scales, mins, L = scales.reshape(B, 8), mins.reshape(B, 8), L.reshape(B, 256)
    max_scale = np.maximum(scales.max(axis=1), f(0))
    max_min = np.maximum(mins.max(axis=1), f(0))
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, f(63) / max_scale, f(0))
        inv_min = np.where(max_min > 0, f(63) / max_min, f(0))
    ls = np.minimum(63, (_nearest_int(inv_scale[:, None] * scales) & 0xFF)).astype(np.uint8)
    lm = np.minimum(63, (_nearest_int(inv_min[:, None] * mins) & 0xFF)).astype(np.uint8)
    sc = np.zeros((B, 12), np.uint8)
    sc[:, :4], sc[:, 4:8] = ls[:, :4], lm[:, :4]
    sc[:, 8:] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    sc[:, :4] |= (ls[:, 4:] >> 4) << 6
    sc[:, 4:8] |= (lm[:, 4:] >> 4) << 6
    d16, dmin16 = (max_scale / f(63)).astype(np.float16), (max_min / f(63)).astype(np.float16)
    d = d16.astype(f)[:, None] * ls.astype(f)          # the scales as stored (6 bits each)
    dm = dmin16.astype(f)[:, None] * lm.astype(f)
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(_nearest_int((x.reshape(B, 8, 32) + dm[:, :, None]) / d[:, :, None]), 0, 15)
    L = np.where((d != 0)[:, :, None], requant, L.reshape(B, 8, 32)).astype(np.uint8).reshape(B, 4, 2, 32)
    qs = (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(B, 128)
    return np.concatenate([d16.view(np.uint8).reshape(B, 2), dmin16.view(np.uint8).reshape(B, 2), sc, qs], axis=1)


def quantize(w, ggml_type):
    """The (N, K) float matrix w as ggml blocks (Q4_0, Q4_1, Q8_0, Q4_K), (N, row bytes) uint8:
    ggml's reference quantizers (quantize_row_*_ref) in float32 numpy."""
    w = np.asarray(w, np.float32)
    N, K = w.shape
    if ggml_type == Q4_K:
        return np.ascontiguousarray(_quantize_q4_k(w.reshape(-1, 256))).reshape(N, -1)
    x = w.reshape(-1, 32)
    with np.errstate(divide="ignore", invalid="ignore"):
        if ggml_type == Q8_0:
            d = (np.abs(x).max(axis=1) / np.float32(127)).astype(np.float32)
            inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
            q = _roundf((x * inv[:, None]).astype(np.float32)).astype(np.int8).view(np.uint8)
            blocks = np.concatenate([d.astype(np.float16).view(np.uint8).reshape(-1, 2), q], axis=1)
        elif ggml_type in (Q4_0, Q4_1):
            if ggml_type == Q4_0:
                at = np.abs(x).argmax(axis=1)   # the first value of largest magnitude, with its sign
                d = (x[np.arange(x.shape[0]), at] / np.float32(-8)).astype(np.float32)
                shift, offset = np.float32(0), np.float32(8.5)
            else:
                lo, hi = x.min(axis=1), x.max(axis=1)
                d = ((hi - lo) / np.float32(15)).astype(np.float32)
                shift, offset = lo[:, None], np.float32(0.5)
            inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
            scaled = ((x - shift).astype(np.float32) * inv[:, None]).astype(np.float32)
            q = np.minimum(15, np.trunc((scaled + offset).astype(np.float32))).astype(np.uint8)
            nibbles = q[:, :16] | (q[:, 16:] << 4)
            head = [d.astype(np.float16).view(np.uint8).reshape(-1, 2)]
            if ggml_type == Q4_1:
                head.append(lo.astype(np.float16).view(np.uint8).reshape(-1, 2))
            blocks = np.concatenate(head + [nibbles], axis=1)
        else:
            raise ValueError(f"quantize writes Q4_0, Q4_1, Q8_0 and Q4_K, not type {ggml_type}")
    return np.ascontiguousarray(blocks).reshape(N, -1)


def dequantize_values(raw, ggml_type, count):
    """float32 values of `count` elements stored as ggml_type in raw bytes (any type of BLOCKS)."""
    raw = np.asarray(raw, np.uint8).reshape(-1)
    if ggml_type == F32:
        return raw.view(np.float32)[:count].copy()
    if ggml_type == F16:
        return raw.view(np.float16)[:count].astype(np.float32)
    if ggml_type == BF16:
        return (raw.view(np.uint16)[:count].astype(np.uint32) << 16).view(np.float32)
    if ggml_type not in BLOCKS:
        raise ValueError(f"ggml type {ggml_type} has no numpy decoder")
    blocks = raw.reshape(-1, BLOCKS[ggml_type][1])
    if ggml_type == Q4_K:
        return _dequantize_q4_k(blocks).reshape(-1)
    if ggml_type == Q6_K:
        return _dequantize_q6_k(blocks).reshape(-1)
    if ggml_type in (Q5_0, Q5_1):
        return _dequantize_q5(blocks, ggml_type).reshape(-1)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)             # (n, 1) scale
    if ggml_type == Q8_0:
        q = blocks[:, 2:].view(np.int8).astype(np.float32)
        return (q * d).reshape(-1)
    packed = blocks[:, 4:] if ggml_type == Q4_1 else blocks[:, 2:]
    q = np.concatenate([packed & 0x0F, packed >> 4], axis=1).astype(np.float32)   # low nibbles first
    if ggml_type == Q4_0:
        return ((q - 8.0) * d).reshape(-1)
    m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    return (q * d + m).reshape(-1)


def _halves(blocks: np.ndarray, at: int) -> np.ndarray:
    return blocks[:, at:at + 2].copy().view(np.float16).astype(np.float32)       # (n, 1)


def _dequantize_q5(blocks: np.ndarray, ggml_type: int) -> np.ndarray:
    """(n, 22 or 24) Q5_0 / Q5_1 blocks -> (n, 32): (nibble | fifth bit << 4) * d, less 16 (Q5_0) or
    plus the minimum m (Q5_1); value j's fifth bit is bit j of a little-endian uint32."""
    d = _halves(blocks, 0)
    at = 4 if ggml_type == Q5_1 else 2
    high = blocks[:, at:at + 4].copy().view("<u4").astype(np.int64)             # (n, 1)
    fifth = ((high >> np.arange(32)) & 1).astype(np.int32) << 4                  # (n, 32)
    packed = blocks[:, at + 4:].astype(np.int32)
    q = (np.concatenate([packed & 0x0F, packed >> 4], axis=1) | fifth).astype(np.float32)
    if ggml_type == Q5_0:
        return (q - 16.0) * d
    return q * d + _halves(blocks, 2)


def _dequantize_q4_k(blocks: np.ndarray) -> np.ndarray:
    """(n, 144) Q4_K super-blocks -> (n, 256): 8 sub-blocks of 32, each value d * scale * q - dmin * min
    with 6-bit scales and minima packed into 12 bytes."""
    d, dmin, s = _halves(blocks, 0), _halves(blocks, 2), blocks[:, 4:16].astype(np.int32)
    scale = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)], axis=1)
    minimum = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    q = blocks[:, 16:].reshape(-1, 4, 32)                        # 4 groups of 32 bytes: low then high nibbles
    q = np.stack([q & 0x0F, q >> 4], axis=2).reshape(-1, 8, 32).astype(np.float32)
    return ((d * scale.astype(np.float32))[:, :, None] * q - (dmin * minimum.astype(np.float32))[:, :, None]
            ).reshape(-1, 256)


def _dequantize_q6_k(blocks: np.ndarray) -> np.ndarray:
    """(n, 210) Q6_K super-blocks -> (n, 256): 6-bit values (4 low bits in ql, 2 high in qh) minus 32,
    times d and one signed scale per 16 values."""
    n = blocks.shape[0]
    ql = blocks[:, :128].reshape(n, 2, 64).astype(np.int32)
    qh = blocks[:, 128:192].reshape(n, 2, 32).astype(np.int32)
    scales = blocks[:, 192:208].view(np.int8).astype(np.float32)
    d = _halves(blocks, 208)
    low = [ql[:, :, :32] & 0x0F, ql[:, :, 32:] & 0x0F, ql[:, :, :32] >> 4, ql[:, :, 32:] >> 4]
    q = np.stack([low[i] | (((qh >> (2 * i)) & 3) << 4) for i in range(4)], axis=2) - 32   # (n, 2, 4, 32)
    values = q.reshape(n, 256).astype(np.float32)                # half, quarter, l: value 128 h + 32 i + l
    return d * np.repeat(scales, 16, axis=1) * values


# pack_quant's layout: the rows in groups of 16 (the last holds the n rows left), a group's block b
# of its n rows together: d[n], m[n] (Q4_1, Q5_1), qh[n] (Q5), then the values in chunks of n lanes
# of 4 bytes, lane r the group's row r: for the 4-bit types byte k of chunk c (of 4) holds value
# 8c+k in its low nibble and 8c+4+k in its high one, for Q8_0 chunk c (of 8) values 4c..4c+3.
# The same bytes as ggml's rows.
_PACKED_PARTS = {Q4_0: (2, 0, 0, 16), Q4_1: (2, 2, 0, 16), Q5_0: (2, 0, 4, 16), Q5_1: (2, 2, 4, 16),
                 Q8_0: (2, 0, 0, 32)}   # bytes of d, m, qh, qs in a block, in the block's own order
PACKED_ROWS = 16


def _packed_fields(ggml_type):
    sizes = _PACKED_PARTS[ggml_type]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    return [(int(a), int(n)) for a, n in zip(starts, sizes) if n]


def _row_groups(N):
    return [(j0, min(PACKED_ROWS, N - j0)) for j0 in range(0, N, PACKED_ROWS)]


def pack_quant(w, ggml_type, shape):
    """ggml rows (N, K) of blocks interleaved in groups of 16 rows (the layout above)."""
    N, K = shape
    nb = K // 32
    blocks = np.asarray(w, np.uint8).reshape(N, nb, BLOCKS[ggml_type][1])
    *scalars, (qs_at, qs_n) = _packed_fields(ggml_type)
    qs = blocks[:, :, qs_at:qs_at + qs_n]
    if ggml_type != Q8_0:   # values 0..31 (low nibbles 0..15, high 16..31), then 8c+k | 8c+4+k << 4
        values = np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(N, nb, 4, 2, 4)
        qs = values[:, :, :, 0] | (values[:, :, :, 1] << 4)
    chunks = qs.reshape(N, nb, -1, 4)                                   # (N, nb, chunk, 4)
    groups = []
    for j0, n in _row_groups(N):
        rows = slice(j0, j0 + n)
        parts = [blocks[rows, :, a:a + k].transpose(1, 0, 2).reshape(nb, n * k) for a, k in scalars]
        parts.append(chunks[rows].transpose(1, 2, 0, 3).reshape(nb, -1))   # (block, chunk, lane, 4)
        groups.append(np.concatenate(parts, axis=1).reshape(n, -1))
    return np.concatenate(groups, axis=0) if groups else np.zeros_like(np.asarray(w, np.uint8).reshape(N, -1))


def unpack_quant(wp, ggml_type, shape):
    """pack_quant undone: the ggml rows again."""
    N, K = shape
    nb, wp = K // 32, np.asarray(wp, np.uint8).reshape(N, -1)
    *scalars, (_, qs_n) = _packed_fields(ggml_type)
    rows = []
    for j0, n in _row_groups(N):
        group = wp[j0:j0 + n].reshape(nb, -1)
        parts, at = [], 0
        for _, k in scalars:
            parts.append(group[:, at:at + n * k].reshape(nb, n, k).transpose(1, 0, 2))
            at += n * k
        chunks = group[:, at:].reshape(nb, qs_n // 4, n, 4).transpose(2, 0, 1, 3)   # (lane, block, chunk, 4)
        if ggml_type != Q8_0:
            values = np.stack([chunks & 0x0F, chunks >> 4], axis=3).reshape(n, nb, 32)
            chunks = values[:, :, :16] | (values[:, :, 16:] << 4)
        parts.append(chunks.reshape(n, nb, qs_n))
        rows.append(np.concatenate(parts, axis=2).reshape(n, -1))
    return np.concatenate(rows, axis=0) if rows else wp


def embed_quant(w, ggml_type, shape, ids, packed=False):
    """Rows ids of the quantized (N, K) matrix w as float32 (an embedding lookup)."""
    return dequantize(w, ggml_type, shape, packed)[np.asarray(ids, np.int64)]


def matmul_rows(a, w, ggml_type, shape):
    """a (..., K) @ W^T with W packed (pack_quant), a rounded as quantize_activations does."""
    return matmul_quant(a, w, ggml_type, shape, int8_activations=True, packed=True)


def quantize_activations(a):
    """a (..., K) rounded per block of 32 as llama.cpp's Q8 activations: (q int8, d float32 per block)
    with d = max|x| / 127 stored as float16 and q = x / d rounded to the nearest integer (ties even)."""
    x = _f32(a).reshape(-1, 32)
    d = (np.abs(x).max(axis=1) / np.float32(127)).astype(np.float16).astype(np.float32)
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)
    q = np.clip(np.rint(x * inv[:, None]), -127, 127).astype(np.int8)
    return q, d


def quantize_activations_k(a):
    """a (..., K) rounded per block of 256 as llama.cpp's Q8_K activations (used with K-quant
    weights): (q, d float32 per block), the value of largest magnitude mapped to -127."""
    x = _f32(a).reshape(-1, 256)
    peak = x[np.arange(len(x)), np.argmax(np.abs(x), axis=1)]        # the first of largest magnitude
    iscale = np.divide(np.float32(-127), peak, out=np.zeros_like(peak), where=peak != 0)
    q = np.minimum(np.float32(127), np.rint(iscale[:, None] * x))
    d = np.divide(np.float32(1), iscale, out=np.zeros_like(iscale), where=iscale != 0)
    return q, d


def matmul_quant(a, w, ggml_type, shape, int8_activations=False, packed=False):
    """a (..., K) @ W^T with W the dequantized (N, K) weights; with int8_activations, a is first
    rounded as quantize_activations does (packed rows: as the 32-value types' rounding)."""
    a = _f32(a)
    if int8_activations:
        q, d = quantize_activations_k(a) if ggml_type in (Q4_K, Q6_K) else quantize_activations(a)
        a = (q.astype(np.float32) * d[:, None]).reshape(a.shape)
    return (a.astype(np.float64) @ dequantize(w, ggml_type, shape, packed).T.astype(np.float64)).astype(np.float32)


def matmul_quant_backward(dout, w, ggml_type, shape, packed=False):
    """dout (..., N) @ W with W the dequantized (N, K) weights."""
    return (_f32(dout).astype(np.float64) @ dequantize(w, ggml_type, shape, packed).astype(np.float64)
            ).astype(np.float32)


# ----------------------------------------------------------------------------- sampling

_MASK64 = (1 << 64) - 1


def sample_uniform(seed, step):
    """The sampler's uniform number in [0, 1) for (seed, step): splitmix64 of a counter, 53 bits."""
    x = (int(seed) + int(step) * 0xD1B54A32D192ED03 + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    x ^= x >> 31
    return (x >> 11) * 2.0 ** -53


def _sample_row(x, history, temperature, top_k, top_p, min_p, repetition_penalty, presence_penalty,
                frequency_penalty, u):
    V = x.size
    z = x.astype(np.float64)
    seen = history[history >= 0]
    if seen.size and (repetition_penalty != 1 or presence_penalty or frequency_penalty):
        ids, counts = np.unique(seen, return_counts=True)
        v = z[ids]
        if repetition_penalty != 1:
            v = np.where(v > 0, v / repetition_penalty, v * repetition_penalty)
        z[ids] = v - (presence_penalty + frequency_penalty * counts)
    if temperature == 0:
        best = int(np.argmax(z))
        probs = np.zeros(V)
        probs[best] = 1.0
        return best, probs
    if np.isfinite(z.max()):
        with np.errstate(over="ignore"):   # shifted first, so only -inf can come out of a tiny temperature
            z = (z - z.max()) / temperature
    order = np.lexsort((np.arange(V), -z))          # largest first, ties to the smaller id
    kept = order[:top_k] if top_k and top_k < V else order
    top = z.max() if np.isfinite(z.max()) else 0.0
    if not np.isfinite(z.max()):
        z = np.zeros(V)
    w = np.zeros(V)
    w[kept] = np.exp(z[kept] - top)
    if top_p is not None and top_p < 1:
        total = np.cumsum(w)[-1]
        mass = np.cumsum(w[kept])
        cut = int(np.argmax(mass >= top_p * total)) + 1 if (mass >= top_p * total).any() else len(kept)
        w[kept[cut:]] = 0.0
    if min_p:
        w[w < min_p] = 0.0
    cumulative = np.cumsum(w)
    total = cumulative[-1]
    hits = np.flatnonzero((cumulative > u * total) & (w > 0))
    chosen = int(hits[0]) if hits.size else int(np.flatnonzero(w)[-1])
    return chosen, w / total


def sample(logits, *, temperature=1.0, top_k=None, top_p=None, min_p=None, repetition_penalty=1.0,
           presence_penalty=0.0, frequency_penalty=0.0, history=None, seed=0, step=0, return_probs=False):
    """Next-token ids from logits (V,) or (B, V) (see pyllm.kernels.sample for the rules).

    Penalties on the raw logits, then temperature (0: greedy), top-k, top-p, min-p; the draw walks
    the kept tokens in ascending id order against sample_uniform(seed, step) times their total.
    """
    x = _f32(logits)
    squeeze = x.ndim == 1
    x = x[None, :] if squeeze else x
    B, V = x.shape
    if history is None:
        rows = [np.zeros(0, np.int64)] * B
    else:
        rows = [np.asarray(history)] if squeeze or (B == 1 and np.ndim(history) == 1) else list(history)
    seeds = np.broadcast_to(np.asarray(seed), (B,))
    steps = np.broadcast_to(np.asarray(step), (B,))
    ids, probs = np.empty(B, np.int64), np.empty((B, V), np.float32)
    for b in range(B):
        ids[b], p = _sample_row(x[b], np.asarray(rows[b], np.int64).reshape(-1), temperature, top_k, top_p,
                                min_p, repetition_penalty, presence_penalty, frequency_penalty,
                                sample_uniform(seeds[b], steps[b]))
        probs[b] = p
    result = int(ids[0]) if squeeze else ids
    if return_probs:
        return result, (probs[0] if squeeze else probs)
    return result


# ----------------------------------------------------------------------------- byte-pair encoding

def bpe_encode_piece(piece, byte_ids, merge_ranks):
    """Token ids of one piece (bytes): start from its bytes, then repeatedly merge the adjacent
    pair of lowest rank, the leftmost on ties. merge_ranks maps (left, right) -> (rank, merged id).

    >>> bpe_encode_piece(b"aab", {97: 0, 98: 1}, {(0, 0): (0, 2), (2, 1): (1, 3)})
    [3]
    """
    ids = [byte_ids[b] for b in piece]
    while len(ids) > 1:
        ranks = [merge_ranks.get(pair, (float("inf"), None)) for pair in zip(ids, ids[1:])]
        best = min(range(len(ranks)), key=lambda i: ranks[i][0])   # min() keeps the leftmost
        if ranks[best][1] is None:
            break
        ids[best:best + 2] = [ranks[best][1]]
    return ids


def bpe_train(piece_counts, num_merges, min_count=0):
    """Merges learned from {piece bytes: count}: recount every pair, merge the most frequent
    (ties: the smallest (left, right)), repeat. Ids 0-255 are bytes; merge i makes 256 + i.

    >>> bpe_train({b"abab": 2}, 1)
    [(97, 98)]
    """
    words = {tuple(piece): count for piece, count in piece_counts.items()}
    merges = []
    while len(merges) < num_merges:
        counts = {}
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                counts[pair] = counts.get(pair, 0) + count
        if not counts:
            break
        pair = min(counts, key=lambda p: (-counts[p], p))
        if counts[pair] < max(min_count, 1):
            break
        made = 256 + len(merges)
        merges.append(pair)
        merged_words = {}
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
                    out.append(made)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged_words[tuple(out)] = merged_words.get(tuple(out), 0) + count
        words = merged_words
    return merges
