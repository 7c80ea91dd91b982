// Bindings of every kernel: raw buffers in, GIL released, the C++ kernel called.
// Not a second argument checker: shapes and dtypes are validated in pyllm/kernels.py; the
// checks here only guarantee that no call can read or write outside the arrays it was given
// (sizes from the dims, ids and targets in range, positions within their tables): what the
// model's hot path (pyllm.kernels.unchecked) relies on.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "common.h"
#include "formats/quantize.h"
#include "kernels/kernels.h"

namespace py = pybind11;
using pyllm::check;
using pyllm::kernels;

namespace {

// The product of dims, each >= 0, refusing a product that overflows: what a buffer must hold.
template <class... Dims>
int64_t count(Dims... dims) {
  int64_t n = 1;
  for (int64_t d : {int64_t(dims)...}) {
    check(d >= 0, "a dimension is negative");
    check(!__builtin_mul_overflow(n, d, &n), "dimensions too large");
  }
  return n;
}

template <class T>
void check_buffer(const py::array& a, int64_t n, const char* name, const char* dtype) {
  check(py::dtype::of<T>().is(a.dtype()), std::string(name) + " must be a " + dtype + " array");
  check(a.flags() & py::array::c_style, std::string(name) + " must be C-contiguous");
  check(a.size() >= n, std::string(name) + " has " + std::to_string(a.size()) +
                           " elements, the kernel needs " + std::to_string(n));
}

const float* in(const py::array& a, int64_t n, const char* name) {
  check_buffer<float>(a, n, name, "float32");
  return static_cast<const float*>(a.data());
}

float* out(py::array& a, int64_t n, const char* name) {
  check_buffer<float>(a, n, name, "float32");
  check(a.writeable(), std::string(name) + " must be writeable");
  return static_cast<float*>(a.mutable_data());
}

// A gradient output that may be None (not wanted).
float* maybe_out(py::object o, int64_t n, const char* name) {
  if (o.is_none()) return nullptr;
  py::array a = o.cast<py::array>();
  return out(a, n, name);
}

const int64_t* ids(const py::array& a, int64_t n, const char* name) {
  check_buffer<int64_t>(a, n, name, "int64");
  return static_cast<const int64_t*>(a.data());
}

// Targets (N,) in [0, V) or equal to ignore_index: the kernels index the logits' rows with them.
const int64_t* targets_in(const py::array& a, int64_t N, int64_t V, int64_t ignore_index) {
  const int64_t* p = ids(a, count(N), "targets");
  for (int64_t r = 0; r < N; ++r)
    check(p[r] == ignore_index || (p[r] >= 0 && p[r] < V), "a target is outside [0, V)");
  return p;
}

// A tensor of heads seen as (d0, d1, d2, HS) with the values of a row contiguous and the other
// axes at any strides (a numpy view of a fused projection or of a KV cache): its data and its
// HeadStrides, axes (batch, head, pos) taken from positions (0, head_axis, pos_axis).
// A (4-D) tensor of heads at any strides, values contiguous: float32, or float16 (a KV cache).
template <class T>
struct HeadsOf {
  T* p;
  int64_t dims[4];
  pyllm::HeadStrides s;
};
using Heads = HeadsOf<float>;

template <class T>
HeadsOf<T> heads_of(const py::array& a, const char* name, bool write, int head_axis) {
  const bool half = std::is_same_v<T, uint16_t>;
  check(half ? py::dtype("float16").is(a.dtype()) : py::dtype::of<float>().is(a.dtype()),
        std::string(name) + (half ? " must be a float16 array" : " must be a float32 array"));
  check(a.ndim() == 4, std::string(name) + " must have 4 dimensions");
  check(a.shape(3) == 1 || a.strides(3) == sizeof(T), std::string(name) + "'s last axis must be contiguous");
  for (int d = 0; d < 3; ++d)
    check(a.strides(d) % sizeof(T) == 0 && a.strides(d) >= 0, std::string(name) + " has unusable strides");
  if (write) check(a.writeable(), std::string(name) + " must be writeable");
  const int pos_axis = head_axis == 1 ? 2 : 1;
  auto stride = [&](int d) { return int64_t(a.strides(d) / sizeof(T)); };
  return HeadsOf<T>{static_cast<T*>(const_cast<void*>(a.data())),
                    {a.shape(0), a.shape(1), a.shape(2), a.shape(3)},
                    {stride(0), stride(head_axis), stride(pos_axis)}};
}

Heads heads(const py::array& a, const char* name, bool write, int head_axis) {
  return heads_of<float>(a, name, write, head_axis);
}

bool same_layout(const Heads& x, const Heads& y) {
  return x.dims[0] == y.dims[0] && x.dims[1] == y.dims[1] && x.dims[2] == y.dims[2] && x.dims[3] == y.dims[3] &&
         x.s.batch == y.s.batch && x.s.head == y.s.head && x.s.pos == y.s.pos;
}

// Per-row starting positions (B,) int64, each with `need` rows after it below `limit`.
const int64_t* starts(py::object o, int64_t B, int64_t need, int64_t limit, const char* name) {
  if (o.is_none()) {
    check(need <= limit, std::string(name) + ": more positions than the table holds");
    return nullptr;
  }
  const int64_t* p = ids(o.cast<py::array>(), B, name);
  for (int64_t b = 0; b < B; ++b)
    check(p[b] >= 0 && need <= limit && p[b] <= limit - need, std::string(name) + " runs past the end");
  return p;
}

}  // namespace

