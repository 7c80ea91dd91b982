// Block-quantized weights with their rows interleaved for integer dot products (the model's decode
// and small-batch path): the 32-value types Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0. A packed matrix keeps
// its rows in groups of 16 (the last group holds what is left, n rows), and a group's block b of
// each of its n rows together, at b * n * (block bytes):
//
//   d[n] (f16) | m[n] (f16: Q4_1, Q5_1) | qh[n] (u32: Q5_0, Q5_1) | values: chunks of n lanes of 4 bytes
//
// lane r being the group's row r. For the 4-bit types chunk c (of 4) holds in byte k of a lane the
// row's value 8c+k in the low nibble and 8c+4+k in the high one; for Q8_0 chunk c (of 8) holds
// values 4c..4c+3. So one vector holds four values of 16 rows (8 in AVX2), one dpbusd (AVX-512
// VNNI) or maddubs+madd (AVX2) against four activations broadcast adds their products into each
// row's own lane, the 32 values of a block end in one integer vector, and one conversion and one
// multiply by the rows' scales finish the block for 16 rows: no horizontal sums, no shuffles.
// The same number of bytes as ggml's rows; the layout does not depend on the ISA.
//
// out (M, N) = a (M, K) @ W^T with a rounded per block of 32 to int8 as llama.cpp's Q8_0 rounds it;
// a row's sums run in one fixed order whatever M is and whichever rows share the call, so a batch
// gives each row what it gives alone. Not the native layout's kernels (quant_matmul.cpp), nor the
// K-quants.
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

// Where each field of a group's block starts, in bytes per lane (times n, the group's rows).
struct Fields {
  int64_t m, qh, qs, chunks, bb;   // chunks of values per block; bb: block bytes
};

constexpr Fields fields_of(int type) {
  const bool has_m = type == kQ4_1 || type == kQ5_1, has_qh = type == kQ5_0 || type == kQ5_1;
  const int64_t qh = 2 + (has_m ? 2 : 0), qs = qh + (has_qh ? 4 : 0);
  return Fields{2, qh, qs, type == kQ8_0 ? 8 : 4, qs + (type == kQ8_0 ? 32 : 16)};
}

// Value i (0..31) of a native 4-bit block's 16 bytes: low nibbles are values 0..15, high 16..31.
inline int nibble(const uint8_t* qs, int i) { return i < 16 ? qs[i] & 0x0F : qs[i - 16] >> 4; }

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

// One row of activations rounded for these products: the int8 values in order, each block's scale
// dx and dx times the sum of its values.
struct Acts {
  std::vector<int8_t> q;
  std::vector<float> d, s;
};

void quantize_row(Acts& out, const float* a, int64_t K) {
  const int64_t nb = K / QK;
  out.q.resize(size_t(K));
  out.d.resize(size_t(nb));
  out.s.resize(size_t(nb));
  ActBlock blk;
  for (int64_t b = 0; b < nb; ++b) {
    quantize_activations(&blk, a + b * QK, 1, QK);
    std::memcpy(out.q.data() + b * QK, blk.q, QK);
    out.d[size_t(b)] = blk.d;
    out.s[size_t(b)] = blk.dsum;
  }
}

inline int32_t four(const int8_t* x) {   // four activations as one 32-bit lane
  int32_t v;
  std::memcpy(&v, x, 4);
  return v;
}

// n bytes from p requested into the cache: decode streams the weights from memory once per
// token, and the hardware prefetcher alone leaves the first loads of each group waiting.
inline void request(const uint8_t* p, int64_t n) {
  for (int64_t off = 0; off < n; off += 64) __builtin_prefetch(p + off, 0, 3);
}

#if defined(__AVX512VNNI__)
// The 16 lanes of a group of n rows (n <= 16).
struct Lanes {
  __mmask16 rows;
  __mmask64 bytes;
  explicit Lanes(int64_t n)
      : rows(__mmask16((1u << n) - 1)), bytes(n == 16 ? ~__mmask64(0) : (__mmask64(1) << (4 * n)) - 1) {}
};

