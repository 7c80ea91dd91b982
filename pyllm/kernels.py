"""The one door to pyllm's C++ kernels: same names and signatures as `pyllm.reference`.

Not where arithmetic happens: this module checks and converts arguments (dtype, shape,
contiguity, id ranges), allocates the outputs, and calls `pyllm._C` with the GIL released.
No other module of pyllm imports `pyllm._C`: the model's hot path goes through `unchecked`
(below), the tokenizer through the classes re-exported at the end.

Conventions: floating inputs of any float dtype or memory layout are converted to
C-contiguous float32; anything else (ints, bools, objects) where floats are expected is a
TypeError; shapes that do not fit together are a ValueError naming the argument and shapes.
Shape legend: B batch, T time, C channels, V vocabulary, NH query heads, NKV key/value heads,
HS head size, N rows.
"""

from __future__ import annotations

import math
import types
from typing import NamedTuple, Optional

import numpy as np

try:
    from pyllm import _C
except ImportError as exc:  # pragma: no cover - only without a built extension
    raise ImportError(
        "pyllm's C++ extension (pyllm._C) is not built or not importable. Install the package "
        "with `pip install .` from the source tree (it compiles the kernels), and import pyllm "
        "from outside the source folder."
    ) from exc

__all__ = [
    "matmul", "matmul_backward", "softmax", "softmax_backward",
    "layernorm", "layernorm_forward", "layernorm_backward",
    "rmsnorm", "rmsnorm_forward", "rmsnorm_backward",
    "gelu", "gelu_backward", "silu", "silu_backward", "swiglu", "swiglu_backward", "geglu", "geglu_backward",
    "rope_tables", "rope", "rope_backward", "rope_at", "kv_write",
    "attention", "attention_forward", "attention_backward", "sample",
    "cross_entropy", "cross_entropy_forward", "cross_entropy_backward",
    "embedding", "embedding_backward", "adamw", "matmul_quant", "matmul_quant_backward", "dequantize",
    "GGML_TYPES", "QUANT_TYPES", "GgmlType", "row_bytes", "unchecked", "pack_quant", "matmul_rows",
    "matmul_rows_parts", "embed_quant", "PACKED_ROWS", "quantize", "QUANTIZABLE",
    "set_num_threads", "get_num_threads", "available_isas", "get_isa", "set_isa",
    "measure_fma_peak", "measure_read_bandwidth", "JsonGrammar", "JsonState", "TokenBytes",
]


# ----------------------------------------------------------------------------- argument checks

MAX_ROWS = 1 << 24   # the most rows a table built from a count takes (rope positions, a vocabulary)

def _floats(x, name: str, ndim: Optional[int] = None, min_ndim: int = 0) -> np.ndarray:
    """x as a C-contiguous float32 array; other float dtypes are converted, non-floats refused."""
    arr = np.asarray(x)
    if arr.dtype.kind != "f":
        raise TypeError(f"{name} must be a floating-point array, got dtype {arr.dtype}")
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {arr.shape}")
    if arr.ndim < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s), got shape {arr.shape}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _ints(x, name: str, upper: int, ignore: Optional[int] = None) -> np.ndarray:
    """x as a C-contiguous int64 array whose values lie in [0, upper) (or equal `ignore`)."""
    arr = np.asarray(x)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer array, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.int64)
    if arr.size:
        bad = (arr < 0) | (arr >= upper)
        if ignore is not None:
            bad &= arr != ignore
        if bad.any():
            pos = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{name} holds {int(arr.reshape(-1)[pos])} at flat index {pos}, "
                             f"outside [0, {upper})")
    return arr


def _inplace(arr, name: str, dtypes=(np.float32,)) -> np.ndarray:
    """arr itself, if a kernel can update it in place: float32 (or one of dtypes), C-contiguous, writeable."""
    if not isinstance(arr, np.ndarray) or arr.dtype not in dtypes:
        raise TypeError(f"{name} is updated in place, so it must be a "
                        f"{' or '.join(np.dtype(d).name for d in dtypes)} numpy array, "
                        f"got {getattr(arr, 'dtype', type(arr).__name__)}")
    if not arr.flags.c_contiguous or not arr.flags.writeable:
        raise ValueError(f"{name} is updated in place, so it must be C-contiguous and writeable")
    return arr


def _same_shape(name: str, arr: np.ndarray, shape: tuple) -> None:
    if arr.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {arr.shape}")


