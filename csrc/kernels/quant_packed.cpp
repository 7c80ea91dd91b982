// Block-quantized weights regrouped for integer dot products (the model's decode and small-batch
// path): the 32-value types Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0, each row's blocks stored as
//
//   d[nb] (f16) | m[nb] (f16: Q4_1, Q5_1) | qh[nb] (u32: Q5_0, Q5_1) | qs[nb] (16 bytes; 32 for Q8_0)
//
// the same bytes as ggml's row (nb = K / 32 blocks of d, m, qh, qs), so a row's scales load as one
// vector and its packed values as whole registers. out (M, N) = a (M, K) @ W^T with a rounded per
// block of 32 to int8 as llama.cpp's Q8_0 rounds it; a row's sums run in one fixed order whatever
// M is and whichever rows share the call, so a batch gives each row what it gives alone.
// Not the native layout's kernels (quant_matmul.cpp), nor the K-quants.
#include <cstring>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "kernels/quant_blocks.h"
#include "kernels/quant_packed.h"
#include "threads.h"

namespace pyllm {
namespace PYLLM_ISA {
namespace {

// Where each part of a packed row starts (bytes from the row's start), for nb blocks.
struct Layout {
  int64_t nb, m, qh, qs, qs_bytes;
};

Layout layout_of(int type, int64_t K) {
  Layout l{K / QK, 0, 0, 0, type == kQ8_0 ? 32 : 16};
  const bool has_m = type == kQ4_1 || type == kQ5_1, has_qh = type == kQ5_0 || type == kQ5_1;
  l.m = 2 * l.nb;
  l.qh = l.m + (has_m ? 2 * l.nb : 0);
  l.qs = l.qh + (has_qh ? 4 * l.nb : 0);
  return l;
}

#if defined(__AVX512VNNI__)
constexpr bool kQ8Unsigned = true;    // dpbusd multiplies unsigned by signed: Q8_0 is read as value + 128
#else
constexpr bool kQ8Unsigned = false;
#endif

// The coefficient of a block's activation sum (dx * sum of its int8 values): Q4_0's zero point of
// 8, Q5_0's 16, Q8_0's 128 where its values are read as unsigned, or the minimum m.
template <int Type>
constexpr float zero_of() {
  return Type == kQ4_0 ? -8.f : Type == kQ5_0 ? -16.f : (Type == kQ8_0 && kQ8Unsigned) ? -128.f : 0.f;
}

#if defined(__AVX512VNNI__)
constexpr int64_t kGroup = 16;   // blocks whose scales are one vector
#elif defined(__AVX2__)
constexpr int64_t kGroup = 8;
#else
constexpr int64_t kGroup = 1;
#endif

// One row of activations rounded for these products: int8 values in the order the ISA's weight
// expansion produces them, each block's scale dx and dx times the sum of its values, the blocks
// padded with zeros to whole groups (so a group's vectors never read past the row).
struct Acts {
  std::vector<int8_t> q;
  std::vector<float> d, s;
};

void quantize_row(Acts& out, const float* a, int64_t K, int type) {
  const int64_t nb = K / QK, padded = (nb + 2 * kGroup - 1) / (2 * kGroup) * (2 * kGroup);
  out.q.assign(size_t(padded * QK), 0);
  out.d.assign(size_t(padded), 0.f);
  out.s.assign(size_t(padded), 0.f);
  ActBlock blk;
  for (int64_t b = 0; b < nb; ++b) {
    quantize_activations(&blk, a + b * QK, 1, QK);
    out.d[size_t(b)] = blk.d;
    out.s[size_t(b)] = blk.dsum;
    int8_t* q = out.q.data();
#if defined(__AVX512VNNI__)
    if (type != kQ8_0) {   // pairs of blocks as [a 0..15 | b 0..15 | a 16..31 | b 16..31]
      int8_t* pair = q + (b / 2) * 64 + (b % 2) * 16;
      std::memcpy(pair, blk.q, 16);
      std::memcpy(pair + 32, blk.q + 16, 16);
      continue;
    }
#endif
    (void)type;
    std::memcpy(q + b * QK, blk.q, QK);
  }
}

#if defined(__AVX512VNNI__)
// The 64 values of blocks (b, b + 1) of a packed row as unsigned bytes, in the activations' order.
template <int Type>
inline __m512i expand_pair(const uint8_t* row, const Layout& l, int64_t b, bool both) {
  if (Type == kQ8_0) {
    const __mmask64 keep = both ? ~__mmask64(0) : __mmask64(0xFFFFFFFFu);
    const __m512i v = _mm512_maskz_loadu_epi8(keep, row + l.qs + b * 32);
    return _mm512_xor_si512(v, _mm512_set1_epi8(char(0x80)));   // signed -> unsigned: value + 128
  }
  const __mmask32 keep = both ? ~__mmask32(0) : __mmask32(0xFFFFu);
  const __m256i nib = _mm256_maskz_loadu_epi8(keep, row + l.qs + b * 16);
  const __m256i mask = _mm256_set1_epi8(0x0F);
  const __m256i lo = _mm256_and_si256(nib, mask), hi = _mm256_and_si256(_mm256_srli_epi16(nib, 4), mask);
  __m512i w = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
  if (Type == kQ5_0 || Type == kQ5_1) {   // the fifth bit of value t is bit t of qh
    uint32_t ha, hb = 0;
    std::memcpy(&ha, row + l.qh + b * 4, 4);
    if (both) std::memcpy(&hb, row + l.qh + (b + 1) * 4, 4);
    const uint64_t bits = uint64_t(ha & 0xFFFF) | uint64_t(hb & 0xFFFF) << 16 | uint64_t(ha >> 16) << 32 |
                          uint64_t(hb >> 16) << 48;
    w = _mm512_or_si512(w, _mm512_maskz_mov_epi8(__mmask64(bits), _mm512_set1_epi8(0x10)));
  }
  return w;
}

// Lane l of pair p's products belongs to block 2p + (l / 4) % 2 (4-bit types) or 2p + l / 8 (Q8_0)
// of its group: the lanes of the group's scale vector each product lane is multiplied by.
struct PairLanes {
  alignas(64) int32_t idx[2][kGroup / 2][16];
  PairLanes() {
    for (int q8 = 0; q8 < 2; ++q8)
      for (int p = 0; p < kGroup / 2; ++p)
        for (int l = 0; l < 16; ++l) idx[q8][p][l] = int32_t(2 * p + (q8 ? l / 8 : (l / 4) % 2));
  }
};
const PairLanes kPairLanes;

// out[r] = row . acts[r] for R activation rows, the weights expanded once for all of them.
template <int Type, int R>
void dot_rows(float* const* out, const uint8_t* row, const Layout& l, const Acts* const* acts) {
  const int32_t (*lanes)[16] = kPairLanes.idx[Type == kQ8_0];
  __m512 acc[R], offset[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps(), offset[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < l.nb; g += kGroup) {
    const int64_t n = imin(kGroup, l.nb - g);
    const __mmask16 live = __mmask16((1u << n) - 1);
    const __m512 dw = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(live, row + 2 * g));
    const __m512 cw = (Type == kQ4_1 || Type == kQ5_1)
                          ? _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(live, row + l.m + 2 * g))
                          : _mm512_mul_ps(dw, _mm512_set1_ps(zero_of<Type>()));
    __m512 scale[R];
    for (int r = 0; r < R; ++r) {
      scale[r] = _mm512_mul_ps(dw, _mm512_loadu_ps(acts[r]->d.data() + g));
      offset[r] = _mm512_fmadd_ps(cw, _mm512_loadu_ps(acts[r]->s.data() + g), offset[r]);
    }
    for (int64_t p = 0; 2 * p < n; ++p) {
      const int64_t b = g + 2 * p;
      const __m512i w = expand_pair<Type>(row, l, b, b + 1 < l.nb);
      for (int r = 0; r < R; ++r) {
        const __m512i x = _mm512_loadu_si512(acts[r]->q.data() + b * QK);
        const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, x);
        const __m512 s = _mm512_permutexvar_ps(_mm512_load_si512(lanes[p]), scale[r]);
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), s, acc[r]);
      }
    }
  }
  for (int r = 0; r < R; ++r) *out[r] = _mm512_reduce_add_ps(acc[r]) + _mm512_reduce_add_ps(offset[r]);
}
#elif defined(__AVX2__)
// The 32 values of block b of a packed row as bytes (unsigned, or signed for Q8_0), in order.
template <int Type>
inline __m256i expand_block(const uint8_t* row, const Layout& l, int64_t b) {
  if (Type == kQ8_0) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + l.qs + b * 32));
  const __m128i nib = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + l.qs + b * 16));
  const __m128i mask = _mm_set1_epi8(0x0F);
  __m256i w = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(nib, 4), mask), _mm_and_si128(nib, mask));
  if (Type == kQ5_0 || Type == kQ5_1) {   // byte t gets 16 when bit t of qh is set
    uint32_t qh;
    std::memcpy(&qh, row + l.qh + b * 4, 4);
    __m256i bits = _mm256_shuffle_epi8(_mm256_set1_epi32(int(qh)),
                                       _mm256_setr_epi64x(0, 0x0101010101010101, 0x0202020202020202, 0x0303030303030303));
    bits = _mm256_cmpeq_epi8(_mm256_or_si256(bits, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe)), _mm256_set1_epi64x(-1));
    w = _mm256_or_si256(w, _mm256_and_si256(bits, _mm256_set1_epi8(0x10)));
  }
  return w;
}

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Eight float16 scales from p (n of them; zeros after).
inline __m256 halves8(const uint8_t* p, int64_t n) {
  if (n == 8) return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  alignas(16) uint16_t h[8] = {};
  std::memcpy(h, p, size_t(2 * n));
  return _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(h)));
}

