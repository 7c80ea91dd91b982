// Row softmax and cross-entropy fused with its softmax, forward and backward.
// Not the attention softmax: attention.cpp keeps its own online softmax inside its tiles.
#include "kernels/isa.h"
#include "threads.h"

namespace pyllm {
namespace PYLLM_ISA {
namespace {

float row_max(const float* x, int64_t C) {
  vf m = splat(-__builtin_inff());
  int64_t j = 0;
  for (; j + W <= C; j += W) m = vmax(m, load(x + j));
  float r = hmax(m);
  for (; j < C; ++j) r = x[j] > r ? x[j] : r;
  return r;
}

// sum_j exp(x_j - shift); the max is subtracted first so exp never overflows.
float row_sum_exp(const float* x, int64_t C, float shift) {
  vf s = splat(0.f);
  const vf sh = splat(shift);
  int64_t j = 0;
  for (; j + W <= C; j += W) s += vexp(load(x + j) - sh);
  if (j < C) {
    const vf e = vexp(load_partial(x + j, C - j) - sh);
    for (int64_t t = 0; t < C - j; ++t) s[t] += e[t];
  }
  return hsum(s);
}

// Rows per work item: enough work to amortise scheduling, small enough to balance.
int64_t row_grain(int64_t C) { return imax(1, 16384 / imax(1, C)); }

}  // namespace

void softmax_forward(float* out, const float* inp, int64_t N, int64_t C) {
  parallel_for(N, row_grain(C), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* x = inp + r * C;
      float* y = out + r * C;
      const float m = row_max(x, C);
      const vf sh = splat(m);
      vf s = splat(0.f);
      int64_t j = 0;
      for (; j + W <= C; j += W) {
        const vf e = vexp(load(x + j) - sh);
        store(y + j, e);
        s += e;
      }
      if (j < C) {
        vf e = vexp(load_partial(x + j, C - j) - sh);
        store_partial(y + j, e, C - j);
        for (int64_t t = C - j; t < W; ++t) e[t] = 0.f;
        s += e;
      }
      const vf inv = splat(1.0f / hsum(s));
      for (j = 0; j + W <= C; j += W) store(y + j, load(y + j) * inv);
      if (j < C) store_partial(y + j, load_partial(y + j, C - j) * inv, C - j);
    }
  });
}

void softmax_backward(float* dinp, const float* dout, const float* out, int64_t N, int64_t C) {
  parallel_for(N, row_grain(C), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float *dy = dout + r * C, *y = out + r * C;
      float* dx = dinp + r * C;
      vf acc = splat(0.f);
      int64_t j = 0;
      for (; j + W <= C; j += W) acc += load(dy + j) * load(y + j);
      if (j < C) acc += load_partial(dy + j, C - j) * load_partial(y + j, C - j);
      const vf dot = splat(hsum(acc));
      for (j = 0; j + W <= C; j += W)
        store(dx + j, load(y + j) * (load(dy + j) - dot));
      if (j < C) {
        const int64_t n = C - j;
        store_partial(dx + j, load_partial(y + j, n) * (load_partial(dy + j, n) - dot), n);
      }
    }
  });
}

void cross_entropy_forward(float* losses, float* lse, const float* logits, const int64_t* targets,
                           int64_t N, int64_t V, int64_t ignore_index) {
  parallel_for(N, row_grain(V), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* x = logits + r * V;
      const float m = row_max(x, V);
      lse[r] = m + __builtin_logf(row_sum_exp(x, V, m));
      losses[r] = targets[r] == ignore_index ? 0.f : lse[r] - x[targets[r]];
    }
  });
}

void cross_entropy_backward(float* dlogits, const float* logits, const float* lse,
                            const int64_t* targets, float scale, int64_t N, int64_t V,
                            int64_t ignore_index) {
  parallel_for(N, row_grain(V), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* x = logits + r * V;
      float* d = dlogits + r * V;  // may be x itself: each element is read before it is written
      const int64_t t = targets[r];
      if (t == ignore_index) {
        for (int64_t j = 0; j < V; ++j) d[j] = 0.f;
        continue;
      }
      const vf sh = splat(lse[r]), sc = splat(scale);
      int64_t j = 0;
      for (; j + W <= V; j += W) store(d + j, vexp(load(x + j) - sh) * sc);
      if (j < V) store_partial(d + j, vexp(load_partial(x + j, V - j) - sh) * sc, V - j);
      d[t] -= scale;
    }
  });
}

}  // namespace PYLLM_ISA
}  // namespace pyllm
