// Pointwise activations: GELU (tanh form), SiLU, SwiGLU and GeGLU, forward and backward.
// Not fused with matmuls here; each is one pass over memory, split into W-aligned chunks.
#include "kernels/isa.h"
#include "threads.h"

namespace pyllm {
namespace PYLLM_ISA {
namespace {

constexpr int64_t kGrain = 1 << 14;  // elements per work item (a multiple of every W)

// Applies f to aligned vector chunks of [0, n); the tail is one partial vector through the
// same f, so every element gets the same arithmetic whatever the thread split.
template <class F>
void for_each_vector(int64_t n, F&& f) {
  parallel_for((n + kGrain - 1) / kGrain, 1, [&](int64_t c0, int64_t c1) {
    const int64_t end = imin(n, c1 * kGrain);
    for (int64_t i = c0 * kGrain; i < end; i += W) f(i, imin(W, end - i));
  });
}

constexpr float kGeluScale = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kGeluCubic = 0.044715f;

// 0.5 * (1 + tanh(u)) is sigmoid(2u): one exp, no overflow for large |x|.
inline vf gelu_gate(vf x) { return vsigmoid(2.0f * kGeluScale * (x + kGeluCubic * x * x * x)); }

// Each activation and its derivative, for the plain and the gated (act(gate) * up) kernels.
inline vf gelu_of(vf x) { return x * gelu_gate(x); }
inline vf gelu_grad(vf x) {
  const vf s = gelu_gate(x);  // s = 0.5 (1 + tanh u), so 1 - tanh^2 u = 4 s (1 - s)
  const vf du = kGeluScale * (1.0f + 3.0f * kGeluCubic * x * x);
  return s + x * (2.0f * s * (1.0f - s)) * du;
}
inline vf silu_of(vf x) { return x * vsigmoid(x); }
inline vf silu_grad(vf x) {
  const vf s = vsigmoid(x);
  return s * (1.0f + x * (1.0f - s));
}

template <vf (*Act)(vf)>
void unary_forward(float* out, const float* inp, int64_t n) {
  for_each_vector(n, [&](int64_t i, int64_t k) { store_partial(out + i, Act(load_partial(inp + i, k)), k); });
}

template <vf (*Grad)(vf)>
void unary_backward(float* dinp, const float* dout, const float* inp, int64_t n) {
  for_each_vector(n, [&](int64_t i, int64_t k) {
    store_partial(dinp + i, load_partial(dout + i, k) * Grad(load_partial(inp + i, k)), k);
  });
}

template <vf (*Act)(vf)>
void gated_forward(float* out, const float* gate, const float* up, int64_t n) {
  for_each_vector(n, [&](int64_t i, int64_t k) {
    store_partial(out + i, Act(load_partial(gate + i, k)) * load_partial(up + i, k), k);
  });
}

template <vf (*Act)(vf), vf (*Grad)(vf)>
void gated_backward(float* dgate, float* dup, const float* dout, const float* gate, const float* up, int64_t n) {
  for_each_vector(n, [&](int64_t i, int64_t k) {
    const vf g = load_partial(gate + i, k), dy = load_partial(dout + i, k);
    store_partial(dgate + i, dy * load_partial(up + i, k) * Grad(g), k);
    store_partial(dup + i, dy * Act(g), k);
  });
}

}  // namespace

void gelu_forward(float* out, const float* inp, int64_t n) { unary_forward<gelu_of>(out, inp, n); }
void gelu_backward(float* dinp, const float* dout, const float* inp, int64_t n) {
  unary_backward<gelu_grad>(dinp, dout, inp, n);
}
void silu_forward(float* out, const float* inp, int64_t n) { unary_forward<silu_of>(out, inp, n); }
void silu_backward(float* dinp, const float* dout, const float* inp, int64_t n) {
  unary_backward<silu_grad>(dinp, dout, inp, n);
}
void swiglu_forward(float* out, const float* gate, const float* up, int64_t n) {
  gated_forward<silu_of>(out, gate, up, n);
}
void swiglu_backward(float* dgate, float* dup, const float* dout, const float* gate, const float* up, int64_t n) {
  gated_backward<silu_of, silu_grad>(dgate, dup, dout, gate, up, n);
}
void geglu_forward(float* out, const float* gate, const float* up, int64_t n) {
  gated_forward<gelu_of>(out, gate, up, n);
}
void geglu_backward(float* dgate, float* dup, const float* dout, const float* gate, const float* up, int64_t n) {
  gated_backward<gelu_of, gelu_grad>(dgate, dup, dout, gate, up, n);
}

}  // namespace PYLLM_ISA
}  // namespace pyllm