void bind_kernels(py::module_& m) {
  using py::arg;
  m.def("matmul_forward", [](py::array o, py::array a, py::array b, py::object bias, int64_t M,
                             int64_t K, int64_t N, bool trans_b) {
    float* po = out(o, count(M, N), "out");
    const float *pa = in(a, count(M, K), "a"), *pb = in(b, count(K, N), "b");
    const float* pbias = bias.is_none() ? nullptr : in(bias.cast<py::array>(), N, "bias");
    py::gil_scoped_release release;
    kernels().matmul_forward(po, pa, pb, pbias, M, K, N, trans_b);
  });
  m.def("matmul_backward", [](py::object da, py::object db, py::object dbias, py::array dout,
                              py::array a, py::array b, int64_t M, int64_t K, int64_t N,
                              bool trans_b) {
    float *pda = maybe_out(da, count(M, K), "da"), *pdb = maybe_out(db, count(K, N), "db");
    float* pdbias = maybe_out(dbias, count(N), "dbias");
    const float *pdout = in(dout, count(M, N), "dout"), *pa = in(a, count(M, K), "a"), *pb = in(b, count(K, N), "b");
    py::gil_scoped_release release;
    kernels().matmul_backward(pda, pdb, pdbias, pdout, pa, pb, M, K, N, trans_b);
  });
  m.def("softmax_forward", [](py::array o, py::array x, int64_t N, int64_t C) {
    float* po = out(o, count(N, C), "out");
    const float* px = in(x, count(N, C), "x");
    py::gil_scoped_release release;
    kernels().softmax_forward(po, px, N, C);
  });
  m.def("softmax_backward", [](py::array dx, py::array dout, py::array y, int64_t N, int64_t C) {
    float* pdx = out(dx, count(N, C), "dx");
    const float *pdout = in(dout, count(N, C), "dout"), *py_ = in(y, count(N, C), "y");
    py::gil_scoped_release release;
    kernels().softmax_backward(pdx, pdout, py_, N, C);
  });
  m.def("cross_entropy_forward", [](py::array losses, py::array lse, py::array logits,
                                    py::array targets, int64_t N, int64_t V, int64_t ignore_index) {
    float *pl = out(losses, count(N), "losses"), *plse = out(lse, count(N), "lse");
    const float* px = in(logits, count(N, V), "logits");
    const int64_t* pt = targets_in(targets, N, V, ignore_index);
    py::gil_scoped_release release;
    kernels().cross_entropy_forward(pl, plse, px, pt, N, V, ignore_index);
  });
  m.def("cross_entropy_backward", [](py::array dlogits, py::array logits, py::array lse,
                                     py::array targets, float scale, int64_t N, int64_t V,
                                     int64_t ignore_index) {
    float* pd = out(dlogits, count(N, V), "dlogits");
    const float *px = in(logits, count(N, V), "logits"), *plse = in(lse, count(N), "lse");
    const int64_t* pt = targets_in(targets, N, V, ignore_index);
    py::gil_scoped_release release;
    kernels().cross_entropy_backward(pd, px, plse, pt, scale, N, V, ignore_index);
  });
  m.def("layernorm_forward", [](py::array o, py::array mean, py::array rstd, py::array x,
                                py::array w, py::array b, int64_t N, int64_t C, float eps) {
    float *po = out(o, count(N, C), "out"), *pm = out(mean, count(N), "mean"), *pr = out(rstd, count(N), "rstd");
    const float *px = in(x, count(N, C), "x"), *pw = in(w, count(C), "w"), *pb = in(b, count(C), "b");
    py::gil_scoped_release release;
    kernels().layernorm_forward(po, pm, pr, px, pw, pb, N, C, eps);
  });
  m.def("layernorm_backward", [](py::object dx, py::object dw, py::object db, py::array dout,
                                 py::array x, py::array w, py::array mean, py::array rstd,
                                 int64_t N, int64_t C) {
    float *pdx = maybe_out(dx, count(N, C), "dx"), *pdw = maybe_out(dw, count(C), "dw"), *pdb = maybe_out(db, count(C), "db");
    const float *pdout = in(dout, count(N, C), "dout"), *px = in(x, count(N, C), "x"), *pw = in(w, count(C), "w");
    const float *pm = in(mean, count(N), "mean"), *pr = in(rstd, count(N), "rstd");
    py::gil_scoped_release release;
    kernels().layernorm_backward(pdx, pdw, pdb, pdout, px, pw, pm, pr, N, C);
  });
  m.def("rmsnorm_forward", [](py::array o, py::array rstd, py::array x, py::array w, int64_t N,
                              int64_t C, float eps) {
    float *po = out(o, count(N, C), "out"), *pr = out(rstd, count(N), "rstd");
    const float *px = in(x, count(N, C), "x"), *pw = in(w, count(C), "w");
    py::gil_scoped_release release;
    kernels().rmsnorm_forward(po, pr, px, pw, N, C, eps);
  });
  m.def("rmsnorm_backward", [](py::object dx, py::object dw, py::array dout, py::array x,
                               py::array w, py::array rstd, int64_t N, int64_t C) {
    float *pdx = maybe_out(dx, count(N, C), "dx"), *pdw = maybe_out(dw, count(C), "dw");
    const float *pdout = in(dout, count(N, C), "dout"), *px = in(x, count(N, C), "x"), *pw = in(w, count(C), "w");
    const float* pr = in(rstd, count(N), "rstd");
    py::gil_scoped_release release;
    kernels().rmsnorm_backward(pdx, pdw, pdout, px, pw, pr, N, C);
  });

  // Pointwise kernels share one shape: n elements in, n out.
  using Unary = void (*)(float*, const float*, int64_t);
  using UnaryBackward = void (*)(float*, const float*, const float*, int64_t);
  auto bind_unary = [&m](const char* name, Unary pyllm::KernelTable::*fn) {
    m.def(name, [fn](py::array o, py::array x) {
      const int64_t n = x.size();
      float* po = out(o, count(n), "out");
      const float* px = in(x, count(n), "x");
      py::gil_scoped_release release;
      (kernels().*fn)(po, px, n);
    });
  };
  auto bind_unary_backward = [&m](const char* name, UnaryBackward pyllm::KernelTable::*fn) {
    m.def(name, [fn](py::array dx, py::array dout, py::array x) {
      const int64_t n = x.size();
      float* pdx = out(dx, count(n), "dx");
      const float *pdout = in(dout, count(n), "dout"), *px = in(x, count(n), "x");
      py::gil_scoped_release release;
      (kernels().*fn)(pdx, pdout, px, n);
    });
  };
  bind_unary("gelu_forward", &pyllm::KernelTable::gelu_forward);
  bind_unary("silu_forward", &pyllm::KernelTable::silu_forward);
  bind_unary_backward("gelu_backward", &pyllm::KernelTable::gelu_backward);
  bind_unary_backward("silu_backward", &pyllm::KernelTable::silu_backward);
  // The gated activations (SwiGLU, GeGLU): out = act(gate) * up, and both gradients.
  using Gated = void (*)(float*, const float*, const float*, int64_t);
  using GatedBackward = void (*)(float*, float*, const float*, const float*, const float*, int64_t);
  auto bind_gated = [&m](const char* name, const char* backward_name, Gated pyllm::KernelTable::*fn,
                         GatedBackward pyllm::KernelTable::*backward) {
    m.def(name, [fn](py::array o, py::array gate, py::array up) {
      const int64_t n = gate.size();
      float* po = out(o, count(n), "out");
      const float *pg = in(gate, count(n), "gate"), *pu = in(up, count(n), "up");
      py::gil_scoped_release release;
      (kernels().*fn)(po, pg, pu, n);
    });
    m.def(backward_name, [backward](py::array dgate, py::array dup, py::array dout, py::array gate, py::array up) {
      const int64_t n = gate.size();
      float *pdg = out(dgate, count(n), "dgate"), *pdu = out(dup, count(n), "dup");
      const float *pdout = in(dout, count(n), "dout"), *pg = in(gate, count(n), "gate"), *pu = in(up, count(n), "up");
      py::gil_scoped_release release;
      (kernels().*backward)(pdg, pdu, pdout, pg, pu, n);
    });
  };
  bind_gated("swiglu_forward", "swiglu_backward", &pyllm::KernelTable::swiglu_forward,
             &pyllm::KernelTable::swiglu_backward);
  bind_gated("geglu_forward", "geglu_backward", &pyllm::KernelTable::geglu_forward,
             &pyllm::KernelTable::geglu_backward);
  m.def("rope_tables", [](py::array cos, py::array sin, py::object positions, int64_t P, int64_t HS, double theta,
                          py::object freq_factors) {
    check(HS % 2 == 0 && HS > 0 && P >= 0, "rope tables need an even head size");
    float *pc = out(cos, count(P, HS / 2), "cos"), *ps = out(sin, count(P, HS / 2), "sin");
    auto doubles = [](const py::object& o, int64_t n, const char* what) -> const double* {
      if (o.is_none()) return nullptr;
      py::array a = o.cast<py::array>();
      check(py::dtype::of<double>().is(a.dtype()) && (a.flags() & py::array::c_style) && a.size() >= n,
            std::string(what) + " must be a C-contiguous float64 array of enough entries");
      return static_cast<const double*>(a.data());
    };
    const double* pp = doubles(positions, P, "positions");
    const double* pf = doubles(freq_factors, HS / 2, "freq_factors");
    py::gil_scoped_release release;
    kernels().rope_tables(pc, ps, pp, P, HS, theta, pf);
  }, py::arg("cos"), py::arg("sin"), py::arg("positions"), py::arg("P"), py::arg("HS"), py::arg("theta"),
     py::arg("freq_factors") = py::none());
  // rope_*(out, inp, cos, sin, pos0): out and inp (B, T, H, HS) views, cos and sin (P, HS/2).
  auto bind_rope = [&m](const char* name, decltype(pyllm::KernelTable::rope_forward) pyllm::KernelTable::*fn) {
    m.def(name, [fn](py::array o, py::array x, py::array cos, py::array sin, py::object pos0) {
      const Heads ho = heads(o, "out", true, 2), hx = heads(x, "inp", false, 2);
      check(std::equal(ho.dims, ho.dims + 4, hx.dims), "rope: out and inp differ in shape");
      const int64_t B = hx.dims[0], T = hx.dims[1], H = hx.dims[2], HS = hx.dims[3];
      check(HS % 2 == 0, "rope needs an even head size");
      check(cos.ndim() == 2 && cos.shape(1) == HS / 2, "cos must be (P, HS/2)");
      const int64_t P = cos.shape(0);
      const float *pc = in(cos, count(P, HS / 2), "cos"), *ps = in(sin, count(P, HS / 2), "sin");
      const int64_t* p0 = starts(pos0, B, T, P, "pos0");
      py::gil_scoped_release release;
      (kernels().*fn)(ho.p, hx.p, pc, ps, p0, B, T, H, HS, ho.s, hx.s);
    });
  };
  bind_rope("rope_forward", &pyllm::KernelTable::rope_forward);
  bind_rope("rope_backward", &pyllm::KernelTable::rope_backward);
  // cache float32 (kv_write) or float16 (kv_write_half: rounded as it is written).
  // rows: None (batch row b is cache row b) or (B,) distinct int64 cache rows.
  auto cache_rows = [](py::object rows, int64_t B, int64_t have, const char* name) -> const int64_t* {
    if (rows.is_none()) {
      check(B <= have, std::string(name) + ": more batch rows than the cache holds");
      return nullptr;
    }
    const int64_t* pr = ids(rows.cast<py::array>(), B, name);
    std::vector<bool> seen(size_t(have), false);
    for (int64_t b = 0; b < B; ++b) {
      check(pr[b] >= 0 && pr[b] < have, std::string(name) + ": a row outside the cache");
      check(!seen[size_t(pr[b])], std::string(name) + ": a cache row given twice");
      seen[size_t(pr[b])] = true;
    }
    return pr;
  };
  auto kv_write = [cache_rows](auto element, py::array cache, py::array src, py::array pos0, py::object rows) {
    using T = decltype(element);
    check(cache.ndim() == 4, "cache must be (rows, H, capacity, HS)");
    const Heads hs = heads(src, "src", false, 2);
    const HeadsOf<T> hc = heads_of<T>(cache, "cache", true, 1);
    const int64_t B = hs.dims[0], T_ = hs.dims[1], H = hs.dims[2], HS = hs.dims[3], cap = hc.dims[2];
    check(hc.dims[1] == H && hc.dims[3] == HS, "kv_write: cache and src differ");
    check(hc.s.pos == HS && hc.s.head == cap * HS && hc.s.batch == H * cap * HS, "cache must be C-contiguous");
    const int64_t* pr = cache_rows(rows, B, hc.dims[0], "rows");
    const int64_t* p0 = starts(pos0, B, T_, cap, "pos0");
    py::gil_scoped_release release;
    if constexpr (std::is_same_v<T, uint16_t>)
      kernels().kv_write_half(hc.p, hs.p, p0, pr, B, T_, H, HS, cap, hs.s);
    else
      kernels().kv_write(hc.p, hs.p, p0, pr, B, T_, H, HS, cap, hs.s);
  };
  m.def("kv_write", [kv_write](py::array c, py::array s, py::array p, py::object r) { kv_write(float{}, c, s, p, r); },
        arg("cache"), arg("src"), arg("pos0"), arg("rows") = py::none());
  m.def("kv_write_half", [kv_write](py::array c, py::array s, py::array p, py::object r) {
    kv_write(uint16_t{}, c, s, p, r);
  }, arg("cache"), arg("src"), arg("pos0"), arg("rows") = py::none());
  // q, out (B, NH, Tq, HS) and k, v (B, NKV, Tk, HS): views at any strides (values contiguous);
  // k and v float32 (attention_forward) or float16 (attention_forward_half: a half-precision cache).
  auto attention_forward = [cache_rows](auto element, py::array o, py::array lse, py::array q, py::array k,
                                        py::array v, bool causal, py::object kv_lengths, py::object kv_rows,
                                        int64_t window) {
    using T = decltype(element);
    const Heads ho = heads(o, "out", true, 1), hq = heads(q, "q", false, 1);
    const HeadsOf<T> hk = heads_of<T>(k, "k", false, 1), hv = heads_of<T>(v, "v", false, 1);
    const int64_t B = hq.dims[0], NH = hq.dims[1], Tq = hq.dims[2], HS = hq.dims[3];
    const int64_t NKV = hk.dims[1], Tk = hk.dims[2];
    check(std::equal(ho.dims, ho.dims + 4, hq.dims) && (kv_rows.is_none() ? hk.dims[0] == B : true) &&
              hk.dims[3] == HS && std::equal(hk.dims, hk.dims + 4, hv.dims) && NKV >= 1 && NH % NKV == 0,
          "inconsistent attention shapes");
    const int64_t* prows = cache_rows(kv_rows, B, hk.dims[0], "kv_rows");
    check(window >= 0 && (window == 0 || causal), "a window must be >= 0, and belongs to causal attention");
    float* pl = out(lse, count(B, NH, Tq), "lse");
    const int64_t* plen = nullptr;
    if (!kv_lengths.is_none()) {
      plen = ids(kv_lengths.cast<py::array>(), B, "kv_lengths");
      for (int64_t b = 0; b < B; ++b)
        check(plen[b] <= Tk && plen[b] >= (causal ? Tq : 1), "kv_lengths outside [Tq, Tk]");
    } else {
      check(!causal || Tk >= Tq, "causal attention needs Tk >= Tq");
    }
    py::gil_scoped_release release;
    if constexpr (std::is_same_v<T, uint16_t>)
      kernels().attention_forward_half(ho.p, pl, hq.p, hk.p, hv.p, B, NH, NKV, Tq, Tk, HS, causal, window, plen, prows,
                                       ho.s, hq.s, hk.s, hv.s);
    else
      kernels().attention_forward(ho.p, pl, hq.p, hk.p, hv.p, B, NH, NKV, Tq, Tk, HS, causal, window, plen, prows,
                                  ho.s, hq.s, hk.s, hv.s);
  };
  m.def("attention_forward", [attention_forward](py::array o, py::array lse, py::array q, py::array k, py::array v,
                                                 bool causal, py::object kv_lengths, py::object kv_rows,
                                                 int64_t window) {
    attention_forward(float{}, o, lse, q, k, v, causal, kv_lengths, kv_rows, window);
  }, arg("out"), arg("lse"), arg("q"), arg("k"), arg("v"), arg("causal"), arg("kv_lengths"),
     arg("kv_rows") = py::none(), arg("window") = 0);
  m.def("attention_forward_half", [attention_forward](py::array o, py::array lse, py::array q, py::array k,
                                                      py::array v, bool causal, py::object kv_lengths,
                                                      py::object kv_rows, int64_t window) {
    attention_forward(uint16_t{}, o, lse, q, k, v, causal, kv_lengths, kv_rows, window);
  }, arg("out"), arg("lse"), arg("q"), arg("k"), arg("v"), arg("causal"), arg("kv_lengths"),
     arg("kv_rows") = py::none(), arg("window") = 0);
  // The gradients of q, k and v at their strides (each None when not wanted), dout at out's.
  m.def("attention_backward", [](py::object dq, py::object dk, py::object dv, py::array dout,
                                 py::array q, py::array k, py::array v, py::array o, py::array lse,
                                 bool causal, int64_t window) {
    const Heads hq = heads(q, "q", false, 1), hk = heads(k, "k", false, 1), hv = heads(v, "v", false, 1);
    const Heads ho = heads(o, "out", false, 1), hg = heads(dout, "dout", false, 1);
    const int64_t B = hq.dims[0], NH = hq.dims[1], Tq = hq.dims[2], HS = hq.dims[3];
    const int64_t NKV = hk.dims[1], Tk = hk.dims[2];
    check(same_layout(ho, hg) && std::equal(ho.dims, ho.dims + 4, hq.dims) && hk.dims[0] == B &&
              hk.dims[3] == HS && std::equal(hk.dims, hk.dims + 4, hv.dims) && NKV >= 1 && NH % NKV == 0 &&
              (!causal || Tk >= Tq),
          "inconsistent attention shapes");
    check(window >= 0 && (window == 0 || causal), "a window must be >= 0, and belongs to causal attention");
    const float* pl = in(lse, count(B, NH, Tq), "lse");
    // A gradient has the layout of its input, so one HeadStrides serves both.
    auto grad = [](py::object g, const Heads& like, const char* name) -> float* {
      if (g.is_none()) return nullptr;
      const Heads hd = heads(g.cast<py::array>(), name, true, 1);
      check(same_layout(hd, like), std::string(name) + " must have the shape and strides of its input");
      return hd.p;
    };
    float *pdq = grad(dq, hq, "dq"), *pdk = grad(dk, hk, "dk"), *pdv = grad(dv, hv, "dv");
    py::gil_scoped_release release;
    kernels().attention_backward(pdq, pdk, pdv, hg.p, hq.p, hk.p, hv.p, ho.p, pl, B, NH, NKV, Tq, Tk, HS, causal,
                                 window, ho.s, hq.s, hk.s, hv.s);
  }, arg("dq"), arg("dk"), arg("dv"), arg("dout"), arg("q"), arg("k"), arg("v"), arg("out"), arg("lse"),
     arg("causal"), arg("window") = 0);
  // probs (B, NH, Tq, Tk) C-contiguous; q and k at their strides, lse from attention_forward.
  m.def("attention_probabilities", [](py::array probs, py::array q, py::array k, py::array lse, bool causal,
                                      int64_t window) {
    const Heads hq = heads(q, "q", false, 1), hk = heads(k, "k", false, 1);
    const int64_t B = hq.dims[0], NH = hq.dims[1], Tq = hq.dims[2], HS = hq.dims[3];
    const int64_t NKV = hk.dims[1], Tk = hk.dims[2];
    check(hk.dims[0] == B && hk.dims[3] == HS && NKV >= 1 && NH % NKV == 0 && (!causal || Tk >= Tq),
          "inconsistent attention shapes");
    check(window >= 0 && (window == 0 || causal), "a window must be >= 0, and belongs to causal attention");
    const float* pl = in(lse, count(B, NH, Tq), "lse");
    float* pp = out(probs, count(B, NH, Tq, Tk), "probs");
    py::gil_scoped_release release;
    kernels().attention_probabilities(pp, hq.p, hk.p, pl, B, NH, NKV, Tq, Tk, HS, causal, window, hq.s, hk.s);
  }, arg("probs"), arg("q"), arg("k"), arg("lse"), arg("causal"), arg("window") = 0);
  m.def("embedding_forward", [](py::array o, py::array idx, py::array w, int64_t N, int64_t V,
                                int64_t C) {
    float* po = out(o, count(N, C), "out");
    const int64_t* pi = ids(idx, count(N), "ids");
    const float* pw = in(w, count(V, C), "weight");
    for (int64_t r = 0; r < N; ++r) check(pi[r] >= 0 && pi[r] < V, "id out of range");
    py::gil_scoped_release release;
    kernels().embedding_forward(po, pi, pw, N, V, C);
  });
  m.def("embedding_backward", [](py::array dw, py::array dout, py::array idx, int64_t N,
                                 int64_t V, int64_t C) {
    float* pdw = out(dw, count(V, C), "dweight");
    const float* pd = in(dout, count(N, C), "dout");
    const int64_t* pi = ids(idx, count(N), "ids");
    for (int64_t r = 0; r < N; ++r) check(pi[r] >= 0 && pi[r] < V, "id out of range");
    py::gil_scoped_release release;
    kernels().embedding_backward(pdw, pd, pi, N, V, C);
  });
  m.def("adamw_update", [](py::array param, py::array mom, py::array var, py::array grad,
                           double lr, double beta1, double beta2, double eps,
                           double weight_decay, double grad_scale, int64_t step) {
    const int64_t n = param.size();
    check(step >= 1, "step counts from 1");
    float *pp = out(param, count(n), "param"), *pm = out(mom, count(n), "m"), *pv = out(var, count(n), "v");
    const float* pg = in(grad, count(n), "grad");
    py::gil_scoped_release release;
    kernels().adamw_update(pp, pm, pv, pg, n, lr, beta1, beta2, eps, weight_decay, grad_scale, step);
  });
  // Bytes per row of K values of a quantized type, after checking the type and that K is whole blocks.
  auto quant_row_bytes = [](int type, int64_t K) {
    const int64_t values = pyllm::quant_block_values(type);   // 0 for a float or unknown type
    check(values > 0, "unsupported quantized type");
    check(K % values == 0, "K must be a multiple of the type's block size");
    return K / values * pyllm::quant_block_bytes(type);
  };
  // packed: the rows are pack_quant's layout (the types that have one), else ggml's.
  auto layout_ok = [](int type, bool packed) { check(!packed || pyllm::packed_type(type), "this type has no packed layout"); };
  m.def("matmul_quant", [quant_row_bytes, layout_ok](py::array o, py::array a, py::array w, int type, int64_t M, int64_t K,
                                                     int64_t N, bool int8_activations, bool packed) {
    layout_ok(type, packed);
    const int64_t row_bytes = quant_row_bytes(type, K);
    float* po = out(o, count(M, N), "out");
    const float* pa = in(a, count(M, K), "a");
    check(py::dtype::of<uint8_t>().is(w.dtype()) && (w.flags() & py::array::c_style) && w.size() >= count(N, row_bytes),
          "w must be a C-contiguous uint8 array of N rows of quantized blocks");
    const uint8_t* pw = static_cast<const uint8_t*>(w.data());
    py::gil_scoped_release release;
    kernels().matmul_quant(po, pa, pw, type, M, K, N, int8_activations, packed);
  });
  m.def("matmul_quant_backward", [quant_row_bytes, layout_ok](py::array dx, py::array dout, py::array w, int type,
                                                              int64_t M, int64_t K, int64_t N, bool packed) {
    layout_ok(type, packed);
    const int64_t row_bytes = quant_row_bytes(type, K);
    float* pdx = out(dx, count(M, K), "dx");
    const float* pdout = in(dout, count(M, N), "dout");
    check(py::dtype::of<uint8_t>().is(w.dtype()) && (w.flags() & py::array::c_style) && w.size() >= count(N, row_bytes),
          "w must be a C-contiguous uint8 array of N rows of quantized blocks");
    const uint8_t* pw = static_cast<const uint8_t*>(w.data());
    py::gil_scoped_release release;
    kernels().matmul_quant_backward(pdx, pdout, pw, type, M, K, N, packed);
  });
  m.def("pack_quant", [quant_row_bytes](py::array o, py::array w, int type, int64_t rows, int64_t K) {
    check(pyllm::packed_type(type), "this quantized type has no packed layout");
    const int64_t row_bytes = quant_row_bytes(type, K);
    check(py::dtype::of<uint8_t>().is(o.dtype()) && (o.flags() & py::array::c_style) && o.writeable() &&
              o.size() >= count(rows, row_bytes),
          "out must be a writeable C-contiguous uint8 array of the rows' size");
    check(py::dtype::of<uint8_t>().is(w.dtype()) && (w.flags() & py::array::c_style) && w.size() >= count(rows, row_bytes),
          "w must be a C-contiguous uint8 array of quantized rows");
    uint8_t* po = static_cast<uint8_t*>(o.mutable_data());
    const uint8_t* pw = static_cast<const uint8_t*>(w.data());
    py::gil_scoped_release release;
    kernels().pack_quant(po, pw, type, rows, K);
  });
  // outs, ws: lists of the parts' output arrays (M, N_p) and packed weights (N_p rows).
  m.def("matmul_rows", [quant_row_bytes, layout_ok](py::list outs, py::array a, py::list ws, int type, int64_t M,
                                                    int64_t K) {
    layout_ok(type, true);
    const int64_t row_bytes = quant_row_bytes(type, K);
    check(outs.size() == ws.size() && !ws.empty(), "one output per weight matrix");
    const float* pa = in(a, count(M, K), "a");
    std::vector<float*> po;
    std::vector<const uint8_t*> pw;
    std::vector<int64_t> Ns;
    for (size_t p = 0; p < ws.size(); ++p) {
      py::array w = ws[p].cast<py::array>(), o = outs[p].cast<py::array>();
      check(py::dtype::of<uint8_t>().is(w.dtype()) && (w.flags() & py::array::c_style) && w.ndim() == 2 &&
                w.shape(1) == row_bytes,
            "each weight must be a C-contiguous uint8 (N, row bytes) array of packed rows");
      Ns.push_back(w.shape(0));
      po.push_back(out(o, count(M, w.shape(0)), "out"));
      pw.push_back(static_cast<const uint8_t*>(w.data()));
    }
    py::gil_scoped_release release;
    kernels().matmul_rows(po.data(), pw.data(), Ns.data(), int64_t(Ns.size()), pa, type, M, K);
  });
  m.def("quantize_rows", [quant_row_bytes](py::array o, py::array x, int type, int64_t rows, int64_t K) {
    check(pyllm::formats::can_quantize(type), "pyllm quantizes to Q4_0, Q4_1, Q8_0 and Q4_K");
    const int64_t row_bytes = quant_row_bytes(type, K);
    check(py::dtype::of<uint8_t>().is(o.dtype()) && (o.flags() & py::array::c_style) && o.writeable() &&
              o.size() >= count(rows, row_bytes),
          "out must be a writeable C-contiguous uint8 array of the rows' size");
    const float* px = in(x, count(rows, K), "x");
    uint8_t* po = static_cast<uint8_t*>(o.mutable_data());
    py::gil_scoped_release release;
    pyllm::formats::quantize_rows(po, px, type, rows, K);
  });
  m.def("dequantize_rows", [quant_row_bytes, layout_ok](py::array o, py::array w, int type, int64_t rows, int64_t K,
                                                        bool packed) {
    layout_ok(type, packed);
    const int64_t row_bytes = quant_row_bytes(type, K);
    float* po = out(o, count(rows, K), "out");
    check(py::dtype::of<uint8_t>().is(w.dtype()) && (w.flags() & py::array::c_style) && w.size() >= count(rows, row_bytes),
          "w must be a C-contiguous uint8 array of quantized rows");
    const uint8_t* pw = static_cast<const uint8_t*>(w.data());
    py::gil_scoped_release release;
    kernels().dequantize_rows(po, pw, type, rows, K, packed);
  });
  m.def("embed_quant", [quant_row_bytes, layout_ok](py::array o, py::array w, int type, int64_t N, int64_t K,
                                                    py::array idx, int64_t n, bool packed) {
    layout_ok(type, packed);
    const int64_t row_bytes = quant_row_bytes(type, K);
    float* po = out(o, count(n, K), "out");
    check(py::dtype::of<uint8_t>().is(w.dtype()) && (w.flags() & py::array::c_style) && w.size() >= count(N, row_bytes),
          "w must be a C-contiguous uint8 array of N quantized rows");
    const int64_t* pi = ids(idx, count(n), "ids");
    for (int64_t r = 0; r < n; ++r) check(pi[r] >= 0 && pi[r] < N, "id out of range");
    const uint8_t* pw = static_cast<const uint8_t*>(w.data());
    py::gil_scoped_release release;
    kernels().embed_quant(po, pw, type, N, K, pi, n, packed);
  });
  m.def("fma_peak_gflops", [](double seconds) {
    py::gil_scoped_release release;
    return kernels().fma_peak_gflops(seconds);
  }, arg("seconds") = 0.5);
  m.def("read_bandwidth_gbps", [](double seconds) {
    py::gil_scoped_release release;
    return kernels().read_bandwidth_gbps(seconds);
  }, arg("seconds") = 0.5);
}