def _rows(x: np.ndarray) -> tuple[int, int]:
    """(N, C) of an array viewed as rows over its last axis."""
    C = x.shape[-1]
    return (x.size // C if C else 0), C


# ----------------------------------------------------------------------------- matmul

def matmul(a, b, bias=None, *, trans_b: bool = False) -> np.ndarray:
    """a (..., K) @ b (K, N) (+ bias (N,)); with trans_b, b is (N, K) and a @ b.T is taken.

    >>> matmul(np.ones((2, 3), np.float32), np.ones((3, 4), np.float32))[0]
    array([3., 3., 3., 3.], dtype=float32)
    """
    a = _floats(a, "a", min_ndim=1)
    b = _floats(b, "b", ndim=2)
    K = a.shape[-1]
    N, Kb = (b.shape[0], b.shape[1]) if trans_b else (b.shape[1], b.shape[0])
    if Kb != K:
        raise ValueError(f"matmul: a is {a.shape} (K={K}) but b is {b.shape} "
                         f"({'(N, K)' if trans_b else '(K, N)'} needs K={K})")
    if bias is not None:
        bias = _floats(bias, "bias")
        _same_shape("bias", bias, (N,))
    M = a.size // K if K else int(np.prod(a.shape[:-1]))
    out = np.empty(a.shape[:-1] + (N,), np.float32)
    if out.size:
        _C.matmul_forward(out, a, b, bias, M, K, N, trans_b)
    return out


def matmul_backward(dout, a, b, *, trans_b: bool = False, bias: bool = False):
    """Gradients of matmul: (da, db, dbias), dbias None unless bias=True.

    da = dout @ b.T is shaped like a; db = a.T @ dout is shaped like b (dout.T @ a with trans_b).
    """
    a = _floats(a, "a", min_ndim=1)
    b = _floats(b, "b", ndim=2)
    K = a.shape[-1]
    N = b.shape[0] if trans_b else b.shape[1]
    if (b.shape[1] if trans_b else b.shape[0]) != K:
        raise ValueError(f"matmul_backward: a is {a.shape} but b is {b.shape}")
    dout = _floats(dout, "dout")
    _same_shape("dout", dout, a.shape[:-1] + (N,))
    M = int(np.prod(a.shape[:-1]))
    da = np.empty(a.shape, np.float32)
    db = np.zeros(b.shape, np.float32)
    dbias = np.zeros(N, np.float32) if bias else None
    if da.size or db.size:
        _C.matmul_backward(da, db, dbias, dout, a, b, M, K, N, trans_b)
    elif dbias is not None and dout.size:   # K == 0: no product, but the bias still sums dout
        dbias[...] = dout.reshape(-1, N).sum(0, dtype=np.float64)
    return da, db, dbias


# ----------------------------------------------------------------------------- softmax

def softmax(x) -> np.ndarray:
    """Softmax over the last axis (the row max is subtracted first, so any finite input is safe).

    >>> softmax(np.zeros((1, 4), np.float32))
    array([[0.25, 0.25, 0.25, 0.25]], dtype=float32)
    """
    x = _floats(x, "x", min_ndim=1)
    out = np.empty_like(x)
    N, C = _rows(x)
    if x.size:
        _C.softmax_forward(out, x, N, C)
    return out


def softmax_backward(dout, y) -> np.ndarray:
    """dx for y = softmax(x)."""
    y = _floats(y, "y", min_ndim=1)
    dout = _floats(dout, "dout")
    _same_shape("dout", dout, y.shape)
    dx = np.empty_like(y)
    N, C = _rows(y)
    if y.size:
        _C.softmax_backward(dx, dout, y, N, C)
    return dx


# ----------------------------------------------------------------------------- norms

def _norm_params(x, w, b=None):
    x = _floats(x, "x", min_ndim=1)
    C = x.shape[-1]
    if C == 0:
        raise ValueError(f"x is {x.shape}: a norm needs at least one value per row (the last axis)")
    w = _floats(w, "w")
    _same_shape("w", w, (C,))
    if b is not None:
        b = _floats(b, "b")
        _same_shape("b", b, (C,))
    return x, w, b


def layernorm_forward(x, w, b, eps: float = 1e-5):
    """LayerNorm over the last axis C; returns (out, mean, rstd), mean/rstd shaped x.shape[:-1]."""
    x, w, b = _norm_params(x, w, b)
    N, C = _rows(x)
    out = np.empty_like(x)
    mean = np.empty(x.shape[:-1], np.float32)
    rstd = np.empty(x.shape[:-1], np.float32)
    if x.size:
        _C.layernorm_forward(out, mean, rstd, x, w, b, N, C, float(eps))
    return out, mean, rstd


def layernorm(x, w, b, eps: float = 1e-5) -> np.ndarray:
    """LayerNorm over the last axis: (x - mean) / sqrt(var + eps) * w + b.

    >>> layernorm(np.array([[1.0, 3.0]], np.float32), np.ones(2, np.float32), np.zeros(2, np.float32))
    array([[-0.999995,  0.999995]], dtype=float32)
    """
    return layernorm_forward(x, w, b, eps)[0]


def layernorm_backward(dout, x, w, mean, rstd):
    """Gradients of layernorm: (dx, dw, db), dw and db summed over all rows."""
    x, w, _ = _norm_params(x, w)
    dout = _floats(dout, "dout")
    _same_shape("dout", dout, x.shape)
    mean, rstd = _floats(mean, "mean"), _floats(rstd, "rstd")
    _same_shape("mean", mean, x.shape[:-1])
    _same_shape("rstd", rstd, x.shape[:-1])
    N, C = _rows(x)
    dx, dw, db = np.empty_like(x), np.zeros(C, np.float32), np.zeros(C, np.float32)
    if x.size:
        _C.layernorm_backward(dx, dw, db, dout, x, w, mean, rstd, N, C)
    return dx, dw, db


def rmsnorm_forward(x, w, eps: float = 1e-6):
    """RMSNorm over the last axis; returns (out, rstd), rstd shaped x.shape[:-1]."""
    x, w, _ = _norm_params(x, w)
    N, C = _rows(x)
    out = np.empty_like(x)
    rstd = np.empty(x.shape[:-1], np.float32)
    if x.size:
        _C.rmsnorm_forward(out, rstd, x, w, N, C, float(eps))
    return out, rstd


def rmsnorm(x, w, eps: float = 1e-6) -> np.ndarray:
    """RMSNorm over the last axis: x / sqrt(mean(x^2) + eps) * w (Llama's norm).

    >>> rmsnorm(np.array([[2.0, 2.0]], np.float32), np.ones(2, np.float32))
    array([[0.9999999, 0.9999999]], dtype=float32)
    """
    return rmsnorm_forward(x, w, eps)[0]


def rmsnorm_backward(dout, x, w, rstd):
    """Gradients of rmsnorm: (dx, dw), dw summed over all rows."""
    x, w, _ = _norm_params(x, w)
    dout = _floats(dout, "dout")
    _same_shape("dout", dout, x.shape)
    rstd = _floats(rstd, "rstd")
    _same_shape("rstd", rstd, x.shape[:-1])
    N, C = _rows(x)
    dx, dw = np.empty_like(x), np.zeros(C, np.float32)
    if x.size:
        _C.rmsnorm_backward(dx, dw, dout, x, w, rstd, N, C)
    return dx, dw


# ----------------------------------------------------------------------------- activations

def _unary(kernel, x) -> np.ndarray:
    x = _floats(x, "x")
    out = np.empty_like(x)
    if x.size:
        kernel(out, x)
    return out


def _unary_backward(kernel, dout, x) -> np.ndarray:
    x = _floats(x, "x")
    dout = _floats(dout, "dout")
    _same_shape("dout", dout, x.shape)
    dx = np.empty_like(x)
    if x.size:
        kernel(dx, dout, x)
    return dx


def gelu(x) -> np.ndarray:
    """GELU, tanh approximation (GPT-2's).

    >>> gelu(np.array([0.0, 1.0], np.float32))
    array([0.      , 0.841192], dtype=float32)
    """
    return _unary(_C.gelu_forward, x)


def gelu_backward(dout, x) -> np.ndarray:
    """dx for gelu."""
    return _unary_backward(_C.gelu_backward, dout, x)


def silu(x) -> np.ndarray:
    """SiLU (swish): x * sigmoid(x).

    >>> silu(np.array([0.0], np.float32))
    array([0.], dtype=float32)
    """
    return _unary(_C.silu_forward, x)


def silu_backward(dout, x) -> np.ndarray:
    """dx for silu."""
    return _unary_backward(_C.silu_backward, dout, x)


def _gated(forward, gate, up) -> np.ndarray:
    gate, up = _floats(gate, "gate"), _floats(up, "up")
    _same_shape("up", up, gate.shape)
    out = np.empty_like(gate)
    if gate.size:
        forward(out, gate, up)
    return out


def _gated_backward(backward, dout, gate, up):
    gate, up, dout = _floats(gate, "gate"), _floats(up, "up"), _floats(dout, "dout")
    _same_shape("up", up, gate.shape)
    _same_shape("dout", dout, gate.shape)
    dgate, dup = np.empty_like(gate), np.empty_like(gate)
    if gate.size:
        backward(dgate, dup, dout, gate, up)
    return dgate, dup


def swiglu(gate, up) -> np.ndarray:
    """silu(gate) * up, Llama's feed-forward gate.

    >>> swiglu(np.zeros(2, np.float32), np.ones(2, np.float32))
    array([0., 0.], dtype=float32)
    """
    return _gated(_C.swiglu_forward, gate, up)


def swiglu_backward(dout, gate, up):
    """Gradients of swiglu: (dgate, dup)."""
    return _gated_backward(_C.swiglu_backward, dout, gate, up)


def geglu(gate, up) -> np.ndarray:
    """gelu(gate) * up with GELU's tanh form, Gemma's feed-forward gate.

    >>> geglu(np.ones(2, np.float32), np.full(2, 2.0, np.float32))
    array([1.682384, 1.682384], dtype=float32)
    """
    return _gated(_C.geglu_forward, gate, up)


def geglu_backward(dout, gate, up):
    """Gradients of geglu: (dgate, dup)."""
    return _gated_backward(_C.geglu_backward, dout, gate, up)


# ----------------------------------------------------------------------------- rotary embedding

def rope_tables(positions, head_size: int, theta: float = 10000.0,
                freq_factors=None) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin tables for rotary embeddings, each (T, HS/2): angle p / (theta^(2i / HS) f_i) at
    each position p (an int T means 0 .. T-1, or a 1-D array of positions), f = freq_factors (HS/2
    positive numbers: a scaled rope such as Llama 3's; None: all 1).

    >>> cos, sin = rope_tables(4, 8)
    >>> cos.shape
    (4, 4)
    """
    if isinstance(head_size, bool) or int(head_size) != head_size or head_size < 2 or head_size % 2:
        raise ValueError(f"rope needs an even head size, got {head_size!r}")
    if isinstance(theta, bool) or not (np.isscalar(theta) and np.isreal(theta) and math.isfinite(theta)
                                        and theta > 0):
        raise ValueError(f"rope theta must be a finite number > 0, got {theta!r}")
    if np.ndim(positions) == 0:
        if isinstance(positions, bool) or not isinstance(positions, (int, np.integer)) or \
                not 0 <= positions <= MAX_ROWS:
            raise ValueError(f"positions must be a count in [0, {MAX_ROWS}] or a 1-D array, got {positions!r}")
        table_positions, P = None, int(positions)
    else:
        arr = np.asarray(positions)
        if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iuf") or not np.isfinite(arr).all():
            raise ValueError(f"positions must be a 1-D array of finite numbers, got {arr.dtype} {arr.shape}")
        table_positions, P = np.ascontiguousarray(arr, np.float64), arr.size
    factors = None
    if freq_factors is not None:
        factors = np.ascontiguousarray(freq_factors, np.float64)
        if factors.shape != (int(head_size) // 2,) or not (np.isfinite(factors).all() and (factors > 0).all()):
            raise ValueError(f"freq_factors must be {int(head_size) // 2} finite numbers > 0, "
                             f"got shape {factors.shape}")
    cos = np.empty((P, int(head_size) // 2), np.float32)
    sin = np.empty_like(cos)
    if cos.size:
        _C.rope_tables(cos, sin, table_positions, P, int(head_size), float(theta), factors)
    return cos, sin


def _rope_args(x, cos, sin, xname):
    x = _floats(x, xname, min_ndim=2)
    T, HS = x.shape[-2], x.shape[-1]
    if HS % 2:
        raise ValueError(f"rope needs an even head size HS, {xname} has shape {x.shape}")
    cos, sin = _floats(cos, "cos"), _floats(sin, "sin")
    _same_shape("cos", cos, (T, HS // 2))
    _same_shape("sin", sin, (T, HS // 2))
    return x, cos, sin


def _rope(kernel, x, cos, sin, xname) -> np.ndarray:
    x, cos, sin = _rope_args(x, cos, sin, xname)
    out = np.empty_like(x)
    if x.size:   # rows of any leading shape are (batch, T, one head, HS) for the kernel
        T, HS = x.shape[-2:]
        kernel(out.reshape(-1, T, 1, HS), x.reshape(-1, T, 1, HS), cos, sin, None)
    return out


def rope(x, cos, sin) -> np.ndarray:
    """Rotary position embedding ("rotate half" layout) on x (..., T, HS) with cos/sin (T, HS/2).

    >>> cos, sin = rope_tables(1, 2)
    >>> rope(np.ones((1, 1, 1, 2), np.float32), cos, sin)
    array([[[[1., 1.]]]], dtype=float32)
    """
    return _rope(_C.rope_forward, x, cos, sin, "x")


def rope_backward(dout, cos, sin) -> np.ndarray:
    """dx for rope: the rotation by the negative angle."""
    return _rope(_C.rope_backward, dout, cos, sin, "dout")


def _positions_from(pos0, B: int, T: int, limit: int, what: str) -> np.ndarray:
    pos0 = _ints(pos0, "pos0", limit)
    _same_shape("pos0", pos0, (B,))
    if B and int(pos0.max()) + T > limit:
        raise ValueError(f"pos0 + {T} new positions run past the {what} ({limit} positions)")
    return pos0


def rope_at(x, cos, sin, pos0) -> np.ndarray:
    """rope on x (B, T, H, HS), tokens first (as a projection writes them), batch row b starting
    at position pos0[b] of the tables cos/sin (P, HS/2): a ragged batch, each row at its own length.

    >>> cos, sin = rope_tables(4, 2)
    >>> rope_at(np.ones((1, 1, 1, 2), np.float32), cos, sin, [0])
    array([[[[1., 1.]]]], dtype=float32)
    """
    x = _floats(x, "x", ndim=4)
    B, T, H, HS = x.shape
    if HS % 2:
        raise ValueError(f"rope needs an even head size HS, x has shape {x.shape}")
    cos, sin = _floats(cos, "cos", ndim=2), _floats(sin, "sin", ndim=2)
    if cos.shape[1] != HS // 2:
        raise ValueError(f"cos must be (P, HS/2 = {HS // 2}), got {cos.shape}")
    _same_shape("sin", sin, cos.shape)
    pos0 = _positions_from(pos0, B, T, cos.shape[0], "tables")
    out = np.empty_like(x)
    if x.size:
        _C.rope_forward(out, x, cos, sin, pos0)
    return out


def kv_write(cache, src, pos0, rows=None) -> None:
    """Appends src (B, T, H, HS) (new keys or values, tokens first) to cache (R, H, capacity, HS) in
    place: row (b, t, h) goes to cache[r_b, h, pos0[b] + t], each batch row at its own length, r_b =
    rows[b] (distinct cache rows in any order: a continuous batch's), or b when rows is None. A
    float16 cache gets the values rounded to nearest (as numpy's astype(float16) rounds them).

    >>> cache = np.zeros((1, 1, 4, 2), np.float32)
    >>> kv_write(cache, np.ones((1, 1, 1, 2), np.float32), [2]); cache[0, 0, 2]
    array([1., 1.], dtype=float32)
    """
    cache = _inplace(cache, "cache", (np.float32, np.float16))
    src = _floats(src, "src", ndim=4)
    B, T, H, HS = src.shape
    if cache.ndim != 4 or cache.shape[1] != H or cache.shape[3] != HS or (rows is None and cache.shape[0] != B):
        raise ValueError(f"cache must be (B={B} or, with rows, more, H={H}, capacity, HS={HS}), got {cache.shape}")
    rows = _cache_rows(rows, B, cache.shape[0])
    pos0 = _positions_from(pos0, B, T, cache.shape[2], "cache")
    if src.size:
        (_C.kv_write_half if cache.dtype == np.float16 else _C.kv_write)(cache, src, pos0, rows)


def _cache_rows(rows, B: int, have: int) -> Optional[np.ndarray]:
    """rows as B distinct int64 indices below `have`, or None."""
    if rows is None:
        return None
    rows = _ints(rows, "rows", have)
    _same_shape("rows", rows, (B,))
    if np.unique(rows).size != B:
        raise ValueError(f"rows must be distinct cache rows, got {rows}")
    return rows


# ----------------------------------------------------------------------------- attention

def _attention_args(q, k, v, causal, half_kv: bool = False, rows: bool = False):
    q = _floats(q, "q", ndim=4)
    if half_kv and np.asarray(k).dtype == np.float16 and np.asarray(v).dtype == np.float16:
        k = np.ascontiguousarray(k)     # a float16 KV cache, read as it is
        v = np.ascontiguousarray(v)
        if k.ndim != 4 or v.ndim != 4:
            raise ValueError(f"k and v must have 4 dimensions, got shapes {k.shape} and {v.shape}")
    else:
        k = _floats(k, "k", ndim=4)
        v = _floats(v, "v", ndim=4)
    B, NH, Tq, HS = q.shape
    _, NKV, Tk, _ = k.shape
    if (k.shape[0] < B if rows else k.shape[0] != B) or k.shape[3] != HS:
        raise ValueError(f"k must be (B={B}, NKV, Tk, HS={HS}), got {k.shape} (q is {q.shape})")
    _same_shape("v", v, k.shape)
    if NKV == 0 or NH % NKV:
        raise ValueError(f"the number of query heads NH={NH} must be a multiple of the number "
                         f"of key/value heads NKV={NKV}")
    if causal and Tk < Tq:
        raise ValueError(f"causal attention needs at least as many keys as queries, got "
                         f"Tk={Tk} < Tq={Tq}")
    return q, k, v, (B, NH, NKV, Tq, Tk, HS)


def _window(window, causal: bool) -> int:
    """A sliding window as the kernels take it: a count of keys >= 1 (causal only), 0 for none."""
    if window is None:
        return 0
    if isinstance(window, bool) or int(window) != window or window < 1:
        raise ValueError(f"window must be an integer >= 1 or None, got {window!r}")
    if not causal:
        raise ValueError("a sliding window belongs to causal attention")
    return int(window)


def attention_forward(q, k, v, causal: bool = True, kv_lengths=None, kv_rows=None, window=None,
                      return_probs: bool = False):
    """Scaled dot-product attention; returns (out (B, NH, Tq, HS), lse (B, NH, Tq)), and with
    return_probs (float32 k and v, no kv_lengths or kv_rows) also probs (B, NH, Tq, Tk): the
    softmax weights each query gave each key, 0 where it sees none (what `pyllm explain` shows;
    recomputed from the scores and lse as backward does, so the fast path is unchanged).

    k and v are (B, NKV, Tk, HS) with NH a multiple of NKV; with causal, query i (of Tq) sees
    keys up to i + Tk - Tq, so a short query block can continue a longer cached sequence.
    kv_lengths (B,), if given, keeps only the first kv_lengths[b] keys of batch row b (ragged KV
    caches), each row aligned causally to its own length; kv_rows (B,), if given, makes batch row
    b read row kv_rows[b] of k and v (then (R, NKV, Tk, HS), R >= B: a continuous batch's cache).
    k and v both float16 (a half-precision KV cache) are read as they are, widened to float32 in
    registers; other dtypes become float32. window (causal): each query sees only the last `window`
    keys up to its own position (sliding-window attention, Mistral's).
    """
    w = _window(window, causal)
    q, k, v, dims = _attention_args(q, k, v, causal, half_kv=True, rows=kv_rows is not None)
    B, NH, NKV, Tq, Tk, HS = dims
    if HS == 0:
        raise ValueError(f"q is {q.shape}: attention needs heads of at least one value (the last axis)")
    kv_rows = _cache_rows(kv_rows, B, k.shape[0])
    if kv_lengths is not None:
        kv_lengths = _ints(kv_lengths, "kv_lengths", Tk + 1)
        _same_shape("kv_lengths", kv_lengths, (B,))
        if (kv_lengths < (Tq if causal else 1)).any():
            raise ValueError(f"kv_lengths must lie in [{Tq if causal else 1}, Tk={Tk}], got {kv_lengths}")
    out = np.empty_like(q)
    lse = np.empty((B, NH, Tq), np.float32)
    if q.size and Tk and HS:
        forward = _C.attention_forward_half if k.dtype == np.float16 else _C.attention_forward
        forward(out, lse, q, k, v, bool(causal), kv_lengths, kv_rows, w)
    elif q.size:  # no keys or no width: nothing to attend to
        out.fill(0.0)
        lse.fill(-np.inf if Tk == 0 else math.log(Tk))
    if not return_probs:
        return out, lse
    if k.dtype != np.float32 or kv_lengths is not None or kv_rows is not None:
        raise ValueError("return_probs needs float32 k and v and no kv_lengths or kv_rows")
    probs = np.zeros((B, NH, Tq, Tk), np.float32)
    if q.size and Tk:
        _C.attention_probabilities(probs, q, k, lse, bool(causal), w)
    return out, lse, probs


def attention(q, k, v, causal: bool = True) -> np.ndarray:
    """softmax(q k^T / sqrt(HS), causal mask) v for q (B, NH, Tq, HS) and k, v (B, NKV, Tk, HS).

    >>> q = np.zeros((1, 1, 2, 4), np.float32); v = np.arange(8, dtype=np.float32).reshape(1, 1, 2, 4)
    >>> attention(q, q, v)[0, 0, 1]
    array([2., 3., 4., 5.], dtype=float32)
    """
    return attention_forward(q, k, v, causal)[0]


def attention_backward(dout, q, k, v, out, lse, causal: bool = True, window=None):
    """Gradients of attention: (dq, dk, dv), from the saved out and lse of attention_forward."""
    w = _window(window, causal)
    q, k, v, dims = _attention_args(q, k, v, causal)
    B, NH, NKV, Tq, Tk, HS = dims
    dout, out = _floats(dout, "dout"), _floats(out, "out")
    _same_shape("dout", dout, q.shape)
    _same_shape("out", out, q.shape)
    lse = _floats(lse, "lse")
    _same_shape("lse", lse, (B, NH, Tq))
    if not (q.size and Tk and HS):
        return np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    dq, dk, dv = np.empty_like(q), np.empty_like(k), np.empty_like(v)
    _C.attention_backward(dq, dk, dv, dout, q, k, v, out, lse, bool(causal), w)
    return dq, dk, dv


# ----------------------------------------------------------------------------- cross-entropy

def _ce_args(logits, targets, ignore_index):
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer)) or \
            not -2 ** 63 <= ignore_index < 2 ** 63:
        raise ValueError(f"ignore_index must be a 64-bit integer, got {ignore_index!r}")
    logits = _floats(logits, "logits", min_ndim=1)
    V = logits.shape[-1]
    targets = _ints(targets, "targets", V, ignore=ignore_index)
    _same_shape("targets", targets, logits.shape[:-1])
    return logits, targets, V, targets.size


def cross_entropy_forward(logits, targets, ignore_index: int = -100):
    """Per-row (losses, lse) of logits (..., V) against targets (...); ignored rows get loss 0."""
    logits, targets, V, N = _ce_args(logits, targets, ignore_index)
    losses = np.zeros(targets.shape, np.float32)
    lse = np.zeros(targets.shape, np.float32)
    if N and V:
        _C.cross_entropy_forward(losses, lse, logits, targets, N, V, int(ignore_index))
    return losses, lse


def cross_entropy(logits, targets, ignore_index: int = -100) -> np.float32:
    """Mean of -log softmax(logits)[target] over rows whose target is not ignore_index (0.0 if none).

    >>> float(cross_entropy(np.zeros((1, 4), np.float32), np.array([2])))  # log(4)
    1.3862943649291992
    """
    losses, _ = cross_entropy_forward(logits, targets, ignore_index)
    count = max(int(np.count_nonzero(np.asarray(targets) != ignore_index)), 1)
    return np.float32(losses.sum(dtype=np.float64) / count)


def cross_entropy_backward(logits, targets, lse, dloss: float = 1.0, ignore_index: int = -100):
    """dlogits of the mean loss times dloss: (softmax(logits) - onehot(target)) * dloss / count."""
    logits, targets, V, N = _ce_args(logits, targets, ignore_index)
    lse = _floats(lse, "lse")
    _same_shape("lse", lse, targets.shape)
    count = max(int(np.count_nonzero(targets != ignore_index)), 1)
    dlogits = np.empty_like(logits)
    if N and V:
        _C.cross_entropy_backward(dlogits, logits, lse, targets, float(dloss) / count, N, V,
                                  int(ignore_index))
    return dlogits


# ----------------------------------------------------------------------------- embedding

def embedding(ids, weight) -> np.ndarray:
    """Rows of weight (V, C) picked by integer ids (...): returns (..., C).

    >>> embedding(np.array([1]), np.eye(2, dtype=np.float32))
    array([[0., 1.]], dtype=float32)
    """
    weight = _floats(weight, "weight", ndim=2)
    V, C = weight.shape
    ids = _ints(ids, "ids", V)
    out = np.empty(ids.shape + (C,), np.float32)
    if out.size:
        _C.embedding_forward(out, ids, weight, ids.size, V, C)
    return out


def embedding_backward(dout, ids, vocab_size: int, *, dweight=None) -> np.ndarray:
    """dweight (V, C): each row of dout (..., C) scatter-added into the row of its id.

    With dweight given (a float32, C-contiguous (V, C) array), the rows are added into it in
    place and it is returned: how training accumulates into its gradient buffer.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) or \
            not 0 <= vocab_size <= MAX_ROWS:
        raise ValueError(f"vocab_size must be an integer in [0, {MAX_ROWS}], got {vocab_size!r}")
    vocab_size = int(vocab_size)
    ids = _ints(ids, "ids", vocab_size)
    dout = _floats(dout, "dout", min_ndim=1)
    C = dout.shape[-1]
    _same_shape("dout", dout, ids.shape + (C,))
    if dweight is None:
        dw = np.zeros((vocab_size, C), np.float32)
    else:
        dw = _inplace(dweight, "dweight")
        _same_shape("dweight", dw, (vocab_size, C))
    if dw.size and ids.size:
        _C.embedding_backward(dw, dout, ids, ids.size, vocab_size, C)
    return dw


# ----------------------------------------------------------------------------- optimizer

def adamw(param, grad, m, v, *, lr: float, step: int, beta1: float = 0.9, beta2: float = 0.95,
          eps: float = 1e-8, weight_decay: float = 0.0, grad_scale: float = 1.0) -> None:
    """One AdamW update in place on param, m and v (float32, C-contiguous, writeable, same shape).

    grad is multiplied by grad_scale first (for clipping); step counts from 1.
    >>> p = np.ones(3, np.float32); m = np.zeros(3, np.float32); v = np.zeros(3, np.float32)
    >>> adamw(p, np.ones(3, np.float32), m, v, lr=0.1, step=1); p
    array([0.9, 0.9, 0.9], dtype=float32)
    """
    for name, arr in (("param", param), ("m", m), ("v", v)):
        _inplace(arr, name)
    grad = _floats(grad, "grad")
    for name, arr in (("grad", grad), ("m", m), ("v", v)):
        _same_shape(name, arr, param.shape)
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or not 1 <= step < 2 ** 62:
        raise ValueError(f"step counts from 1, got {step!r}")
    for name, value, ok in (("lr", lr, lambda x: x >= 0), ("beta1", beta1, lambda x: 0 <= x < 1),
                            ("beta2", beta2, lambda x: 0 <= x < 1), ("eps", eps, lambda x: x > 0),
                            ("weight_decay", weight_decay, lambda x: x >= 0),
                            ("grad_scale", grad_scale, lambda x: x >= 0)):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) or \
                not math.isfinite(value) or not ok(value):
            raise ValueError(f"adamw: {name} must be a finite number in its range, got {value!r}")
    if param.size:
        _C.adamw_update(param, m, v, grad, float(lr), float(beta1), float(beta2), float(eps),
                        float(weight_decay), float(grad_scale), int(step))


# ----------------------------------------------------------------------------- quantized weights

class GgmlType(NamedTuple):
    """A ggml tensor type (the table is csrc/kernels/quant_types.h, read from the module)."""

    name: str
    id: int
    block_values: int    # values per block (1 for the float types)
    block_bytes: int
    quantized: bool      # matmul_quant, dequantize and matmul_quant_backward take it
    packed: bool         # pack_quant and matmul_rows take it


GGML_TYPES: dict[int, GgmlType] = {t[1]: GgmlType(*t) for t in _C.ggml_types()}
QUANT_TYPES: dict[str, int] = {t.name: t.id for t in GGML_TYPES.values() if t.quantized}   # name -> ggml id


def row_bytes(ggml_type: int, values: int) -> int:
    """Bytes of `values` consecutive values (whole blocks) of a ggml type.

    >>> row_bytes(QUANT_TYPES["Q8_0"], 64)
    68
    """
    t = GGML_TYPES.get(ggml_type)
    if t is None:
        raise ValueError(f"unknown ggml type {ggml_type!r} (pyllm reads {sorted(GGML_TYPES)})")
    return values // t.block_values * t.block_bytes


def _quant_args(w, ggml_type, shape, packed: bool = False):
    t = GGML_TYPES.get(ggml_type)
    if t is None or not t.quantized:
        raise ValueError(f"quantized type {ggml_type} is not supported ("
                         + ", ".join(f"{name}={i}" for name, i in QUANT_TYPES.items()) + ")")
    if packed and not t.packed:
        raise ValueError(f"{t.name} has no packed layout (packed: "
                         + ", ".join(x.name for x in GGML_TYPES.values() if x.packed) + ")")
    N, K = shape
    if K % t.block_values:
        raise ValueError(f"rows of {K} values are not whole {t.name} blocks of {t.block_values}")
    w = np.asarray(w)
    if w.dtype != np.uint8:
        raise TypeError(f"quantized weights must be uint8 bytes, got {w.dtype}")
    need = N * row_bytes(ggml_type, K)
    if w.size != need:
        raise ValueError(f"{shape} in type {ggml_type} needs {need} bytes, got {w.size}")
    return np.ascontiguousarray(w).reshape(-1), N, K


def matmul_quant(a, w, ggml_type: int, shape: tuple[int, int], int8_activations: bool = False,
                 packed: bool = False) -> np.ndarray:
    """a (..., K) @ W^T for W (N, K) = shape stored as ggml blocks (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K,
    Q6_K) in bytes w.

    int8_activations rounds a per block of 32 to int8 with a float16 scale first, as llama.cpp
    does (faster integer dot products when a has few rows; slightly less exact); for the K-quants
    (Q4_K, Q6_K) per block of 256 with a float32 scale, as llama.cpp's Q8_K. packed: w is in
    pack_quant's layout (the same weights; with int8_activations multiplied in integers at any
    number of rows, as matmul_rows does).
    """
    w, N, K = _quant_args(w, ggml_type, shape, packed)
    a = _floats(a, "a", min_ndim=1)
    if a.shape[-1] != K:
        raise ValueError(f"matmul_quant: a is {a.shape} but the weights are {shape} (N, K)")
    M = a.size // K if K else 0
    out = (np.empty if K else np.zeros)(a.shape[:-1] + (N,), np.float32)   # no values: sums of nothing
    if out.size and K:
        _C.matmul_quant(out, a, w, int(ggml_type), M, K, N, bool(int8_activations), bool(packed))
    return out


def matmul_quant_backward(dout, w, ggml_type: int, shape: tuple[int, int], packed: bool = False) -> np.ndarray:
    """dout (..., N) @ W for W (N, K) = shape in ggml blocks: the input gradient of matmul_quant
    (the weights stay frozen, so no weight gradient)."""
    w, N, K = _quant_args(w, ggml_type, shape, packed)
    dout = _floats(dout, "dout", min_ndim=1)
    if dout.shape[-1] != N:
        raise ValueError(f"matmul_quant_backward: dout is {dout.shape} but the weights are {shape} (N, K)")
    M = dout.size // N if N else 0
    dx = np.empty(dout.shape[:-1] + (K,), np.float32)
    if dx.size:
        _C.matmul_quant_backward(dx, dout, w, int(ggml_type), M, K, N, bool(packed))
    return dx


PACKED_ROWS: int = _C.packed_rows   # pack_quant's groups of rows (csrc/kernels/quant_types.h)


def pack_quant(w, ggml_type: int, shape: tuple[int, int]) -> np.ndarray:
    """The ggml rows w of W (N, K) regrouped for integer products (the types whose GgmlType.packed is
    set): the rows in groups of 16, each block of a group's rows together (their scales, minima,
    fifth bits, then their values four at a time, row by row: reference.pack_quant states the
    layout); the same bytes, (N, row bytes). A range of rows from a multiple of 16 to another (or
    to the end) is a packed matrix too. The quantized kernels take it with packed=True. The quantized kernels take it with packed=True."""
    w, N, K = _quant_args(w, ggml_type, shape, packed=True)
    out = np.empty((N, row_bytes(ggml_type, K)), np.uint8)
    if out.size:
        _C.pack_quant(out, w, int(ggml_type), N, K)
    return out


def matmul_rows(a, w, ggml_type: int, shape: tuple[int, int]) -> np.ndarray:
    """a (..., K) @ W^T for W (N, K) = shape in pack_quant's layout, each row of a a sequence of its
    own (a decode batch): rounded per block of 32 to int8 with a float16 scale (llama.cpp's Q8_0)
    and multiplied in integers, so a row's result never depends on the other rows of a."""
    return matmul_rows_parts(a, [(w, shape)], ggml_type)[0]


def matmul_rows_parts(a, parts, ggml_type: int) -> list[np.ndarray]:
    """matmul_rows for several packed matrices (w, (N_p, K)) of one type that read the same a (a
    Llama layer's gate and up): a is rounded once and one parallel region covers every part; each
    result is bit for bit matmul_rows's."""
    if not parts:
        raise ValueError("matmul_rows_parts: no weight matrices")
    ws, Ns, K = [], [], None
    for w, shape in parts:
        w, N, K_p = _quant_args(w, ggml_type, shape, packed=True)
        if K is not None and K_p != K:
            raise ValueError(f"matmul_rows_parts: the parts' K differ ({K} and {K_p})")
        K = K_p
        ws.append(w.reshape(N, row_bytes(ggml_type, K)))
        Ns.append(N)
    a = _floats(a, "a", min_ndim=1)
    if a.shape[-1] != K:
        raise ValueError(f"matmul_rows: a is {a.shape} but the weights' K is {K}")
    M = a.size // K if K else 0
    outs = [(np.empty if K else np.zeros)(a.shape[:-1] + (N,), np.float32) for N in Ns]
    live = [p for p, N in enumerate(Ns) if N]
    if M and K and live:
        _C.matmul_rows([outs[p].reshape(M, Ns[p]) for p in live], a, [ws[p] for p in live], int(ggml_type), M, K)
    return outs


def dequantize(w, ggml_type: int, shape: tuple[int, int], packed: bool = False) -> np.ndarray:
    """The float32 (N, K) matrix of ggml-quantized bytes w (packed: in pack_quant's layout)."""
    w, N, K = _quant_args(w, ggml_type, shape, packed)
    out = np.empty((N, K), np.float32)
    if out.size:
        _C.dequantize_rows(out, w, int(ggml_type), N, K, bool(packed))
    return out


QUANTIZABLE = tuple(QUANT_TYPES[n] for n in ("Q4_0", "Q4_1", "Q8_0", "Q4_K"))   # what quantize writes


def quantize(w, ggml_type: int) -> np.ndarray:
    """The (N, K) float matrix w as ggml blocks, (N, row_bytes) uint8: the bytes llama.cpp's
    reference quantizer writes (Q4_0, Q4_1, Q8_0: K a multiple of 32; Q4_K: of 256)."""
    if ggml_type not in QUANTIZABLE:
        names = ", ".join(GGML_TYPES[t].name for t in QUANTIZABLE)
        raise ValueError(f"quantize writes {names}; got type {ggml_type!r}")
    w = _floats(w, "w", ndim=2)
    N, K = w.shape
    block = GGML_TYPES[ggml_type].block_values
    if K % block:
        raise ValueError(f"quantize to {GGML_TYPES[ggml_type].name} needs rows of a multiple of {block} values, got {K}")
    if not np.isfinite(w).all():
        raise ValueError("quantize: w holds NaN or infinity")
    out = np.empty((N, row_bytes(ggml_type, K)), np.uint8)
    if out.size:
        _C.quantize_rows(out, w, int(ggml_type), N, K)
    return out


def embed_quant(w, ggml_type: int, shape: tuple[int, int], ids, packed: bool = False) -> np.ndarray:
    """Rows ids (any shape) of the quantized (N, K) = shape matrix w as float32, ids.shape + (K,):
    an embedding lookup in a table kept in blocks (packed: in pack_quant's layout)."""
    w, N, K = _quant_args(w, ggml_type, shape, packed)
    ids = np.asarray(ids)
    if ids.dtype.kind not in "iu":
        raise TypeError(f"embed_quant: ids must be integers, got {ids.dtype}")
    flat = np.ascontiguousarray(ids, np.int64).reshape(-1)
    if flat.size and (flat.min() < 0 or flat.max() >= N):
        raise ValueError(f"embed_quant: ids outside [0, {N})")
    out = np.empty(ids.shape + (K,), np.float32)
    if out.size:
        _C.embed_quant(out, w, int(ggml_type), N, K, flat, flat.size, bool(packed))
    return out


# ----------------------------------------------------------------------------- sampling

def _is_number(x) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float, np.integer, np.floating)) and math.isfinite(x)


def _sampling_args(logits, temperature, top_k, top_p, min_p, repetition_penalty, history, seed):
    """Checked (logits (B, V), history (B, H) padded with -1, seeds (B,) uint64, squeeze)."""
    if not (_is_number(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1 or None, got {top_k!r}")
    if top_p is not None and not (_is_number(top_p) and 0 < top_p <= 1):
        raise ValueError(f"top_p must lie in (0, 1], got {top_p!r}")
    if min_p is not None and not (_is_number(min_p) and 0 <= min_p < 1):
        raise ValueError(f"min_p must lie in [0, 1), got {min_p!r}")
    if not (_is_number(repetition_penalty) and repetition_penalty > 0):
        raise ValueError(f"repetition_penalty must be a finite number > 0 (1 is off), got {repetition_penalty!r}")
    logits = _floats(logits, "logits", min_ndim=1)
    squeeze = logits.ndim == 1
    if squeeze:
        logits = logits[None, :]
    if logits.ndim != 2 or logits.shape[1] == 0:
        raise ValueError(f"logits must be (V,) or (B, V) with V >= 1, got {logits.shape}")
    if np.isnan(logits).any() or np.isposinf(logits).any():
        raise ValueError("logits hold NaN or +inf")
    B, V = logits.shape
    if history is None:
        hist = np.full((B, 0), -1, np.int64)
    elif isinstance(history, np.ndarray) and history.ndim == 2 and history.dtype == np.int64 and not squeeze:
        # Already padded (B, H) (what generation keeps, appending in place): checked, not rebuilt.
        if history.shape[0] != B:
            raise ValueError(f"history needs one row per row of logits ({B}), got {history.shape[0]}")
        if history.size and (int(history.max()) >= V or int(history.min()) < -1):
            raise ValueError(f"history holds ids outside [0, {V}) (-1 pads a row)")
        hist = np.ascontiguousarray(history)
    else:
        rows = [history] if squeeze or (B == 1 and np.ndim(history) == 1) else list(history)
        if len(rows) != B:
            raise ValueError(f"history needs one sequence per row of logits ({B}), got {len(rows)}")
        rows = [_ints(np.asarray(r, np.int64) if len(r) == 0 else r, "history", V).reshape(-1) for r in rows]
        hist = np.full((B, max((len(r) for r in rows), default=0)), -1, np.int64)
        for b, r in enumerate(rows):
            hist[b, :len(r)] = r
    try:
        seeds = np.asarray(seed if seed is not None else 0)
    except OverflowError:
        raise ValueError(f"seed must fit 64 bits, got {seed!r}") from None
    if seeds.dtype.kind not in "iu" or seeds.ndim > 1 or (seeds.ndim == 1 and seeds.shape != (B,)) or \
            (seeds.dtype.kind == "i" and (seeds < 0).any()):
        raise ValueError(f"seed must be an integer >= 0 or one per row, got {seed!r}")
    seeds = np.ascontiguousarray(np.broadcast_to(seeds, (B,)).astype(np.uint64))
    return logits, hist, seeds, squeeze


def sample(logits, *, temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
           min_p: Optional[float] = None, repetition_penalty: float = 1.0, presence_penalty: float = 0.0,
           frequency_penalty: float = 0.0, history=None, seed=0, step: int = 0, return_probs: bool = False):
    """Next-token ids sampled from logits (V,) or (B, V): an int, or (B,) ids.

    history is a sequence of ids per row, or a (B, H) int64 array whose rows are padded with -1.
    Penalties (on the ids in `history`) apply to the raw logits, then temperature (0: greedy),
    top-k, top-p (smallest set reaching the mass), min-p (relative to the most likely token).
    The draw uses a uniform number that depends only on (seed, step), so a seeded generation
    repeats exactly; seed and step are one value or one per row (rows of a continuous batch are
    at different steps of their own sequences). With return_probs, also the distribution that was
    sampled from.
    """
    for name, value in (("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty)):
        if not _is_number(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    logits, hist, seeds, squeeze = _sampling_args(logits, temperature, top_k, top_p, min_p,
                                                  repetition_penalty, history, seed)
    B, V = logits.shape
    steps = np.asarray(step)
    if steps.dtype == bool or steps.dtype.kind not in "iu" or steps.ndim > 1 or (steps < 0).any() \
            or (steps.ndim == 1 and steps.size != B) or (steps.size and int(steps.max()) >= 2 ** 63):
        raise ValueError(f"step must be an integer >= 0 or one per row ({B}), got {step!r}")
    steps = np.ascontiguousarray(np.broadcast_to(steps, (B,)), np.uint64)
    ids = np.empty(B, np.int64)
    probs = np.empty((B, V), np.float32) if return_probs else None
    _C.sample(ids, logits, hist, seeds, steps, float(temperature), min(int(top_k or 0), V),
              float(1.0 if top_p is None else top_p), float(min_p or 0.0), float(repetition_penalty),
              float(presence_penalty), float(frequency_penalty), probs)
    result = int(ids[0]) if squeeze else ids
    if return_probs:
        return result, (probs[0] if squeeze else probs)
    return result


# ----------------------------------------------------------------------------- constrained decoding

# The JSON matcher of csrc/sampling/json_grammar.h: JsonGrammar(nodes, root) (nodes: (kind, keys,
# children, required, additional, literals) tuples, [] for any JSON; pyllm.constrain compiles a
# schema into them), .start() -> a JsonState, .feed(state, bytes) -> bool (the state unchanged when
# False), .complete(state), .ended(state) (complete, only blanks may follow), .closing_length(state), .mask(state, TokenBytes, out uint8 (vocab,), budget=-1):
# the tokens that may follow and leave a document that `budget` more bytes can close (-1: any).
JsonGrammar = _C.JsonGrammar
JsonState = _C.JsonState
TokenBytes = _C.TokenBytes   # TokenBytes(list of each token's bytes): a vocabulary held once in C++; t[id] its bytes


# ----------------------------------------------------------------------------- runtime controls

MAX_THREADS = 1024   # csrc/threads.cpp's kMaxThreads


def set_num_threads(n: int) -> None:
    """Sets how many threads every kernel uses (default: all cores, or $PYLLM_NUM_THREADS).

    >>> set_num_threads(get_num_threads())
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= MAX_THREADS:
        raise ValueError(f"the number of threads must be an integer in [1, {MAX_THREADS}], got {n!r}")
    _C.set_num_threads(int(n))   # RuntimeError, the old pool kept, where the system refuses the threads


def get_num_threads() -> int:
    """The number of threads the kernels use."""
    return _C.num_threads()


def available_isas() -> list[str]:
    """SIMD levels compiled in that this CPU runs, worst to best (e.g. ['generic', 'avx2'])."""
    return list(_C.available_isas())


def get_isa() -> str:
    """The SIMD level in use (the best available unless set_isa or $PYLLM_ISA chose another)."""
    return _C.isa()


def set_isa(name: str) -> None:
    """Switches every kernel to another compiled SIMD level (for testing and comparisons)."""
    if name not in available_isas():
        raise ValueError(f"ISA {name!r} is not available here; choose one of {available_isas()}")
    _C.select_isa(name)


def measure_fma_peak(seconds: float = 0.5) -> float:
    """GFLOP/s of a register-only FMA loop on all kernel threads: the measured fp32 peak."""
    return float(_C.fma_peak_gflops(float(seconds)))


def measure_read_bandwidth(seconds: float = 0.5) -> float:
    """The memory read bandwidth in GB/s: every pool thread summing a 256 MB buffer (beyond any
    cache) for about `seconds`. What a decode step, which reads every weight once, is bounded by."""
    return float(_C.read_bandwidth_gbps(float(seconds)))


# ----------------------------------------------------------------------------- the unchecked entrance

unchecked = types.SimpleNamespace(**{name: getattr(_C, name) for name in _C.kernel_names()})
unchecked.__doc__ = """The model's hot path: every kernel of csrc/kernels/kernel_list.h, as bound, with nothing
checked here. Arguments follow the kernel's C++ order (outputs, saved values, inputs, weights,
dims); outputs are preallocated float32 arrays, C-contiguous except where a kernel reads heads at
strides (attention_forward/backward, rope_forward/backward, and kv_write's source: numpy views
whose last axis is contiguous; kv_write's cache itself is C-contiguous). The bindings still refuse
any buffer too small for the dims given, ids and targets out of range and positions past their
tables, so a wrong call raises instead of reading or writing out of bounds; wrong shapes that fit
give wrong numbers. Users call the checked functions above."""

# The tokenizer's C++ (csrc/tokenizer/): byte-level BPE encode/decode and training, SentencePiece-
# style merging by score (SpmModel(pieces, scores, byte_ids, unk_id).encode(normalized bytes)), and
# the built-in pre-tokenizer patterns. Checked by their bindings; pyllm.tokenizer drives them.
BpeModel = _C.BpeModel
SpmModel = _C.SpmModel
PieceCounter = _C.PieceCounter
train_bpe = _C.train_bpe
pretokenize = _C.pretokenize
pretokenize_offsets = _C.pretokenize_offsets
sample_uniform = _C.sample_uniform

# The model's decode step in C++ (csrc/model/step.h): built by pyllm.models.decode from a model's
# arrays, each of which it checks against the sizes it is given.
DecodePlan = _C.DecodePlan
