// Fused causal multi-head attention, flash-attention style: scores, mask, online softmax and the
// weighted sum of values in BQ x BK tiles, so no T x T matrix is ever held. Grouped-query heads
// (NKV < NH) and a query block that sits at the end of a longer key sequence (KV cache) included.
// Every tensor is read and written at its own HeadStrides, so q, k and v can be the column blocks
// of a fused qkv projection and out the input of the output projection: no head is ever copied.
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

// Tile sizes are multiples of the GEMM micro-kernel's rows (6 AVX2, 14 AVX-512, 4 SSE), so the
// tile products (query rows for S and dq, key rows for dk and dv) have no partial micro-tiles;
// BK (64) is a multiple of every W, since score rows are processed in whole vectors; 48 (a
// multiple of 6 as well) measured slower than the partial micro-tile it saves.
constexpr int64_t BQ = W == 16 ? 56 : (W == 8 ? 60 : 64);
constexpr int64_t BK = 64;

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

// Decoding (one or a few queries per head): the tile products as plain dot products and scaled
// adds straight from K and V, since packing a 64-key tile for one query row costs more than the
// arithmetic.
constexpr int64_t kFewQueries = 2;

// Decoding reads the whole KV cache from memory once per step; the hardware prefetcher alone
// leaves the loads waiting, so keys and values a few rows ahead are requested explicitly (a
// prefetch past the end of the cache is harmless: it never faults).
constexpr int64_t kPrefetchKeys = 8;

inline void prefetch_rows(const float* p, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) __builtin_prefetch(p + i, 0, 3);
}

// S (nq x nk, row stride BK) = q k^T for nq query rows (row stride qs) and nk key rows (ks).
void few_query_scores(float* S, const float* q, int64_t qs, const float* k, int64_t ks, int64_t nq,
                      int64_t nk, int64_t HS) {
  for (int64_t r = 0; r < nq; ++r) {
    const float* x = q + r * qs;
    int64_t j = 0;
    for (; j + 4 <= nk; j += 4) {   // four keys at a time: four independent sums in flight
      const float *y0 = k + j * ks, *y1 = y0 + ks, *y2 = y1 + ks, *y3 = y2 + ks;
      for (int64_t a = 0; a < 4; ++a) prefetch_rows(y0 + (kPrefetchKeys + a) * ks, HS);
      vf a0 = splat(0.f), a1 = a0, a2 = a0, a3 = a0;
      int64_t d = 0;
      for (; d + W <= HS; d += W) {
        const vf xv = load(x + d);
        a0 += xv * load(y0 + d);
        a1 += xv * load(y1 + d);
        a2 += xv * load(y2 + d);
        a3 += xv * load(y3 + d);
      }
      if (d < HS) {
        const int64_t w = HS - d;
        const vf xv = load_partial(x + d, w);
        a0 += xv * load_partial(y0 + d, w);
        a1 += xv * load_partial(y1 + d, w);
        a2 += xv * load_partial(y2 + d, w);
        a3 += xv * load_partial(y3 + d, w);
      }
      float* out = S + r * BK + j;
      out[0] = hsum(a0), out[1] = hsum(a1), out[2] = hsum(a2), out[3] = hsum(a3);
    }
    for (; j < nk; ++j) {
      const float* y = k + j * ks;
      vf acc = splat(0.f);
      int64_t d = 0;
      for (; d + W <= HS; d += W) acc += load(x + d) * load(y + d);
      if (d < HS) acc += load_partial(x + d, HS - d) * load_partial(y + d, HS - d);
      S[r * BK + j] = hsum(acc);
    }
  }
}

// O (nq x HS, row stride os) += P V (value rows at stride vs): key by key, up to kSpan vectors of
// a row of O held in registers at once, so the sums are independent (not one chain through every
// key).
void few_query_values(float* O, int64_t os, const float* P, const float* v, int64_t vs, int64_t nq,
                      int64_t nk, int64_t HS) {
  constexpr int64_t kSpan = 8;
  for (int64_t r = 0; r < nq; ++r)
    for (int64_t d0 = 0; d0 < HS; d0 += kSpan * W) {
      const int64_t width = imin(kSpan * W, HS - d0);
      const int64_t full = width / W, tail = width % W;
      vf acc[kSpan + 1];
      float* o = O + r * os + d0;
      for (int64_t c = 0; c < full; ++c) acc[c] = load(o + c * W);
      if (tail) acc[full] = load_partial(o + full * W, tail);
      for (int64_t j = 0; j < nk; ++j) {
        const vf p = splat(P[r * BK + j]);
        const float* vj = v + j * vs + d0;
        prefetch_rows(vj + kPrefetchKeys * vs, width);
        for (int64_t c = 0; c < full; ++c) acc[c] += p * load(vj + c * W);
        if (tail) acc[full] += p * load_partial(vj + full * W, tail);
      }
      for (int64_t c = 0; c < full; ++c) store(o + c * W, acc[c]);
      if (tail) store_partial(o + full * W, acc[full], tail);
    }
}