// out[r][0..n) = the group's rows . acts[r] for AR activation rows: each weight vector expanded
// once for the AR rows.
template <int Type, int AR>
void group_dot(float* const* out, const uint8_t* group, int64_t n, int64_t nb, const Acts* const* acts) {
  constexpr Fields f = fields_of(Type);
  const Lanes lanes(n);
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  __m512 acc[AR];
  for (int r = 0; r < AR; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = group + b * n * f.bb;
    const int8_t* x[AR];
    for (int r = 0; r < AR; ++r) x[r] = acts[r]->q.data() + b * QK;
    __m512i dot[AR][2];
    for (int r = 0; r < AR; ++r) dot[r][0] = dot[r][1] = _mm512_setzero_si512();
    if (Type == kQ8_0) {
      const __m512i flip = _mm512_set1_epi8(char(0x80));   // signed -> unsigned: value + 128
      for (int c = 0; c < 8; ++c) {
        const __m512i w = _mm512_xor_si512(_mm512_maskz_loadu_epi8(lanes.bytes, blk + f.qs * n + c * 4 * n), flip);
        for (int r = 0; r < AR; ++r)
          dot[r][c & 1] = _mm512_dpbusd_epi32(dot[r][c & 1], w, _mm512_set1_epi32(four(x[r] + 4 * c)));
      }
    } else {
      __m512i qh = _mm512_setzero_si512();
      if (Type == kQ5_0 || Type == kQ5_1) qh = _mm512_maskz_loadu_epi32(lanes.rows, blk + f.qh * n);
      for (int c = 0; c < 4; ++c) {
        const __m512i nib = _mm512_maskz_loadu_epi8(lanes.bytes, blk + f.qs * n + c * 4 * n);
        __m512i lo = _mm512_and_si512(nib, low4), hi = _mm512_and_si512(_mm512_srli_epi16(nib, 4), low4);
        if (Type == kQ5_0 || Type == kQ5_1) {   // fifth bits of values 8c.. : byte c of each lane's qh
          const __m512i idx = _mm512_add_epi32(_mm512_set1_epi32(0x01010101 * c),
                                               _mm512_set4_epi32(0x0C0C0C0C, 0x08080808, 0x04040404, 0));
          const __m512i byte_c = _mm512_shuffle_epi8(qh, idx), sixteen = _mm512_set1_epi8(0x10);
          lo = _mm512_mask_add_epi8(lo, _mm512_test_epi8_mask(byte_c, _mm512_set1_epi32(0x08040201)), lo, sixteen);
          hi = _mm512_mask_add_epi8(hi, _mm512_test_epi8_mask(byte_c, _mm512_set1_epi32(int(0x80402010))), hi, sixteen);
        }
        for (int r = 0; r < AR; ++r) {
          dot[r][0] = _mm512_dpbusd_epi32(dot[r][0], lo, _mm512_set1_epi32(four(x[r] + 8 * c)));
          dot[r][1] = _mm512_dpbusd_epi32(dot[r][1], hi, _mm512_set1_epi32(four(x[r] + 8 * c + 4)));
        }
      }
    }
    const __m512 dw = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(lanes.rows, blk));
    const __m512 cw = (Type == kQ4_1 || Type == kQ5_1)
                          ? _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(lanes.rows, blk + f.m * n))
                          : _mm512_mul_ps(dw, _mm512_set1_ps(zero_of<Type>()));
    for (int r = 0; r < AR; ++r) {
      const __m512 sum = _mm512_cvtepi32_ps(_mm512_add_epi32(dot[r][0], dot[r][1]));
      acc[r] = _mm512_fmadd_ps(sum, _mm512_mul_ps(dw, _mm512_set1_ps(acts[r]->d[size_t(b)])), acc[r]);
      acc[r] = _mm512_fmadd_ps(cw, _mm512_set1_ps(acts[r]->s[size_t(b)]), acc[r]);
    }
  }
  for (int r = 0; r < AR; ++r) _mm512_mask_storeu_ps(out[r], lanes.rows, acc[r]);
}
#elif defined(__AVX2__)
// Lanes [8h, 8h + live) of a group: the 32-bit lanes' load mask.
inline __m256i lane_mask(int64_t live) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(int(live)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

inline __m256i lanes32(const uint8_t* p, __m256i mask, bool full) {
  return full ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
              : _mm256_maskload_epi32(reinterpret_cast<const int*>(p), mask);
}

// Eight float16 scales from p (live of them; zeros after).
inline __m256 halves8(const uint8_t* p, int64_t live) {
  if (live == 8) return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  alignas(16) uint16_t h[8] = {};
  std::memcpy(h, p, size_t(2 * live));
  return _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(h)));
}

