// LayerNorm (GPT-2) and RMSNorm (Llama) over the last axis C, forward and backward.
// Not fused with the residual add or the following matmul: that is the model's business.
#include "kernels/isa.h"
#include "threads.h"

namespace pyllm {
namespace PYLLM_ISA {
namespace {

float row_sum(const float* x, int64_t C) {
  vf s = splat(0.f);
  int64_t j = 0;
  for (; j + W <= C; j += W) s += load(x + j);
  if (j < C) s += load_partial(x + j, C - j);
  return hsum(s);
}

float row_sum_sq_dev(const float* x, int64_t C, float mean) {
  vf s = splat(0.f);
  const vf mu = splat(mean);
  int64_t j = 0;
  for (; j + W <= C; j += W) {
    const vf d = load(x + j) - mu;
    s += d * d;
  }
  if (j < C) {
    vf d = load_partial(x + j, C - j) - mu;
    for (int64_t t = C - j; t < W; ++t) d[t] = 0.f;
    s += d * d;
  }
  return hsum(s);
}

// The weight gradients sum over every row. To keep that sum independent of the thread count,
// rows are cut into fixed chunks; each chunk sums into its own partial row, and the partials
// are then added in chunk order.
constexpr int64_t kRowsPerChunk = 32;

template <class ChunkFn>
void reduce_rows_in_chunks(int64_t N, int64_t C, int n_outputs, float* const* outputs,
                           ChunkFn&& chunk_fn) {
  const int64_t chunks = (N + kRowsPerChunk - 1) / kRowsPerChunk;
  Scratch partial(size_t(chunks) * n_outputs * C);
  float* p = partial.data();
  parallel_for(chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      float* mine = p + c * n_outputs * C;
      for (int64_t j = 0; j < n_outputs * C; ++j) mine[j] = 0.f;
      chunk_fn(c * kRowsPerChunk, imin(N, (c + 1) * kRowsPerChunk), mine);
    }
  });
  parallel_for(C, 256, [&](int64_t j0, int64_t j1) {
    for (int o = 0; o < n_outputs; ++o) {
      if (!outputs[o]) continue;
      for (int64_t c = 0; c < chunks; ++c) {
        const float* src = p + (c * n_outputs + o) * C;
        for (int64_t j = j0; j < j1; ++j) outputs[o][j] += src[j];
      }
    }
  });
}

int64_t row_grain(int64_t C) { return imax(1, 8192 / imax(1, C)); }

}  // namespace

void layernorm_forward(float* out, float* mean, float* rstd, const float* inp, const float* w,
                       const float* b, int64_t N, int64_t C, float eps) {
  parallel_for(N, row_grain(C), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* x = inp + r * C;
      float* y = out + r * C;
      const float m = row_sum(x, C) / C;                       // two passes: the variance of
      const float s = 1.0f / __builtin_sqrtf(row_sum_sq_dev(x, C, m) / C + eps);  // x - mean
      mean[r] = m;                                             // does not cancel like E[x^2]-m^2
      rstd[r] = s;
      const vf mu = splat(m), sv = splat(s);
      int64_t j = 0;
      for (; j + W <= C; j += W) store(y + j, (load(x + j) - mu) * sv * load(w + j) + load(b + j));
      if (j < C) {
        const int64_t n = C - j;
        store_partial(y + j, (load_partial(x + j, n) - mu) * sv * load_partial(w + j, n) + load_partial(b + j, n), n);
      }
    }
  });
}