// Row t of head (b, h) of a tensor at strides st.
inline const float* row_of(const float* p, HeadStrides st, int64_t b, int64_t h, int64_t t) {
  return p + b * st.batch + h * st.head + t * st.pos;
}
inline float* row_of(float* p, HeadStrides st, int64_t b, int64_t h, int64_t t) {
  return p + b * st.batch + h * st.head + t * st.pos;
}

// Zeroes n rows of HS values from p, at row stride rs.
inline void zero_rows(float* p, int64_t rs, int64_t n, int64_t HS) {
  for (int64_t r = 0; r < n; ++r) std::memset(p + r * rs, 0, sizeof(float) * HS);
}

}  // namespace

void attention_forward(float* out, float* lse, const float* q, const float* k, const float* v,
                       int64_t B, int64_t NH, int64_t NKV, int64_t Tq, int64_t Tk, int64_t HS,
                       bool causal, const int64_t* kv_lengths, HeadStrides out_s, HeadStrides q_s,
                       HeadStrides k_s, HeadStrides v_s) {
  const Shape all{B, NH, NKV, Tq, Tk, HS, causal};
  const float scale = 1.0f / std::sqrt(float(HS));
  const int64_t qs = q_s.pos, ks = k_s.pos, vs = v_s.pos, os = out_s.pos;
  parallel_for(B * NH * all.q_blocks(), 1, [&](int64_t u0, int64_t u1) {
    float* S = scores_buffer.get(BQ * BK);
    float* stats = rowstat_buffer.get(2 * BQ);
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t bh = u / all.q_blocks(), i0 = (u % all.q_blocks()) * BQ;
      const int64_t b = bh / NH, h = bh % NH, kvh = h / all.group();
      Shape s = all;
      if (kv_lengths) s.Tk = kv_lengths[b];
      const int64_t nq = imin(BQ, Tq - i0);
      const float* qb = row_of(q, q_s, b, h, i0);
      const float* kh = row_of(k, k_s, b, kvh, 0);
      const float* vh = row_of(v, v_s, b, kvh, 0);
      float* O = row_of(out, out_s, b, h, i0);  // accumulates un-normalised, divided by l at the end
      float *m = stats, *l = stats + BQ;
      for (int64_t r = 0; r < nq; ++r) m[r] = -INFINITY, l[r] = 0.f;
      zero_rows(O, os, nq, HS);
      const int64_t key_end = s.key_end(i0 + nq);
      for (int64_t j0 = 0; j0 < key_end; j0 += BK) {
        const int64_t nk = imin(BK, key_end - j0);
        // S = Q K^T: K^T is K's rows read as columns.
        if (nq <= kFewQueries)
          few_query_scores(S, qb, qs, kh + j0 * ks, ks, nq, nk, HS);
        else
          gemm_serial(nq, nk, HS, MatView{qb, qs, 1}, MatView{kh + j0 * ks, 1, ks}, S, BK, false);
        // Online softmax: fold this block into the running max m and sum l of each row,
        // rescaling what O already holds by exp(m_old - m_new). Rows are BK floats wide, so
        // whole vectors are read; lanes past the n visible keys are masked to -inf.
        const vf sc = splat(scale), neg_inf = splat(-INFINITY);
        for (int64_t r = 0; r < nq; ++r) {
          float* p = S + r * BK;
          const int64_t n = s.visible(i0 + r, j0, nk);
          vf vmax_ = neg_inf;
          for (int64_t j = 0; j < n; j += W) {
            vf x = load(p + j) * sc;
            if (j + W > n)
              for (int64_t t = n - j; t < W; ++t) x[t] = -INFINITY;
            store(p + j, x);
            vmax_ = vmax(vmax_, x);
          }
          const float m_new = std::fmax(m[r], hmax(vmax_));
          if (n == 0 || m_new == -INFINITY) {
            for (int64_t j = 0; j < BK; j += W) store(p + j, splat(0.f));
            continue;
          }
          const float alpha = std::exp(m[r] - m_new);
          const vf sh = splat(m_new);
          vf sum = splat(0.f);
          int64_t j = 0;
          for (; j < n; j += W) {  // exp(-inf) = 0 in the masked lanes
            const vf e = vexp(load(p + j) - sh);
            store(p + j, e);
            sum += e;
          }
          for (; j < BK; j += W) store(p + j, splat(0.f));
          l[r] = l[r] * alpha + hsum(sum);
          m[r] = m_new;
          if (alpha != 1.0f) {
            const vf a = splat(alpha);
            float* o = O + r * os;
            for (int64_t d = 0; d < HS; d += W) {
              const int64_t w = imin(W, HS - d);
              store_partial(o + d, load_partial(o + d, w) * a, w);
            }
          }
        }
        // O += P V
        if (nq <= kFewQueries)
          few_query_values(O, os, S, vh + j0 * vs, vs, nq, nk, HS);
        else
          gemm_serial(nq, HS, nk, MatView{S, BK, 1}, MatView{vh + j0 * vs, vs, 1}, O, os, true);
      }
      float* lse_b = lse + bh * Tq + i0;
      for (int64_t r = 0; r < nq; ++r) {
        const vf inv = splat(1.0f / l[r]);
        float* o = O + r * os;
        for (int64_t d = 0; d < HS; d += W) {
          const int64_t w = imin(W, HS - d);
          store_partial(o + d, load_partial(o + d, w) * inv, w);
        }
        lse_b[r] = m[r] + std::log(l[r]);
      }
    }
  });
}

