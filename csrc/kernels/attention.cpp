// Fused causal multi-head attention, flash-attention style: scores, mask, online softmax and the
// weighted sum of values in BQ x BK tiles, so no T x T matrix is ever held. Grouped-query heads
// (NKV < NH) and a query block that sits at the end of a longer key sequence (KV cache) included.
// Every tensor is read and written at its own HeadStrides, so q, k and v can be the column blocks
// of a fused qkv projection and out the input of the output projection: no head is ever copied.
// Not a general sparse/masked attention: the only masks are none, causal, and causal within a
// sliding window of the last `window` keys.
//
// The tile products are small GEMMs on strided views (gemm_serial), so the register-blocked
// micro-kernel of matmul.cpp does the arithmetic here too.
#include <cmath>
#include <cstring>
#include <vector>

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
  int64_t window = 0;   // > 0: query i also sees no key before i + offset - window + 1
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
  // Number of keys at the start of the block starting at j0 (of nk) that are before query row i's
  // window (masked as well).
  int64_t hidden(int64_t i, int64_t j0, int64_t nk) const {
    return window > 0 ? imax(0, imin(nk, i + offset() - window + 1 - j0)) : 0;
  }
  // The first key block that some query in rows [i0, ...) sees.
  int64_t key_begin(int64_t i0) const { return window > 0 ? imax(0, i0 + offset() - window + 1) / BK * BK : 0; }
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
    for (j = 0; j < imin(s.hidden(i0 + r, j0, nk), n); ++j) p[j] = 0.f;   // before the window
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

// A cache row's values as floats: float32, or float16 widened (a half-precision KV cache).
inline vf kv_load(const float* p) { return load(p); }
inline vf kv_load(const uint16_t* p) { return load_half(p); }
inline vf kv_load_partial(const float* p, int64_t n) { return load_partial(p, n); }
inline vf kv_load_partial(const uint16_t* p, int64_t n) { return load_half_partial(p, n); }

template <class KV>
inline void prefetch_rows(const KV* p, int64_t n) {
  for (int64_t i = 0; i < n; i += 64 / int64_t(sizeof(KV))) __builtin_prefetch(p + i, 0, 3);
}

// out[0..4) = the horizontal sums of a[0..4), in one transposing reduction (a third of four hsums).
inline void hsum4(const vf* a, float* out) {
#if defined(__AVX512F__) && !defined(PYLLM_FORCE_WIDTH)
  const __m512 a0 = __m512(a[0]), a1 = __m512(a[1]), a2 = __m512(a[2]), a3 = __m512(a[3]);
  const __m512 t0 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
  const __m512 t1 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
  const __m512 u = _mm512_add_ps(_mm512_shuffle_ps(t0, t1, _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm512_shuffle_ps(t0, t1, _MM_SHUFFLE(3, 2, 3, 2)));   // 4 sums per 128 bits
  const __m512 v = _mm512_add_ps(u, _mm512_shuffle_f32x4(u, u, _MM_SHUFFLE(1, 0, 3, 2)));
  const __m512 w = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, _MM_SHUFFLE(2, 3, 0, 1)));
  _mm_storeu_ps(out, _mm512_castps512_ps128(w));
#elif defined(__AVX2__) && !defined(PYLLM_FORCE_WIDTH)
  const __m256 t0 = _mm256_hadd_ps(__m256(a[0]), __m256(a[1])), t1 = _mm256_hadd_ps(__m256(a[2]), __m256(a[3]));
  const __m256 u = _mm256_hadd_ps(t0, t1);   // 4 sums per 128 bits
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps(u, 1)));
#else
  for (int i = 0; i < 4; ++i) out[i] = hsum(a[i]);
#endif
}

// Rows of q (or of O) that share each key (value) vector loaded into registers: as many as the
// registers hold next to four keys' sums (the values' span of vectors).
constexpr int kSharedRows = W == 16 ? 4 : 2;