// As the AVX-512 version, on the group's lanes 8 at a time: maddubs then madd give each 4-byte
// lane the sum of its four products, as dpbusd does. For the 4-bit types the 16-bit sums of
// several chunks add up before one madd: at most 4 chunks of 2 products of 15 * 127 twice
// (30480), or 2 chunks of Q5's 31 * 127 (31496), inside int16.
template <int Type, int AR>
void group_dot(float* const* out, const uint8_t* group, int64_t n, int64_t nb, const Acts* const* acts) {
  constexpr Fields f = fields_of(Type);
  constexpr int kChunksPerMadd = (Type == kQ5_0 || Type == kQ5_1) ? 2 : 4;
  const __m256i ones = _mm256_set1_epi16(1), low4 = _mm256_set1_epi8(0x0F);
  for (int64_t h = 0; 8 * h < n; ++h) {
    const int64_t live = imin(8, n - 8 * h);
    const bool full = live == 8;
    const __m256i mask = lane_mask(live);
    __m256 acc[AR];
    for (int r = 0; r < AR; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* blk = group + b * n * f.bb;
      const int8_t* x[AR];
      for (int r = 0; r < AR; ++r) x[r] = acts[r]->q.data() + b * QK;
      __m256i dot[AR];
      for (int r = 0; r < AR; ++r) dot[r] = _mm256_setzero_si256();
      if (Type == kQ8_0) {
        for (int c = 0; c < 8; ++c) {
          const __m256i w = lanes32(blk + f.qs * n + c * 4 * n + 32 * h, mask, full);
          const __m256i wabs = _mm256_sign_epi8(w, w);
          for (int r = 0; r < AR; ++r) {   // |w| times x with w's sign: maddubs needs one unsigned side
            const __m256i prod = _mm256_maddubs_epi16(wabs, _mm256_sign_epi8(_mm256_set1_epi32(four(x[r] + 4 * c)), w));
            dot[r] = _mm256_add_epi32(dot[r], _mm256_madd_epi16(prod, ones));
          }
        }
      } else {
        __m256i qh = _mm256_setzero_si256();
        if (Type == kQ5_0 || Type == kQ5_1) qh = lanes32(blk + f.qh * n + 32 * h, mask, full);
        __m256i s16[AR];
        for (int c = 0; c < 4; ++c) {
          const __m256i nib = lanes32(blk + f.qs * n + c * 4 * n + 32 * h, mask, full);
          __m256i lo = _mm256_and_si256(nib, low4), hi = _mm256_and_si256(_mm256_srli_epi16(nib, 4), low4);
          if (Type == kQ5_0 || Type == kQ5_1) {   // fifth bits of values 8c.. : byte c of each lane's qh
            const __m256i idx = _mm256_add_epi32(_mm256_set1_epi32(0x01010101 * c),
                                                 _mm256_setr_epi32(0, 0x04040404, 0x08080808, 0x0C0C0C0C, 0,
                                                                   0x04040404, 0x08080808, 0x0C0C0C0C));
            const __m256i byte_c = _mm256_shuffle_epi8(qh, idx), sixteen = _mm256_set1_epi8(0x10);
            const __m256i bl = _mm256_set1_epi32(0x08040201), bh = _mm256_set1_epi32(int(0x80402010));
            lo = _mm256_or_si256(lo, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(byte_c, bl), bl), sixteen));
            hi = _mm256_or_si256(hi, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(byte_c, bh), bh), sixteen));
          }
          for (int r = 0; r < AR; ++r) {
            const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_set1_epi32(four(x[r] + 8 * c))),
                                               _mm256_maddubs_epi16(hi, _mm256_set1_epi32(four(x[r] + 8 * c + 4))));
            s16[r] = c % kChunksPerMadd == 0 ? p : _mm256_add_epi16(s16[r], p);
            if (c % kChunksPerMadd == kChunksPerMadd - 1)
              dot[r] = _mm256_add_epi32(dot[r], _mm256_madd_epi16(s16[r], ones));
          }
        }
      }
      const __m256 dw = halves8(blk + 16 * h, live);
      const __m256 cw = (Type == kQ4_1 || Type == kQ5_1) ? halves8(blk + f.m * n + 16 * h, live)
                                                         : _mm256_mul_ps(dw, _mm256_set1_ps(zero_of<Type>()));
      for (int r = 0; r < AR; ++r) {
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[r]), _mm256_mul_ps(dw, _mm256_set1_ps(acts[r]->d[size_t(b)])),
                                 acc[r]);
        acc[r] = _mm256_fmadd_ps(cw, _mm256_set1_ps(acts[r]->s[size_t(b)]), acc[r]);
      }
    }
    for (int r = 0; r < AR; ++r) _mm256_maskstore_ps(out[r] + 8 * h, mask, acc[r]);
  }
}
#else
template <int Type, int AR>
void group_dot(float* const* out, const uint8_t* group, int64_t n, int64_t nb, const Acts* const* acts) {
  constexpr Fields f = fields_of(Type);
  for (int64_t lane = 0; lane < n; ++lane)
    for (int r = 0; r < AR; ++r) {
      float acc = 0.f;
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* blk = group + b * n * f.bb;
        const int8_t* x = acts[r]->q.data() + b * QK;
        uint32_t qh = 0;
        if (Type == kQ5_0 || Type == kQ5_1) std::memcpy(&qh, blk + f.qh * n + 4 * lane, 4);
        int32_t dot = 0;
        for (int c = 0; c < f.chunks; ++c)
          for (int k = 0; k < 4; ++k) {
            const uint8_t byte = blk[f.qs * n + c * 4 * n + 4 * lane + k];
            if (Type == kQ8_0) {
              dot += int32_t(int8_t(byte)) * x[4 * c + k];
            } else {
              const int lo = 8 * c + k, hi = lo + 4;
              dot += (int32_t(byte & 0x0F) | int32_t((qh >> lo) & 1) << 4) * x[lo];
              dot += (int32_t(byte >> 4) | int32_t((qh >> hi) & 1) << 4) * x[hi];
            }
          }
        const float dw = half_to_float(blk + 2 * lane);
        const float cw = (Type == kQ4_1 || Type == kQ5_1) ? half_to_float(blk + f.m * n + 2 * lane)
                                                          : dw * zero_of<Type>();
        acc += float(dot) * (dw * acts[r]->d[size_t(b)]);
        acc += cw * acts[r]->s[size_t(b)];
      }
      out[r][lane] = acc;
    }
}
#endif

