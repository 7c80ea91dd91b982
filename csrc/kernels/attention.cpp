// Fused causal multi-head attention, flash-attention style: scores, mask, online softmax and the
// weighted sum of values in BQ x BK tiles, so no T x T matrix is ever held. Grouped-query heads
// (NKV < NH) and a query block that sits at the end of a longer key sequence (KV cache) included.
// Not a general sparse/masked attention: the only masks are none and causal.
//
// The tile products are small GEMMs on strided views (gemm_serial), so the register-blocked
// micro-kernel of matmul.cpp does the arithmetic here too.
#include <cmath>
#include <cstring>

#include "kernels/isa.h"
#include "threads.h"

namespace pyllm {
namespace PYLLM_ISA {
namespace {

constexpr int64_t BQ = 64;   // query rows per tile
constexpr int64_t BK = 64;   // keys per tile

thread_local ThreadBuffer scores_buffer, dscores_buffer, rowstat_buffer;

struct Shape {
  int64_t B, NH, NKV, Tq, Tk, HS;
  bool causal;
  int64_t group() const { return NH / NKV; }
  int64_t offset() const { return Tk - Tq; }  // query i sits at absolute position i + offset
  int64_t q_blocks() const { return (Tq + BQ - 1) / BQ; }
  int64_t k_blocks() const { return (Tk + BK - 1) / BK; }
  // Keys [0, key_end) can be seen by some query in rows [i0, i1).
  int64_t key_end(int64_t i1) const { return causal ? imin(Tk, i1 + offset()) : Tk; }
  // Number of keys of the block starting at j0 (of nk) that query row i sees.
  int64_t visible(int64_t i, int64_t j0, int64_t nk) const {
    return causal ? imax(0, imin(nk, i + offset() + 1 - j0)) : nk;
  }
};

// P (nq x nk, row stride BK) = exp(scale * S - lse) with masked entries 0: the probabilities
// recomputed in backward from the saved log-sum-exp.
void probabilities(float* P, const float* lse, const Shape& s, int64_t i0, int64_t nq, int64_t j0,
                   int64_t nk, float scale) {
  for (int64_t r = 0; r < nq; ++r) {
    float* p = P + r * BK;
    const int64_t n = s.visible(i0 + r, j0, nk);
    const vf sc = splat(scale), sh = splat(lse[r]);
    int64_t j = 0;
    for (; j < n; j += W) store(p + j, vexp(load(p + j) * sc - sh));  // BK is a multiple of W
    for (j = n; j < nk; ++j) p[j] = 0.f;
  }
}

// dS = P * (dP - D) * scale, in place of dP (nq x nk, row stride BK).
void score_gradients(float* dP, const float* P, const float* D, int64_t nq, int64_t nk, float scale) {
  for (int64_t r = 0; r < nq; ++r) {
    const vf d = splat(D[r]);
    for (int64_t j = 0; j < nk; j += W)
      store(dP + r * BK + j, load(P + r * BK + j) * (load(dP + r * BK + j) - d) * scale);
  }
}

}  // namespace

void attention_forward(float* out, float* lse, const float* q, const float* k, const float* v,
                       int64_t B, int64_t NH, int64_t NKV, int64_t Tq, int64_t Tk, int64_t HS,
                       bool causal) {
  const Shape s{B, NH, NKV, Tq, Tk, HS, causal};
  const float scale = 1.0f / std::sqrt(float(HS));
  parallel_for(B * NH * s.q_blocks(), 1, [&](int64_t u0, int64_t u1) {
    float* S = scores_buffer.get(BQ * BK);
    float* stats = rowstat_buffer.get(2 * BQ);
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t bh = u / s.q_blocks(), i0 = (u % s.q_blocks()) * BQ;
      const int64_t nq = imin(BQ, Tq - i0);
      const int64_t bkv = (bh / NH) * NKV + (bh % NH) / s.group();
      const float* qb = q + (bh * Tq + i0) * HS;
      const float* kh = k + bkv * Tk * HS;
      const float* vh = v + bkv * Tk * HS;
      float* O = out + (bh * Tq + i0) * HS;  // accumulates un-normalised, divided by l at the end
      float *m = stats, *l = stats + BQ;
      for (int64_t r = 0; r < nq; ++r) m[r] = -INFINITY, l[r] = 0.f;
      std::memset(O, 0, sizeof(float) * nq * HS);
      const int64_t key_end = s.key_end(i0 + nq);
      for (int64_t j0 = 0; j0 < key_end; j0 += BK) {
        const int64_t nk = imin(BK, key_end - j0);
        // S = Q K^T: K^T is K's rows read as columns.
        gemm_serial(nq, nk, HS, MatView{qb, HS, 1}, MatView{kh + j0 * HS, 1, HS}, S, BK, false);
        // Online softmax: fold this block into the running max m and sum l of each row,
        // rescaling what O already holds by exp(m_old - m_new).
        for (int64_t r = 0; r < nq; ++r) {
          float* p = S + r * BK;
          const int64_t n = s.visible(i0 + r, j0, nk);
          float block_max = -INFINITY;
          for (int64_t j = 0; j < n; ++j) block_max = std::fmax(block_max, p[j] * scale);
          const float m_new = std::fmax(m[r], block_max);
          if (n == 0 || m_new == -INFINITY) {
            for (int64_t j = 0; j < nk; ++j) p[j] = 0.f;
            continue;
          }
          const float alpha = std::exp(m[r] - m_new);
          const vf sc = splat(scale), sh = splat(m_new);
          vf sum = splat(0.f);
          int64_t j = 0;
          for (; j + W <= n; j += W) {
            const vf e = vexp(load(p + j) * sc - sh);
            store(p + j, e);
            sum += e;
          }
          if (j < n) {
            vf e = vexp(load(p + j) * sc - sh);
            for (int64_t t = n - j; t < W; ++t) e[t] = 0.f;
            store(p + j, e);
            sum += e;
          }
          for (j = n; j < nk; ++j) p[j] = 0.f;
          l[r] = l[r] * alpha + hsum(sum);
          m[r] = m_new;
          if (alpha != 1.0f)
            for (int64_t d = 0; d < HS; ++d) O[r * HS + d] *= alpha;
        }
        // O += P V
        gemm_serial(nq, HS, nk, MatView{S, BK, 1}, MatView{vh + j0 * HS, HS, 1}, O, HS, true);
      }
      float* lse_b = lse + bh * Tq + i0;
      for (int64_t r = 0; r < nq; ++r) {
        const float inv = 1.0f / l[r];
        for (int64_t d = 0; d < HS; ++d) O[r * HS + d] *= inv;
        lse_b[r] = m[r] + std::log(l[r]);
      }
    }
  });
}

void attention_backward(float* dq, float* dk, float* dv, const float* dout, const float* q,
                        const float* k, const float* v, const float* out, const float* lse,
                        int64_t B, int64_t NH, int64_t NKV, int64_t Tq, int64_t Tk, int64_t HS,
                        bool causal) {
  const Shape s{B, NH, NKV, Tq, Tk, HS, causal};
  const float scale = 1.0f / std::sqrt(float(HS));
  // D[i] = dout[i] . out[i], the softmax-backward term shared by every key of row i.
  Scratch Dbuf(size_t(B * NH * Tq));
  float* D = Dbuf.data();
  parallel_for(B * NH * Tq, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      vf acc = splat(0.f);
      for (int64_t d = 0; d < HS; d += W) {
        const int64_t n = imin(W, HS - d);
        acc += load_partial(dout + r * HS + d, n) * load_partial(out + r * HS + d, n);
      }
      D[r] = hsum(acc);
    }
  });

  // Pass 1, dq: each work item owns a block of query rows of one head.
  if (dq) {
    parallel_for(B * NH * s.q_blocks(), 1, [&](int64_t u0, int64_t u1) {
      float* P = scores_buffer.get(BQ * BK);
      float* dP = dscores_buffer.get(BQ * BK);
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t bh = u / s.q_blocks(), i0 = (u % s.q_blocks()) * BQ;
        const int64_t nq = imin(BQ, Tq - i0);
        const int64_t bkv = (bh / NH) * NKV + (bh % NH) / s.group();
        const int64_t row = bh * Tq + i0;
        const float *kh = k + bkv * Tk * HS, *vh = v + bkv * Tk * HS;
        const int64_t key_end = s.key_end(i0 + nq);
        std::memset(dq + row * HS, 0, sizeof(float) * nq * HS);
        for (int64_t j0 = 0; j0 < key_end; j0 += BK) {
          const int64_t nk = imin(BK, key_end - j0);
          gemm_serial(nq, nk, HS, MatView{q + row * HS, HS, 1}, MatView{kh + j0 * HS, 1, HS}, P, BK, false);
          probabilities(P, lse + row, s, i0, nq, j0, nk, scale);
          gemm_serial(nq, nk, HS, MatView{dout + row * HS, HS, 1}, MatView{vh + j0 * HS, 1, HS}, dP, BK, false);
          score_gradients(dP, P, D + row, nq, nk, scale);
          gemm_serial(nq, HS, nk, MatView{dP, BK, 1}, MatView{kh + j0 * HS, HS, 1}, dq + row * HS, HS, true);
        }
      }
    });
  }

  // Pass 2, dk and dv: each work item owns a block of keys of one key/value head and sums over
  // every query head of its group and every query block that sees it, in a fixed order.
  if (dk || dv) {
    parallel_for(B * NKV * s.k_blocks(), 1, [&](int64_t u0, int64_t u1) {
      float* P = scores_buffer.get(BQ * BK);
      float* dP = dscores_buffer.get(BQ * BK);
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t bkv = u / s.k_blocks(), j0 = (u % s.k_blocks()) * BK;
        const int64_t nk = imin(BK, Tk - j0);
        const float *kb = k + (bkv * Tk + j0) * HS, *vb = v + (bkv * Tk + j0) * HS;
        const int64_t first_row = causal ? imax(0, j0 - s.offset()) : 0;
        if (dk) std::memset(dk + (bkv * Tk + j0) * HS, 0, sizeof(float) * nk * HS);
        if (dv) std::memset(dv + (bkv * Tk + j0) * HS, 0, sizeof(float) * nk * HS);
        for (int64_t hg = 0; hg < s.group(); ++hg) {
          const int64_t bh = (bkv / NKV) * NH + (bkv % NKV) * s.group() + hg;
          for (int64_t i0 = (first_row / BQ) * BQ; i0 < Tq; i0 += BQ) {
            const int64_t nq = imin(BQ, Tq - i0), row = bh * Tq + i0;
            gemm_serial(nq, nk, HS, MatView{q + row * HS, HS, 1}, MatView{kb, 1, HS}, P, BK, false);
            probabilities(P, lse + row, s, i0, nq, j0, nk, scale);
            if (dv)  // dv += P^T dout
              gemm_serial(nk, HS, nq, MatView{P, 1, BK}, MatView{dout + row * HS, HS, 1}, dv + (bkv * Tk + j0) * HS, HS, true);
            if (!dk) continue;
            gemm_serial(nq, nk, HS, MatView{dout + row * HS, HS, 1}, MatView{vb, 1, HS}, dP, BK, false);
            score_gradients(dP, P, D + row, nq, nk, scale);
            // dk += dS^T q
            gemm_serial(nk, HS, nq, MatView{dP, 1, BK}, MatView{q + row * HS, HS, 1}, dk + (bkv * Tk + j0) * HS, HS, true);
          }
        }
      }
    });
  }
}

}  // namespace PYLLM_ISA
}  // namespace pyllm