// S (nq x nk, row stride BK) = q k^T for nq query rows (row stride qs) and nk key rows (ks): four
// keys at a time (four independent sums in flight), each key vector loaded once for up to
// kSharedRows rows (a decode step's query heads that share a kv head).
template <class KV>
void few_query_scores(float* S, const float* q, int64_t qs, const KV* k, int64_t ks, int64_t nq,
                      int64_t nk, int64_t HS) {
  constexpr int R = kSharedRows;
  for (int64_t r0 = 0; r0 < nq; r0 += R) {
    const int64_t nr = imin(R, nq - r0);
    const float* x = q + r0 * qs;
    int64_t j = 0;
    for (; j + 4 <= nk; j += 4) {
      const KV* y[4] = {k + j * ks, k + (j + 1) * ks, k + (j + 2) * ks, k + (j + 3) * ks};
      if (r0 == 0)
        for (int64_t a = 0; a < 4; ++a) prefetch_rows(y[0] + (kPrefetchKeys + a) * ks, HS);
      vf acc[R][4];
      for (int r = 0; r < R; ++r)
        for (int a = 0; a < 4; ++a) acc[r][a] = splat(0.f);
      for (int64_t d = 0; d < HS; d += W) {
        const int64_t w = imin(W, HS - d);
        vf kv[4];
        for (int a = 0; a < 4; ++a) kv[a] = w == W ? kv_load(y[a] + d) : kv_load_partial(y[a] + d, w);
        for (int r = 0; r < R; ++r) {
          if (r >= nr) break;
          const vf xv = w == W ? load(x + r * qs + d) : load_partial(x + r * qs + d, w);
          for (int a = 0; a < 4; ++a) acc[r][a] += xv * kv[a];
        }
      }
      for (int r = 0; r < nr; ++r) hsum4(acc[r], S + (r0 + r) * BK + j);
    }
    for (; j < nk; ++j) {
      const KV* y = k + j * ks;
      for (int64_t r = 0; r < nr; ++r) {
        vf acc = splat(0.f);
        for (int64_t d = 0; d < HS; d += W) {
          const int64_t w = imin(W, HS - d);
          acc += load_partial(x + r * qs + d, w) * kv_load_partial(y + d, w);
        }
        S[(r0 + r) * BK + j] = hsum(acc);
      }
    }
  }
}

// O (nq x HS, row stride os) += P V (value rows at stride vs): key by key, kSpan vectors of a value
// row loaded once for up to kSharedRows rows of O, held in registers (independent sums, not one
// chain through every key).
template <class KV>
void few_query_values(float* O, int64_t os, const float* P, const KV* v, int64_t vs, int64_t nq,
                      int64_t nk, int64_t HS) {
  constexpr int R = kSharedRows;
  constexpr int64_t kSpan = W == 16 ? 4 : 4;
  for (int64_t r0 = 0; r0 < nq; r0 += R) {
    const int64_t nr = imin(R, nq - r0);
    for (int64_t d0 = 0; d0 < HS; d0 += kSpan * W) {
      const int64_t width = imin(kSpan * W, HS - d0);
      const int64_t vectors = (width + W - 1) / W;
      vf acc[R][kSpan];
      for (int r = 0; r < nr; ++r)
        for (int64_t c = 0; c < vectors; ++c)
          acc[r][c] = load_partial(O + (r0 + r) * os + d0 + c * W, width - c * W);
      for (int64_t j = 0; j < nk; ++j) {
        const KV* vj = v + j * vs + d0;
        if (r0 == 0) prefetch_rows(vj + kPrefetchKeys * vs, width);
        vf val[kSpan];
        for (int64_t c = 0; c < vectors; ++c)
          val[c] = c * W + W <= width ? kv_load(vj + c * W) : kv_load_partial(vj + c * W, width - c * W);
        for (int r = 0; r < R; ++r) {
          if (r >= nr) break;
          const vf p = splat(P[(r0 + r) * BK + j]);
          for (int64_t c = 0; c < vectors; ++c) acc[r][c] += p * val[c];
        }
      }
      for (int r = 0; r < nr; ++r)
        for (int64_t c = 0; c < vectors; ++c)
          store_partial(O + (r0 + r) * os + d0 + c * W, acc[r][c], width - c * W);
    }
  }
}

// The GEMM reads float32 tiles: a block of nk cache rows (stride rs) as floats, rows HS apart,
// in buf; a float32 cache is read in place.
thread_local ThreadBuffer key_tile_buffer, value_tile_buffer;