template <int Type, int R>
void dot_rows(float* const* out, const uint8_t* row, const Layout& l, const Acts* const* acts) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[R], offset[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps(), offset[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < l.nb; g += kGroup) {
    const int64_t n = imin(kGroup, l.nb - g);
    const __m256 dw = halves8(row + 2 * g, n);
    const __m256 cw = (Type == kQ4_1 || Type == kQ5_1) ? halves8(row + l.m + 2 * g, n)
                                                      : _mm256_mul_ps(dw, _mm256_set1_ps(zero_of<Type>()));
    alignas(32) float scale[R][8];
    for (int r = 0; r < R; ++r) {
      _mm256_store_ps(scale[r], _mm256_mul_ps(dw, _mm256_loadu_ps(acts[r]->d.data() + g)));
      offset[r] = _mm256_fmadd_ps(cw, _mm256_loadu_ps(acts[r]->s.data() + g), offset[r]);
    }
    for (int64_t j = 0; j < n; ++j) {
      const int64_t b = g + j;
      const __m256i w = expand_block<Type>(row, l, b);
      for (int r = 0; r < R; ++r) {
        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(acts[r]->q.data() + b * QK));
        // Q8_0's values are signed: |w| times x with w's sign (maddubs needs one unsigned side).
        const __m256i prod = Type == kQ8_0 ? _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w))
                                           : _mm256_maddubs_epi16(w, x);
        const __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(prod, ones));
        acc[r] = _mm256_fmadd_ps(dot, _mm256_broadcast_ss(&scale[r][j]), acc[r]);
      }
    }
  }
  for (int r = 0; r < R; ++r) *out[r] = hsum8(acc[r]) + hsum8(offset[r]);
}
#else
template <int Type, int R>
void dot_rows(float* const* out, const uint8_t* row, const Layout& l, const Acts* const* acts) {
  float acc[R] = {}, offset[R] = {};
  for (int64_t b = 0; b < l.nb; ++b) {
    const float dw = half_to_float(row + 2 * b);
    const float cw = (Type == kQ4_1 || Type == kQ5_1) ? half_to_float(row + l.m + 2 * b) : dw * zero_of<Type>();
    int32_t w[QK];
    if (Type == kQ8_0) {
      for (int t = 0; t < QK; ++t) w[t] = int8_t(row[l.qs + b * 32 + t]);
    } else {
      const uint8_t* qs = row + l.qs + b * 16;
      uint32_t qh = 0;
      if (Type == kQ5_0 || Type == kQ5_1) std::memcpy(&qh, row + l.qh + b * 4, 4);
      for (int t = 0; t < 16; ++t) {
        w[t] = int32_t(qs[t] & 0x0F) | int32_t((qh >> t) & 1) << 4;
        w[t + 16] = int32_t(qs[t] >> 4) | int32_t((qh >> (t + 16)) & 1) << 4;
      }
    }
    for (int r = 0; r < R; ++r) {
      const int8_t* x = acts[r]->q.data() + b * QK;
      int32_t dot = 0;
      for (int t = 0; t < QK; ++t) dot += w[t] * x[t];
      acc[r] += float(dot) * (dw * acts[r]->d[size_t(b)]);
      offset[r] += cw * acts[r]->s[size_t(b)];
    }
  }
  for (int r = 0; r < R; ++r) *out[r] = acc[r] + offset[r];
}
#endif