// Activation rows that share each expanded weight vector (8 measured no faster on AVX-512).
constexpr int64_t kRowTile = 4;

// Every activation row against one group (its outputs at out + j0 of each row of out, N wide),
// kRowTile rows at a time, then one by one.
template <int Type>
void group_rows(float* out, int64_t N, int64_t j0, const uint8_t* group, int64_t n, int64_t nb, const Acts* acts,
                int64_t M) {
  int64_t i = 0;
  for (; i + kRowTile <= M; i += kRowTile) {
    float* o[kRowTile];
    const Acts* x[kRowTile];
    for (int64_t r = 0; r < kRowTile; ++r) o[r] = out + (i + r) * N + j0, x[r] = acts + i + r;
    group_dot<Type, kRowTile>(o, group, n, nb, x);
  }
  for (; i < M; ++i) {
    float* o[1] = {out + i * N + j0};
    const Acts* x[1] = {acts + i};
    group_dot<Type, 1>(o, group, n, nb, x);
  }
}

thread_local std::vector<Acts> act_rows;

template <int Type>
void matmul_rows_typed(float* const* outs, const uint8_t* const* ws, const int64_t* Ns, int64_t parts, const float* a,
                       int64_t M, int64_t K) {
  const int64_t nb = K / QK, rb = row_bytes_of(Type, K);
  if (int64_t(act_rows.size()) < M) act_rows.resize(size_t(M));
  Acts* rows = act_rows.data();   // the caller's (act_rows is per thread)
  parallel_for(M, imax(1, 8192 / imax(1, K)), [&](int64_t i0, int64_t i1) {   // a prompt's rows: many
    for (int64_t i = i0; i < i1; ++i) quantize_row(rows[i], a + i * K, K);
  });
  const Acts* acts = rows;
  // The parts' groups of rows are one range of work items, so one parallel region covers them all.
  std::vector<int64_t> first(size_t(parts) + 1, 0);
  for (int64_t p = 0; p < parts; ++p) first[size_t(p) + 1] = first[size_t(p)] + (Ns[p] + kPackedRows - 1) / kPackedRows;
  // Four work items per thread: each is a run of consecutive groups, one stream from memory for
  // the prefetcher (many small items measured slower: each restarts the stream, and the threads
  // fight over the counter's line), enough of them to even out the threads' speeds.
  const int64_t group_bytes = kPackedRows * rb, groups = first[size_t(parts)];
  const int64_t grain = imax(1, groups / (4 * num_threads()));
  parallel_for(groups, grain, [&](int64_t u0, int64_t u1) {
    int64_t p = 0;
    auto group_at = [&](int64_t u, int64_t& part) {   // the first byte of work item u, of part `part`
      while (u >= first[size_t(part) + 1]) ++part;
      return ws[part] + (u - first[size_t(part)]) * group_bytes;
    };
    for (int64_t u = u0; u < u1; ++u) {
      const uint8_t* group = group_at(u, p);
      const int64_t j0 = (u - first[size_t(p)]) * kPackedRows, n = imin(kPackedRows, Ns[p] - j0);
      if (u + 1 < u1) {   // the next group, requested while this one is multiplied
        int64_t next_part = p;
        request(group_at(u + 1, next_part), group_bytes);
      }
      group_rows<Type>(outs[p], Ns[p], j0, group, n, nb, acts, M);
    }
  });
}

}  // namespace