void attention_backward(float* dq, float* dk, float* dv, const float* dout, const float* q,
                        const float* k, const float* v, const float* out, const float* lse,
                        int64_t B, int64_t NH, int64_t NKV, int64_t Tq, int64_t Tk, int64_t HS,
                        bool causal, HeadStrides out_s, HeadStrides q_s, HeadStrides k_s,
                        HeadStrides v_s) {
  const Shape s{B, NH, NKV, Tq, Tk, HS, causal};
  const float scale = 1.0f / std::sqrt(float(HS));
  const int64_t qs = q_s.pos, ks = k_s.pos, vs = v_s.pos, os = out_s.pos;
  // D[i] = dout[i] . out[i], the softmax-backward term shared by every key of row i.
  Scratch Dbuf(size_t(B * NH * Tq));
  float* D = Dbuf.data();
  parallel_for(B * NH * Tq, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t t = r % Tq, bh = r / Tq;
      const float *g = row_of(dout, out_s, bh / NH, bh % NH, t), *o = row_of(out, out_s, bh / NH, bh % NH, t);
      vf acc = splat(0.f);
      for (int64_t d = 0; d < HS; d += W) {
        const int64_t n = imin(W, HS - d);
        acc += load_partial(g + d, n) * load_partial(o + d, n);
      }
      D[r] = hsum(acc);
    }
  });

  // One tile pair (query block i0 of head bh, key block j0 of kv head bkv): recompute P, then
  // dv += P^T dout, dS = P * (dout v^T - D) * scale, dk += dS^T q and/or dq += dS k.
  auto tile_backward = [&](float* P, float* dP, int64_t bh, int64_t bkv, int64_t i0, int64_t j0,
                           bool want_dq, bool want_dkv) {
    const int64_t nq = imin(BQ, Tq - i0), nk = imin(BK, Tk - j0), row = bh * Tq + i0;
    const int64_t b = bh / NH, h = bh % NH, kvh = bkv % NKV;
    const float *qb = row_of(q, q_s, b, h, i0), *gb = row_of(dout, out_s, b, h, i0);
    const float *kb = row_of(k, k_s, b, kvh, j0), *vb = row_of(v, v_s, b, kvh, j0);
    gemm_serial(nq, nk, HS, MatView{qb, qs, 1}, MatView{kb, 1, ks}, P, BK, false);
    probabilities(P, lse + row, s, i0, nq, j0, nk, scale);
    if (want_dkv && dv)
      gemm_serial(nk, HS, nq, MatView{P, 1, BK}, MatView{gb, os, 1}, row_of(dv, v_s, b, kvh, j0), vs, true);
    gemm_serial(nq, nk, HS, MatView{gb, os, 1}, MatView{vb, 1, vs}, dP, BK, false);
    score_gradients(dP, P, D + row, nq, nk, scale);
    if (want_dkv && dk)
      gemm_serial(nk, HS, nq, MatView{dP, 1, BK}, MatView{qb, qs, 1}, row_of(dk, k_s, b, kvh, j0), ks, true);
    if (want_dq && dq)
      gemm_serial(nq, HS, nk, MatView{dP, BK, 1}, MatView{kb, ks, 1}, row_of(dq, q_s, b, h, i0), qs, true);
  };
  auto head_of = [&](int64_t bkv, int64_t hg) { return (bkv / NKV) * NH + (bkv % NKV) * s.group() + hg; };
  // Query blocks that see key block j0: with causal, those ending after row j0 - offset.
  auto first_query_block = [&](int64_t j0) { return causal ? imax(0, j0 - s.offset()) / BQ * BQ : 0; };

  // Every path visits, for each output block, the same tiles in the same order (key blocks
  // ascending for dq; query heads then query blocks ascending for dk, dv), so the result is
  // bit-identical whichever path runs and however many threads run it.
  const int64_t kv_heads = B * NKV;
  if (kv_heads >= 2 * num_threads()) {
    // One pass: a work item owns a whole kv head, hence its dk, dv and the dq of every query
    // head of its group. Each tile pair is visited once (5 small GEMMs).
    parallel_for(kv_heads, 1, [&](int64_t u0, int64_t u1) {
      float* P = scores_buffer.get(BQ * BK);
      float* dP = dscores_buffer.get(BQ * BK);
      for (int64_t bkv = u0; bkv < u1; ++bkv) {
        const int64_t b = bkv / NKV, kvh = bkv % NKV;
        if (dq)
          for (int64_t hg = 0; hg < s.group(); ++hg)
            zero_rows(row_of(dq, q_s, b, head_of(bkv, hg) % NH, 0), qs, Tq, HS);
        if (dk) zero_rows(row_of(dk, k_s, b, kvh, 0), ks, Tk, HS);
        if (dv) zero_rows(row_of(dv, v_s, b, kvh, 0), vs, Tk, HS);
        for (int64_t j0 = 0; j0 < Tk; j0 += BK)
          for (int64_t hg = 0; hg < s.group(); ++hg)
            for (int64_t i0 = first_query_block(j0); i0 < Tq; i0 += BQ)
              tile_backward(P, dP, head_of(bkv, hg), bkv, i0, j0, true, true);
      }
    });
    return;
  }

  // Two passes, for few kv heads (more, smaller work items): dq by query block, then dk and dv
  // by key block; the scores are recomputed in each (7 small GEMMs per tile pair instead of 5).
  if (dq) {
    parallel_for(B * NH * s.q_blocks(), 1, [&](int64_t u0, int64_t u1) {
      float* P = scores_buffer.get(BQ * BK);
      float* dP = dscores_buffer.get(BQ * BK);
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t bh = u / s.q_blocks(), i0 = (u % s.q_blocks()) * BQ;
        const int64_t bkv = (bh / NH) * NKV + (bh % NH) / s.group();
        zero_rows(row_of(dq, q_s, bh / NH, bh % NH, i0), qs, imin(BQ, Tq - i0), HS);
        const int64_t key_end = s.key_end(imin(Tq, i0 + BQ));
        for (int64_t j0 = 0; j0 < key_end; j0 += BK) tile_backward(P, dP, bh, bkv, i0, j0, true, false);
      }
    });
  }
  if (dk || dv) {
    parallel_for(kv_heads * s.k_blocks(), 1, [&](int64_t u0, int64_t u1) {
      float* P = scores_buffer.get(BQ * BK);
      float* dP = dscores_buffer.get(BQ * BK);
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t bkv = u / s.k_blocks(), j0 = (u % s.k_blocks()) * BK;
        const int64_t nk = imin(BK, Tk - j0), b = bkv / NKV, kvh = bkv % NKV;
        if (dk) zero_rows(row_of(dk, k_s, b, kvh, j0), ks, nk, HS);
        if (dv) zero_rows(row_of(dv, v_s, b, kvh, j0), vs, nk, HS);
        for (int64_t hg = 0; hg < s.group(); ++hg)
          for (int64_t i0 = first_query_block(j0); i0 < Tq; i0 += BQ)
            tile_backward(P, dP, head_of(bkv, hg), bkv, i0, j0, false, true);
      }
    });
  }
}

}  // namespace PYLLM_ISA
}  // namespace pyllm