thread_local std::vector<Acts> act_rows;

template <int Type>
void matmul_rows_typed(float* const* outs, const uint8_t* const* ws, const int64_t* Ns, int64_t parts, const float* a,
                       int64_t M, int64_t K) {
  const Layout l = layout_of(Type, K);
  const int64_t rb = row_bytes_of(Type, K);
  if (int64_t(act_rows.size()) < M) act_rows.resize(size_t(M));
  for (int64_t i = 0; i < M; ++i) quantize_row(act_rows[size_t(i)], a + i * K, K, Type);
  const Acts* rows = act_rows.data();
  // The parts' weight rows are one range of work items, so one parallel region covers them all.
  std::vector<int64_t> first(size_t(parts) + 1, 0);
  for (int64_t p = 0; p < parts; ++p) first[size_t(p) + 1] = first[size_t(p)] + Ns[p];
  // About 2 KB of weights requested ahead of the row being multiplied: decode streams them from
  // memory once per token, and the hardware prefetcher alone leaves the loads waiting.
  const int64_t ahead = (2048 + rb - 1) / rb;
  parallel_for(first[size_t(parts)], imax(1, 32768 / rb), [&](int64_t u0, int64_t u1) {
    int64_t p = 0;
    for (int64_t u = u0; u < u1; ++u) {
      while (u >= first[size_t(p) + 1]) ++p;
      const int64_t j = u - first[size_t(p)], N = Ns[p];
      const uint8_t* row = ws[p] + j * rb;
      if (u + ahead < u1 && j + ahead < N)
        for (int64_t off = 0; off < rb; off += 64) __builtin_prefetch(row + ahead * rb + off, 0, 3);
      float* out = outs[p];
      int64_t i = 0;
      for (; i + 4 <= M; i += 4) {   // four activation rows share each expanded weight
        float* o[4] = {out + i * N + j, out + (i + 1) * N + j, out + (i + 2) * N + j, out + (i + 3) * N + j};
        const Acts* x[4] = {rows + i, rows + i + 1, rows + i + 2, rows + i + 3};
        dot_rows<Type, 4>(o, row, l, x);
      }
      for (; i < M; ++i) {
        float* o[1] = {out + i * N + j};
        const Acts* x[1] = {rows + i};
        dot_rows<Type, 1>(o, row, l, x);
      }
    }
  });
}

}  // namespace