void layernorm_backward(float* dinp, float* dw, float* db, const float* dout, const float* inp,
                        const float* w, const float* mean, const float* rstd, int64_t N,
                        int64_t C) {
  float* outputs[2] = {dw, db};
  reduce_rows_in_chunks(N, C, 2, outputs, [&](int64_t r0, int64_t r1, float* partial) {
    float* pdw = partial;
    float* pdb = partial + C;
    for (int64_t r = r0; r < r1; ++r) {
      const float *x = inp + r * C, *dy = dout + r * C;
      const vf mu = splat(mean[r]), sv = splat(rstd[r]);
      // dx = rstd * (dnorm - mean(dnorm) - norm * mean(dnorm * norm)), dnorm = dy * w
      vf sum_dn = splat(0.f), sum_dn_n = splat(0.f);
      int64_t j = 0;
      for (; j < C; j += W) {
        const int64_t n = imin(W, C - j);
        const vf xv = n == W ? load(x + j) : load_partial(x + j, n);
        const vf dyv = n == W ? load(dy + j) : load_partial(dy + j, n);
        const vf wv = n == W ? load(w + j) : load_partial(w + j, n);
        vf norm = (xv - mu) * sv;
        if (n < W) for (int64_t t = n; t < W; ++t) norm[t] = 0.f;
        const vf dn = dyv * wv;
        sum_dn += dn;
        sum_dn_n += dn * norm;
        store_partial(pdw + j, load_partial(pdw + j, n) + dyv * norm, n);
        store_partial(pdb + j, load_partial(pdb + j, n) + dyv, n);
      }
      const vf mean_dn = splat(hsum(sum_dn) / C), mean_dn_n = splat(hsum(sum_dn_n) / C);
      if (!dinp) continue;
      float* dx = dinp + r * C;
      for (j = 0; j < C; j += W) {
        const int64_t n = imin(W, C - j);
        const vf norm = (load_partial(x + j, n) - mu) * sv;
        const vf dn = load_partial(dy + j, n) * load_partial(w + j, n);
        store_partial(dx + j, sv * (dn - mean_dn - norm * mean_dn_n), n);
      }
    }
  });
}

void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* w, int64_t N,
                     int64_t C, float eps) {
  parallel_for(N, row_grain(C), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* x = inp + r * C;
      float* y = out + r * C;
      const float s = 1.0f / __builtin_sqrtf(row_sum_sq_dev(x, C, 0.f) / C + eps);
      rstd[r] = s;
      const vf sv = splat(s);
      for (int64_t j = 0; j < C; j += W) {
        const int64_t n = imin(W, C - j);
        store_partial(y + j, load_partial(x + j, n) * sv * load_partial(w + j, n), n);
      }
    }
  });
}

void rmsnorm_backward(float* dinp, float* dw, const float* dout, const float* inp, const float* w,
                      const float* rstd, int64_t N, int64_t C) {
  float* outputs[1] = {dw};
  reduce_rows_in_chunks(N, C, 1, outputs, [&](int64_t r0, int64_t r1, float* pdw) {
    for (int64_t r = r0; r < r1; ++r) {
      const float *x = inp + r * C, *dy = dout + r * C;
      const vf sv = splat(rstd[r]);
      // dx = rstd * (dnorm - norm * mean(dnorm * norm)), dnorm = dy * w
      vf sum_dn_n = splat(0.f);
      for (int64_t j = 0; j < C; j += W) {
        const int64_t n = imin(W, C - j);
        const vf norm = load_partial(x + j, n) * sv, dyv = load_partial(dy + j, n);
        sum_dn_n += dyv * load_partial(w + j, n) * norm;
        store_partial(pdw + j, load_partial(pdw + j, n) + dyv * norm, n);
      }
      if (!dinp) continue;
      const vf mean_dn_n = splat(hsum(sum_dn_n) / C);
      float* dx = dinp + r * C;
      for (int64_t j = 0; j < C; j += W) {
        const int64_t n = imin(W, C - j);
        const vf norm = load_partial(x + j, n) * sv;
        const vf dn = load_partial(dy + j, n) * load_partial(w + j, n);
        store_partial(dx + j, sv * (dn - norm * mean_dn_n), n);
      }
    }
  });
}

}  // namespace PYLLM_ISA
}  // namespace pyllm
