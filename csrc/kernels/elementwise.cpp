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

}  // namespace

void gelu_forward(float* out, const float* inp, int64_t n) {
  for_each_vector(n, [&](int64_t i, int64_t k) {
    const vf x = load_partial(inp + i, k);
    store_partial(out + i, x * gelu_gate(x), k);
  });
}

void gelu_backward(float* dinp, const float* dout, const float* inp, int64_t n) {
  for_each_vector(n, [&](int64_t i, int64_t k) {
    const vf x = load_partial(inp + i, k);
    const vf s = gelu_gate(x);  // s = 0.5 (1 + tanh u), so 1 - tanh^2 u = 4 s (1 - s)
    const vf du = kGeluScale * (1.0f + 3.0f * kGeluCubic * x * x);
    const vf grad = s + x * (2.0f * s * (1.0f - s)) * du;
    store_partial(dinp + i, load_partial(dout + i, k) * grad, k);
  });
}

void silu_forward(float* out, const float* inp, int64_t n) {
  for_each_vector(n, [&](int64_t i, int64_t k) {
    const vf x = load_partial(inp + i, k);
    store_partial(out + i, x * vsigmoid(x), k);
  });
}

void silu_backward(float* dinp, const float* dout, const float* inp, int64_t n) {
  for_each_vector(n, [&](int64_t i, int64_t k) {
    const vf x = load_partial(inp + i, k);
    const vf s = vsigmoid(x);
    const vf grad = s * (1.0f + x * (1.0f - s));
    store_partial(dinp + i, load_partial(dout + i, k) * grad, k);
  });
}

void swiglu_forward(float* out, const float* gate, const float* up, int64_t n) {
  for_each_vector(n, [&](int64_t i, int64_t k) {
    const vf g = load_partial(gate + i, k);
    store_partial(out + i, g * vsigmoid(g) * load_partial(up + i, k), k);
  });
}

void swiglu_backward(float* dgate, float* dup, const float* dout, const float* gate,
                     const float* up, int64_t n) {
  for_each_vector(n, [&](int64_t i, int64_t k) {
    const vf g = load_partial(gate + i, k), u = load_partial(up + i, k);
    const vf dy = load_partial(dout + i, k);
    const vf s = vsigmoid(g);
    store_partial(dgate + i, dy * u * s * (1.0f + g * (1.0f - s)), k);
    store_partial(dup + i, dy * g * s, k);
  });
}

void geglu_forward(float* out, const float* gate, const float* up, int64_t n) {
  for_each_vector(n, [&](int64_t i, int64_t k) {
    const vf g = load_partial(gate + i, k);
    store_partial(out + i, g * gelu_gate(g) * load_partial(up + i, k), k);
  });
}

void geglu_backward(float* dgate, float* dup, const float* dout, const float* gate,
                    const float* up, int64_t n) {
  for_each_vector(n, [&](int64_t i, int64_t k) {
    const vf g = load_partial(gate + i, k), u = load_partial(up + i, k);
    const vf dy = load_partial(dout + i, k);
    const vf s = gelu_gate(g);
    const vf du = kGeluScale * (1.0f + 3.0f * kGeluCubic * g * g);
    store_partial(dgate + i, dy * u * (s + g * (2.0f * s * (1.0f - s)) * du), k);
    store_partial(dup + i, dy * g * s, k);
  });
}

}  // namespace PYLLM_ISA
}  // namespace pyllm