inline MatView rows_as_floats(const float* p, int64_t rs, int64_t, int64_t, ThreadBuffer&, bool transpose) {
  return transpose ? MatView{p, 1, rs} : MatView{p, rs, 1};
}
inline MatView rows_as_floats(const uint16_t* p, int64_t rs, int64_t nk, int64_t HS, ThreadBuffer& buf,
                              bool transpose) {
  float* t = buf.get(size_t(BK * HS));
  for (int64_t j = 0; j < nk; ++j)
    for (int64_t d = 0; d < HS; d += W) store_partial(t + j * HS + d, load_half_partial(p + j * rs + d, HS - d), HS - d);
  return transpose ? MatView{t, 1, HS} : MatView{t, HS, 1};
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


// Online softmax: folds a block of scores S (nq rows of BK, the first visible(r) of row r real)
// into each row's running max m and sum l, rescaling what O already holds by exp(m_old - m_new);
// S becomes the block's probabilities (unnormalised), zero past each row's visible keys. Rows are
// BK floats wide, so whole vectors are read; lanes past the visible keys are masked to -inf.
template <class Visible, class Hidden>
void fold_scores(float* S, float* m, float* l, float* O, int64_t os, int64_t nq, int64_t HS, float scale,
                 Visible visible, Hidden hidden) {
  const vf sc = splat(scale), neg_inf = splat(-INFINITY);
  for (int64_t r = 0; r < nq; ++r) {
    float* p = S + r * BK;
    const int64_t n = visible(r), lo = hidden(r);   // keys [lo, n) of the block are seen
    vf vmax_ = neg_inf;
    for (int64_t j = 0; j < n; j += W) {
      vf x = load(p + j) * sc;
      if (j + W > n)
        for (int64_t t = n - j; t < W; ++t) x[t] = -INFINITY;
      for (int64_t t = 0; t < W && j + t < lo; ++t) x[t] = -INFINITY;
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
}

// Rows of O divided by their sums l, and their log-sum-exps (at lse[r * lse_stride]).
void finish_rows(float* O, int64_t os, const float* m, const float* l, float* lse, int64_t lse_stride, int64_t nq,
                 int64_t HS) {
  for (int64_t r = 0; r < nq; ++r) {
    const vf inv = splat(1.0f / l[r]);
    float* o = O + r * os;
    for (int64_t d = 0; d < HS; d += W) {
      const int64_t w = imin(W, HS - d);
      store_partial(o + d, load_partial(o + d, w) * inv, w);
    }
    lse[r * lse_stride] = m[r] + std::log(l[r]);
  }
}

// Keys per work item of a decode step: a long cache is split over the threads, each chunk's
// softmax kept apart (max, sum, weighted values) and merged in a fixed order afterwards.
constexpr int64_t kDecodeChunk = 256;

// One query per head (Tq = 1): a work item is a chunk of one batch row's cache for one kv head and
// every query head that reads it, so each key and value is loaded once for the group. A row's
// chunks depend only on its own length: a sequence gets the same result in any batch.
template <class KV>
void decode(float* out, float* lse, const float* q, const KV* k, const KV* v, const Shape& all,
            const int64_t* kv_lengths, const int64_t* kv_rows, HeadStrides out_s, HeadStrides q_s, HeadStrides k_s,
            HeadStrides v_s, float scale) {
  const int64_t B = all.B, NKV = all.NKV, G = all.group(), HS = all.HS;
  const int64_t ks = k_s.pos, vs = v_s.pos, slot = G * (HS + 2);   // a chunk's O (G x HS), m (G), l (G)
  std::vector<int64_t> first(size_t(B * NKV) + 1, 0);
  for (int64_t bk = 0; bk < B * NKV; ++bk) {
    const int64_t len = kv_lengths ? kv_lengths[bk / NKV] : all.Tk;
    first[size_t(bk) + 1] = first[size_t(bk)] + imax(1, (len + kDecodeChunk - 1) / kDecodeChunk);
  }
  Scratch partial(size_t(first.back() * slot));
  parallel_for(first.back(), 1, [&](int64_t u0, int64_t u1) {
    float* S = scores_buffer.get(size_t(G * BK));
    int64_t bk = 0;
    for (int64_t u = u0; u < u1; ++u) {
      while (u >= first[size_t(bk) + 1]) ++bk;
      const int64_t b = bk / NKV, kvh = bk % NKV, len = kv_lengths ? kv_lengths[b] : all.Tk;
      // Chunks follow the row's length alone; a window only drops the keys before it.
      const int64_t j_chunk = (u - first[size_t(bk)]) * kDecodeChunk, j_end = imin(len, j_chunk + kDecodeChunk);
      const int64_t j_begin = all.window > 0 ? imax(j_chunk, len - all.window) : j_chunk;
      float *O = partial.data() + u * slot, *m = O + G * HS, *l = m + G;
      for (int64_t g = 0; g < G; ++g) m[g] = -INFINITY, l[g] = 0.f;
      zero_rows(O, HS, G, HS);
      const float* qg = row_of(q, q_s, b, kvh * G, 0);   // the group's query heads, q_s.head apart
      const int64_t row = kv_rows ? kv_rows[b] : b;
      const KV* kh = k + row * k_s.batch + kvh * k_s.head;
      const KV* vh = v + row * v_s.batch + kvh * v_s.head;
      for (int64_t j0 = j_begin; j0 < j_end; j0 += BK) {
        const int64_t nk = imin(BK, j_end - j0);
        few_query_scores(S, qg, q_s.head, kh + j0 * ks, ks, G, nk, HS);
        fold_scores(S, m, l, O, HS, G, HS, scale, [nk](int64_t) { return nk; }, [](int64_t) { return int64_t(0); });
        few_query_values(O, HS, S, vh + j0 * vs, vs, G, nk, HS);
      }
    }
  });
  // Each head's chunks merged in order: weights exp(m_c - max), sums and values rescaled alike.
  parallel_for(B * all.NH, 8, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / all.NH, h = r % all.NH, bk = b * NKV + h / G, g = h % G;
      const int64_t c0 = first[size_t(bk)], c1 = first[size_t(bk) + 1];
      float top = -INFINITY;
      for (int64_t c = c0; c < c1; ++c) top = std::fmax(top, partial.data()[c * slot + G * HS + g]);
      float* o = row_of(out, out_s, b, h, 0);
      float total = 0.f;
      for (int64_t d = 0; d < HS; d += W) store_partial(o + d, splat(0.f), HS - d);
      for (int64_t c = c0; c < c1; ++c) {
        const float* part = partial.data() + c * slot;
        const float weight = top == -INFINITY ? 1.f : std::exp(part[G * HS + g] - top);
        total += weight * part[G * HS + G + g];
        const vf wv = splat(weight);
        for (int64_t d = 0; d < HS; d += W) {
          const int64_t w = imin(W, HS - d);
          store_partial(o + d, load_partial(o + d, w) + wv * load_partial(part + g * HS + d, w), w);
        }
      }
      finish_rows(o, 0, &top, &total, lse + r, 1, 1, HS);
    }
  });
}

template <class KV>
void forward(float* out, float* lse, const float* q, const KV* k, const KV* v, int64_t B, int64_t NH, int64_t NKV,
             int64_t Tq, int64_t Tk, int64_t HS, bool causal, int64_t window, const int64_t* kv_lengths,
             const int64_t* kv_rows, HeadStrides out_s, HeadStrides q_s, HeadStrides k_s, HeadStrides v_s) {
  const Shape all{B, NH, NKV, Tq, Tk, HS, causal, causal ? window : 0};
  const float scale = 1.0f / std::sqrt(float(HS));
  if (Tq == 1) return decode(out, lse, q, k, v, all, kv_lengths, kv_rows, out_s, q_s, k_s, v_s, scale);
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
      const int64_t row = kv_rows ? kv_rows[b] : b;
      const KV* kh = k + row * k_s.batch + kvh * k_s.head;
      const KV* vh = v + row * v_s.batch + kvh * v_s.head;
      float* O = row_of(out, out_s, b, h, i0);  // accumulates un-normalised, divided by l at the end
      float *m = stats, *l = stats + BQ;
      for (int64_t r = 0; r < nq; ++r) m[r] = -INFINITY, l[r] = 0.f;
      zero_rows(O, os, nq, HS);
      const int64_t key_end = s.key_end(i0 + nq);
      for (int64_t j0 = s.key_begin(i0); j0 < key_end; j0 += BK) {
        const int64_t nk = imin(BK, key_end - j0);
        // S = Q K^T: K^T is K's rows read as columns.
        if (nq <= kFewQueries)
          few_query_scores(S, qb, qs, kh + j0 * ks, ks, nq, nk, HS);
        else
          gemm_serial(nq, nk, HS, MatView{qb, qs, 1}, rows_as_floats(kh + j0 * ks, ks, nk, HS, key_tile_buffer, true),
                      S, BK, false);
        fold_scores(S, m, l, O, os, nq, HS, scale, [&](int64_t r) { return s.visible(i0 + r, j0, nk); },
                    [&](int64_t r) { return s.hidden(i0 + r, j0, nk); });
        // O += P V
        if (nq <= kFewQueries)
          few_query_values(O, os, S, vh + j0 * vs, vs, nq, nk, HS);
        else
          gemm_serial(nq, HS, nk, MatView{S, BK, 1}, rows_as_floats(vh + j0 * vs, vs, nk, HS, value_tile_buffer, false),
                      O, os, true);
      }
      finish_rows(O, os, m, l, lse + bh * Tq + i0, 1, nq, HS);
    }
  });
}

}  // namespace