void unpack_row(uint8_t* native, const uint8_t* w, int64_t N, int64_t row, int type, int64_t K) {
  const Fields f = fields_of(type);
  const int64_t nb = K / QK, rb = row_bytes_of(type, K);
  const int64_t j0 = row / kPackedRows * kPackedRows, n = imin(kPackedRows, N - j0), lane = row - j0;
  const uint8_t* group = w + j0 * rb;
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = group + b * n * f.bb;
    uint8_t* out = native + b * f.bb;
    std::memcpy(out, blk + 2 * lane, 2);
    if (f.m != f.qh) std::memcpy(out + f.m, blk + f.m * n + 2 * lane, 2);
    if (f.qh != f.qs) std::memcpy(out + f.qh, blk + f.qh * n + 4 * lane, 4);
    uint8_t* qs = out + f.qs;
    if (type == kQ8_0) {
      for (int c = 0; c < 8; ++c) std::memcpy(qs + 4 * c, blk + f.qs * n + c * 4 * n + 4 * lane, 4);
      continue;
    }
    std::memset(qs, 0, 16);
    for (int c = 0; c < 4; ++c)
      for (int k = 0; k < 4; ++k) {
        const uint8_t byte = blk[f.qs * n + c * 4 * n + 4 * lane + k];
        const int lo = 8 * c + k, hi = lo + 4;   // values lo and hi: (i % 16)'s byte, nibble i / 16
        qs[lo % 16] |= uint8_t(lo < 16 ? byte & 0x0F : (byte & 0x0F) << 4);
        qs[hi % 16] |= uint8_t(hi < 16 ? byte >> 4 : byte & 0xF0);
      }
  }
}

void pack_quant(uint8_t* out, const uint8_t* w, int type, int64_t rows, int64_t K) {
  const Fields f = fields_of(type);
  const int64_t nb = K / QK, rb = row_bytes_of(type, K);
  const int64_t groups = (rows + kPackedRows - 1) / kPackedRows;
  parallel_for(groups, imax(1, 65536 / imax(1, kPackedRows * rb)), [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t j0 = g * kPackedRows, n = imin(kPackedRows, rows - j0);
      uint8_t* group = out + j0 * rb;
      for (int64_t lane = 0; lane < n; ++lane)
        for (int64_t b = 0; b < nb; ++b) {
          const uint8_t* in = w + (j0 + lane) * rb + b * f.bb;
          uint8_t* blk = group + b * n * f.bb;
          std::memcpy(blk + 2 * lane, in, 2);
          if (f.m != f.qh) std::memcpy(blk + f.m * n + 2 * lane, in + f.m, 2);
          if (f.qh != f.qs) std::memcpy(blk + f.qh * n + 4 * lane, in + f.qh, 4);
          const uint8_t* qs = in + f.qs;
          for (int c = 0; c < f.chunks; ++c)
            for (int k = 0; k < 4; ++k)
              blk[f.qs * n + c * 4 * n + 4 * lane + k] =
                  type == kQ8_0 ? qs[4 * c + k] : uint8_t(nibble(qs, 8 * c + k) | nibble(qs, 8 * c + 4 + k) << 4);
        }
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