void unpack_row(uint8_t* native, const uint8_t* row, int type, int64_t K) {
  const Layout l = layout_of(type, K);
  const int64_t bb = block_bytes(type);
  const bool has_m = type == kQ4_1 || type == kQ5_1, has_qh = type == kQ5_0 || type == kQ5_1;
  for (int64_t b = 0; b < l.nb; ++b) {
    uint8_t* blk = native + b * bb;
    int64_t at = 2;
    std::memcpy(blk, row + 2 * b, 2);
    if (has_m) std::memcpy(blk + at, row + l.m + 2 * b, 2), at += 2;
    if (has_qh) std::memcpy(blk + at, row + l.qh + 4 * b, 4), at += 4;
    std::memcpy(blk + at, row + l.qs + l.qs_bytes * b, size_t(l.qs_bytes));
  }
}

void pack_quant(uint8_t* out, const uint8_t* w, int type, int64_t rows, int64_t K) {
  const Layout l = layout_of(type, K);
  const int64_t rb = row_bytes_of(type, K), bb = block_bytes(type);
  const bool has_m = type == kQ4_1 || type == kQ5_1, has_qh = type == kQ5_0 || type == kQ5_1;
  parallel_for(rows, imax(1, 65536 / imax(1, rb)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t b = 0; b < l.nb; ++b) {
        const uint8_t* blk = w + r * rb + b * bb;
        uint8_t* row = out + r * rb;
        int64_t at = 2;
        std::memcpy(row + 2 * b, blk, 2);
        if (has_m) std::memcpy(row + l.m + 2 * b, blk + at, 2), at += 2;
        if (has_qh) std::memcpy(row + l.qh + 4 * b, blk + at, 4), at += 4;
        std::memcpy(row + l.qs + l.qs_bytes * b, blk + at, size_t(l.qs_bytes));
      }
  });
}

void matmul_rows(float* const* outs, const uint8_t* const* ws, const int64_t* Ns, int64_t parts, const float* a,
                 int type, int64_t M, int64_t K) {
  switch (type) {
    case kQ4_0: return matmul_rows_typed<kQ4_0>(outs, ws, Ns, parts, a, M, K);
    case kQ4_1: return matmul_rows_typed<kQ4_1>(outs, ws, Ns, parts, a, M, K);
    case kQ5_0: return matmul_rows_typed<kQ5_0>(outs, ws, Ns, parts, a, M, K);
    case kQ5_1: return matmul_rows_typed<kQ5_1>(outs, ws, Ns, parts, a, M, K);
    case kQ8_0: return matmul_rows_typed<kQ8_0>(outs, ws, Ns, parts, a, M, K);
  }
}

}  // namespace PYLLM_ISA
}  // namespace pyllm