void attention_forward(float* out, float* lse, const float* q, const float* k, const float* v, int64_t B, int64_t NH,
                       int64_t NKV, int64_t Tq, int64_t Tk, int64_t HS, bool causal, int64_t window,
                       const int64_t* kv_lengths, const int64_t* kv_rows, HeadStrides out_s, HeadStrides q_s,
                       HeadStrides k_s, HeadStrides v_s) {
  forward(out, lse, q, k, v, B, NH, NKV, Tq, Tk, HS, causal, window, kv_lengths, kv_rows, out_s, q_s, k_s, v_s);
}

void attention_forward_half(float* out, float* lse, const float* q, const uint16_t* k, const uint16_t* v, int64_t B,
                            int64_t NH, int64_t NKV, int64_t Tq, int64_t Tk, int64_t HS, bool causal,
                            int64_t window, const int64_t* kv_lengths, const int64_t* kv_rows, HeadStrides out_s,
                            HeadStrides q_s, HeadStrides k_s, HeadStrides v_s) {
  forward(out, lse, q, k, v, B, NH, NKV, Tq, Tk, HS, causal, window, kv_lengths, kv_rows, out_s, q_s, k_s, v_s);
}

void attention_backward(float* dq, float* dk, float* dv, const float* dout, const float* q,
                        const float* k, const float* v, const float* out, const float* lse,
                        int64_t B, int64_t NH, int64_t NKV, int64_t Tq, int64_t Tk, int64_t HS,
                        bool causal, int64_t window, HeadStrides out_s, HeadStrides q_s, HeadStrides k_s,
                        HeadStrides v_s) {
  const Shape s{B, NH, NKV, Tq, Tk, HS, causal, causal ? window : 0};
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
        for (int64_t j0 = s.key_begin(i0); j0 < key_end; j0 += BK) tile_backward(P, dP, bh, bkv, i0, j0, true, false);
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

// What a reader of the model asks for (pyllm explain), not the training or decode path: each tile
// of scores recomputed and turned into probabilities by the function backward uses, so the rows
// are exactly the weights the forward pass averaged the values with.
void attention_probabilities(float* probs, const float* q, const float* k, const float* lse, int64_t B, int64_t NH,
                             int64_t NKV, int64_t Tq, int64_t Tk, int64_t HS, bool causal, int64_t window,
                             HeadStrides q_s, HeadStrides k_s) {
  const Shape s{B, NH, NKV, Tq, Tk, HS, causal, causal ? window : 0};
  const float scale = 1.0f / std::sqrt(float(HS));
  parallel_for(B * NH * s.q_blocks(), 1, [&](int64_t u0, int64_t u1) {
    float* P = scores_buffer.get(BQ * BK);
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t bh = u / s.q_blocks(), i0 = (u % s.q_blocks()) * BQ, nq = imin(BQ, Tq - i0);
      const int64_t b = bh / NH, h = bh % NH, kvh = h / s.group();
      float* rows = probs + (bh * Tq + i0) * Tk;
      for (int64_t r = 0; r < nq; ++r) std::memset(rows + r * Tk, 0, sizeof(float) * size_t(Tk));
      const int64_t key_end = s.key_end(i0 + nq);
      for (int64_t j0 = s.key_begin(i0); j0 < key_end; j0 += BK) {
        const int64_t nk = imin(BK, key_end - j0);
        gemm_serial(nq, nk, HS, MatView{row_of(q, q_s, b, h, i0), q_s.pos, 1},
                    MatView{row_of(k, k_s, b, kvh, j0), 1, k_s.pos}, P, BK, false);
        probabilities(P, lse + bh * Tq + i0, s, i0, nq, j0, nk, scale);
        for (int64_t r = 0; r < nq; ++r) std::memcpy(rows + r * Tk + j0, P + r * BK, sizeof(float) * size_t(nk));
      }
    }
  });
}

}  // namespace PYLLM_ISA
}  // namespace pyllm
