// Matmul against weights kept in ggml's block-quantized formats (Q8_0, Q4_0, Q4_1: blocks of 32
// values with a float16 scale, and for Q4_1 a float16 minimum; Q5_0 and Q5_1 with a fifth bit per
// value; the K-quants Q4_K and Q6_K: super-blocks of 256 values with per-sub-block scales),
// activations in float32. Q8_0, Q4_0, Q4_1 (and with int8 activations Q5_0, Q5_1) have
// register-level decode paths; the other types expand each row to floats first.
// out (M, N) = a (M, K) @ W^T with W (N, K) stored row by row as K/32 blocks.
//
// Decode-sized M: each weight block is expanded to 32 floats once and multiplied with every row
// of a; the scale is applied per block, and Q4_1's minimum (and Q4_0's offset of 8) through the
// per-block sums of a, computed once per call. Larger M: the weights are expanded to float32
// in parallel and the GEMM does the product.
#include <cmath>
#include <cstring>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "kernels/isa.h"
#include "threads.h"

namespace pyllm {
namespace PYLLM_ISA {
namespace {

constexpr int64_t QK = 32;

inline float half_to_float(const uint8_t* p) {
  _Float16 h;   // one vcvtph2ps where the ISA has F16C, a library conversion elsewhere
  std::memcpy(&h, p, 2);
  return float(h);
}

// sum over the block's 32 values of q[t] * x[t], q the raw quantized integers (before the zero
// point, scale and minimum), widened to floats in registers. GCC's generic vector conversion
// from bytes is scalarised, so the x86 widths use the widening instructions directly.
inline vf block_dot(const uint8_t* blk, int type, const float* x) {
#if defined(__AVX512F__) && !defined(PYLLM_FORCE_WIDTH)
  {
    if (type == kQ8_0) {
      const __m128i* v = reinterpret_cast<const __m128i*>(blk + 2);
      const __m512 a = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(v)));
      const __m512 b = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(v + 1)));
      return vf(a) * load(x) + vf(b) * load(x + 16);
    }
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + (type == kQ4_1 ? 4 : 2)));
    const __m128i mask = _mm_set1_epi8(0x0F);
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(bytes, mask)));
    const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(bytes, 4), mask)));
    return vf(lo) * load(x) + vf(hi) * load(x + 16);
  }
#elif defined(__AVX2__) && !defined(PYLLM_FORCE_WIDTH)
  {
    if (type == kQ8_0) {
      const __m128i v0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 2));
      const __m128i v1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 18));
      vf s = vf(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v0))) * load(x);
      s += vf(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v0, 8)))) * load(x + 8);
      s += vf(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v1))) * load(x + 16);
      s += vf(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v1, 8)))) * load(x + 24);
      return s;
    }
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + (type == kQ4_1 ? 4 : 2)));
    const __m128i mask = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(bytes, mask), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
    vf s = vf(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo))) * load(x);
    s += vf(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)))) * load(x + 8);
    s += vf(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi))) * load(x + 16);
    s += vf(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)))) * load(x + 24);
    return s;
  }
#else
  vf s = splat(0.f);
  alignas(64) float q[QK];
  if (type == kQ8_0) {
    const int8_t* v = reinterpret_cast<const int8_t*>(blk + 2);
    for (int t = 0; t < QK; ++t) q[t] = float(v[t]);
  } else {
    const uint8_t* packed = blk + (type == kQ4_1 ? 4 : 2);
    for (int t = 0; t < QK / 2; ++t) {   // low nibbles are values 0..15, high ones 16..31
      q[t] = float(packed[t] & 0x0F);
      q[t + QK / 2] = float(packed[t] >> 4);
    }
  }
  for (int64_t t = 0; t < QK; t += W) s += load(q + t) * load(x + t);
  return s;
#endif
}

int64_t block_bytes(int type) { return quant_block_bytes(type); }

// Bytes of one row of K values.
int64_t row_bytes_of(int type, int64_t K) { return K / quant_block_values(type) * quant_block_bytes(type); }

// Types without a register-level float path: their rows are expanded to floats before a product
// with float activations (Q5_0 and Q5_1 do have the integer path).
bool expanded_per_row(int type) { return type == kQ5_0 || type == kQ5_1 || type == kQ4_K || type == kQ6_K; }

// Q4_K's packed 6-bit scale and minimum of sub-block j (of 8) from its 12 bytes.
inline void k4_scale_min(int j, const uint8_t* s, int& scale, int& min) {
  if (j < 4) {
    scale = s[j] & 63;
    min = s[j + 4] & 63;
  } else {
    scale = (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4);
    min = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

#if defined(__AVX2__)
// 32 bytes (unsigned) as floats, scale_t * (v[t] - zero) - offset_t with (scale, offset) the first
// pair for t < 16, the second after (the K-quants' sub-block scales), handed to sink(t, 8 floats).
template <class Sink>
inline void bytes_as_floats(__m256i v, int zero, float s0, float o0, float s1, float o1, int base, Sink& sink) {
  const __m128i lo = _mm256_castsi256_si128(v), hi = _mm256_extracti128_si256(v, 1);
  const __m256i z = _mm256_set1_epi32(zero);
  const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
  for (int c = 0; c < 4; ++c) {
    const __m256 f = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(parts[c]), z));
    const float s = c < 2 ? s0 : s1, o = c < 2 ? o0 : o1;
    sink(base + 8 * c, _mm256_sub_ps(_mm256_mul_ps(_mm256_set1_ps(s), f), _mm256_set1_ps(o)));
  }
}

// The 256 values of a Q4_K or Q6_K super-block, 8 at a time, to sink(position, values).
template <class Sink>
inline void k_block_values(const uint8_t* blk, int type, Sink& sink) {
  if (type == kQ4_K) {
    const float d = half_to_float(blk), dmin = half_to_float(blk + 2);
    const __m256i mask = _mm256_set1_epi8(0x0F);
    for (int j = 0; j < 8; j += 2) {
      int s0, m0, s1, m1;
      k4_scale_min(j, blk + 4, s0, m0);
      k4_scale_min(j + 1, blk + 4, s1, m1);
      const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 16 + 16 * j));
      const float d0 = d * float(s0), o0 = dmin * float(m0), d1 = d * float(s1), o1 = dmin * float(m1);
      bytes_as_floats(_mm256_and_si256(q, mask), 0, d0, o0, d0, o0, 32 * j, sink);
      bytes_as_floats(_mm256_and_si256(_mm256_srli_epi16(q, 4), mask), 0, d1, o1, d1, o1, 32 * j + 32, sink);
    }
    return;
  }
  const uint8_t* ql = blk;
  const uint8_t* qh = blk + 128;
  const int8_t* sc = reinterpret_cast<const int8_t*>(blk + 192);
  const float d = half_to_float(blk + 208);
  const __m256i low_mask = _mm256_set1_epi8(0x0F), two_bits = _mm256_set1_epi8(3);
  for (int half = 0; half < 2; ++half, ql += 64, qh += 32, sc += 8) {
    const __m256i high = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qh));
    for (int i = 0; i < 4; ++i) {
      __m256i low = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql + 32 * (i & 1)));
      if (i >= 2) low = _mm256_srli_epi16(low, 4);
      const __m256i hb = _mm256_and_si256(_mm256_srl_epi16(high, _mm_cvtsi32_si128(2 * i)), two_bits);
      const __m256i q = _mm256_or_si256(_mm256_and_si256(low, low_mask), _mm256_slli_epi16(hb, 4));
      bytes_as_floats(q, 32, d * float(sc[2 * i]), 0.f, d * float(sc[2 * i + 1]), 0.f, 128 * half + 32 * i, sink);
    }
  }
}
#endif

// The values of one block of an expanded_per_row type, as ggml's dequantize_row_* compute them.
void expand_block_to_floats(const uint8_t* blk, int type, float* y) {
#if defined(__AVX2__)
  if (type == kQ4_K || type == kQ6_K) {
    auto store_values = [y](int t, __m256 v) { _mm256_storeu_ps(y + t, v); };
    return k_block_values(blk, type, store_values);
  }
#endif
  if (type == kQ5_0 || type == kQ5_1) {   // value = (nibble | fifth bit << 4) [- 16] * d [+ m]
    const float d = half_to_float(blk), m = type == kQ5_1 ? half_to_float(blk + 2) : 0.f;
    const uint8_t* high = blk + (type == kQ5_1 ? 4 : 2);
    const uint32_t qh = uint32_t(high[0]) | uint32_t(high[1]) << 8 | uint32_t(high[2]) << 16 | uint32_t(high[3]) << 24;
    const uint8_t* qs = high + 4;
    const int offset = type == kQ5_0 ? 16 : 0;
    for (int j = 0; j < 16; ++j) {
      const int x0 = int((qs[j] & 0x0F) | (((qh >> j) << 4) & 0x10)) - offset;
      const int x1 = int((qs[j] >> 4) | ((qh >> (j + 12)) & 0x10)) - offset;
      y[j] = float(x0) * d + m;
      y[j + 16] = float(x1) * d + m;
    }
    return;
  }
  if (type == kQ4_K) {
    const float d = half_to_float(blk), dmin = half_to_float(blk + 2);
    const uint8_t* scales = blk + 4;
    const uint8_t* q = blk + 16;
    for (int j = 0; j < 8; j += 2, y += 64, q += 32) {   // two sub-blocks share 32 bytes: low, high nibbles
      int s0, m0, s1, m1;
      k4_scale_min(j, scales, s0, m0);
      k4_scale_min(j + 1, scales, s1, m1);
      const float d0 = d * float(s0), o0 = dmin * float(m0), d1 = d * float(s1), o1 = dmin * float(m1);
      for (int l = 0; l < 32; ++l) {
        y[l] = d0 * float(q[l] & 0x0F) - o0;
        y[l + 32] = d1 * float(q[l] >> 4) - o1;
      }
    }
    return;
  }
  // Q6_K: 4 low bits in ql, 2 high bits in qh, 16 signed scales (one per 16 values), offset 32.
  const uint8_t* ql = blk;
  const uint8_t* qh = blk + 128;
  const int8_t* sc = reinterpret_cast<const int8_t*>(blk + 192);
  const float d = half_to_float(blk + 208);
  // Value 32 i + l of each half (i = 0..3, l = 0..31): bits of ql[l + 32 (i & 1)] (low nibble for
  // i < 2) and bits 2i, 2i + 1 of qh[l]; scale sc[2 i + l / 16]. Loops of 16 with one scale each,
  // so the compiler vectorises them.
  for (int half = 0; half < 2; ++half, y += 128, ql += 64, qh += 32, sc += 8)
    for (int i = 0; i < 4; ++i)
      for (int l0 = 0; l0 < 32; l0 += 16) {
        const float scale = d * float(sc[2 * i + l0 / 16]);
        const uint8_t* low = ql + 32 * (i & 1) + l0;
        const uint8_t* high = qh + l0;
        const int shift = 4 * (i >> 1);
        float* out = y + 32 * i + l0;
        for (int l = 0; l < 16; ++l) {
          const int q = int(((low[l] >> shift) & 0x0F) | (((high[l] >> (2 * i)) & 3) << 4)) - 32;
          out[l] = scale * float(q);
        }
      }
}

// The 32 quantized values of a block as floats (without scale or minimum), and its scale/min.
inline void expand_block(const uint8_t* blk, int type, float* q, float& d, float& m) {
  d = half_to_float(blk);
  m = 0.f;
  if (type == kQ8_0) {
    const int8_t* v = reinterpret_cast<const int8_t*>(blk + 2);
    for (int t = 0; t < QK; ++t) q[t] = float(v[t]);
    return;
  }
  const uint8_t* packed = blk + (type == kQ4_1 ? 4 : 2);
  if (type == kQ4_1) m = half_to_float(blk + 2);
  for (int t = 0; t < QK / 2; ++t) {
    q[t] = float(packed[t] & 0x0F);
    q[t + QK / 2] = float(packed[t] >> 4);
  }
}

// The offset added to every value of a block before the scale: -8 for Q4_0, else 0.
inline float zero_point(int type) { return type == kQ4_0 ? -8.f : 0.f; }

thread_local ThreadBuffer block_sums_buffer, expanded_weights;

}  // namespace

void dequantize_rows(float* out, const uint8_t* w, int type, int64_t rows, int64_t K) {
  if (expanded_per_row(type)) {
    const int64_t bv = quant_block_values(type), nb = K / bv, bb = block_bytes(type);
    parallel_for(rows, imax(1, 16384 / imax(1, K)), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t b = 0; b < nb; ++b) expand_block_to_floats(w + (r * nb + b) * bb, type, out + r * K + b * bv);
    });
    return;
  }
  const int64_t nb = K / QK, bb = block_bytes(type);
  parallel_for(rows, imax(1, 16384 / imax(1, K)), [&](int64_t r0, int64_t r1) {
    alignas(64) float q[QK];
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t b = 0; b < nb; ++b) {
        float d, m;
        expand_block(w + (r * nb + b) * bb, type, q, d, m);
        const float z = zero_point(type);
        float* o = out + r * K + b * QK;
        for (int t = 0; t < QK; ++t) o[t] = (q[t] + z) * d + m;
      }
  });
}

namespace {

// One block of activations quantized as llama.cpp's Q8_0/Q8_1 do: d = max|x| / 127 (stored as
// float16), q = x / d rounded to the nearest integer (ties to even), and d times the sum of the q
// (what Q4_0's zero point and Q4_1's minimum multiply).
struct ActBlock {
  alignas(32) int8_t q[QK];
  float d;
  float dsum;
};

inline float round_to_half(float x) { return float(_Float16(x)); }

void quantize_activations(ActBlock* out, const float* a, int64_t M, int64_t K) {
  const int64_t nb = K / QK;
  for (int64_t i = 0; i < M; ++i)
    for (int64_t b = 0; b < nb; ++b) {
      const float* x = a + i * K + b * QK;
      float amax = 0.f;
      for (int t = 0; t < QK; ++t) amax = std::fmax(amax, std::fabs(x[t]));
      ActBlock& blk = out[i * nb + b];
      blk.d = round_to_half(amax / 127.f);
      const float inv = blk.d != 0.f ? 1.f / blk.d : 0.f;
      int32_t sum = 0;
      for (int t = 0; t < QK; ++t) {
        const int v = int(std::nearbyint(x[t] * inv));
        blk.q[t] = int8_t(v < -127 ? -127 : v > 127 ? 127 : v);
        sum += blk.q[t];
      }
      blk.dsum = blk.d * float(sum);
    }
}

// The activations rounded as quantize_activations does, back in float32 (for the GEMM path).
void fake_quantize_activations(float* out, const float* a, int64_t M, int64_t K) {
  ActBlock blk;
  for (int64_t i = 0; i < M; ++i)
    for (int64_t b = 0; b < K / QK; ++b) {
      quantize_activations(&blk, a + i * K + b * QK, 1, QK);
      for (int t = 0; t < QK; ++t) out[i * K + b * QK + t] = float(blk.q[t]) * blk.d;
    }
}

// The activations rounded as llama.cpp's Q8_K (what it multiplies K-quant weights with) rounds
// them, back in float32: per block of 256, the value of largest magnitude maps to -127, the
// scale is kept as a float32 (1 / iscale), q = nearest integer (ties even), at most 127.
void fake_quantize_activations_k(float* out, const float* a, int64_t M, int64_t K) {
  for (int64_t i = 0; i < M; ++i)
    for (int64_t b = 0; b < K / 256; ++b) {
      const float* x = a + i * K + b * 256;
      float* y = out + i * K + b * 256;
      float amax = 0.f, max = 0.f;
      for (int t = 0; t < 256; ++t)
        if (std::fabs(x[t]) > amax) amax = std::fabs(x[t]), max = x[t];
      if (amax == 0.f) {
        for (int t = 0; t < 256; ++t) y[t] = 0.f;
        continue;
      }
      const float iscale = -127.f / max, d = 1.f / iscale;
      for (int t = 0; t < 256; ++t) y[t] = std::fmin(127.f, std::nearbyint(iscale * x[t])) * d;
    }
}

// The weight block's scale and (Q4_1, Q5_1) minimum.
template <int Type>
inline void block_scales(const uint8_t* blk, float& d, float& m) {
  d = half_to_float(blk);
  m = Type == kQ4_1 || Type == kQ5_1 ? half_to_float(blk + 2) : 0.f;
}

// Q5's fifth bits of a block, little-endian (bit j belongs to value j).
template <int Type>
inline uint32_t fifth_bits(const uint8_t* blk) {
  uint32_t qh;
  std::memcpy(&qh, blk + (Type == kQ5_1 ? 4 : 2), 4);
  return qh;
}

// Where a block's packed nibbles start.
template <int Type>
constexpr int64_t nibbles_at() { return Type == kQ4_0 ? 2 : Type == kQ4_1 ? 4 : Type == kQ5_0 ? 6 : 8; }

#if defined(__AVX2__)
// Eight partial sums (int32 lanes) of (raw quantized weight) * (quantized activation) over a block.
template <int Type>
inline __m256i block_idot8(const uint8_t* blk, __m256i x) {
  __m256i products;
  if (Type == kQ8_0) {   // signed x signed: |w| times x with w's sign, as maddubs needs one unsigned side
    const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2));
    products = _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(x, wv));
  } else {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + nibbles_at<Type>()));
    const __m128i mask = _mm_set1_epi8(0x0F);
    __m256i wv = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(bytes, 4), mask), _mm_and_si128(bytes, mask));
    if (Type == kQ5_0 || Type == kQ5_1) {   // byte j gets 16 when bit j of the fifth bits is set
      __m256i bits = _mm256_shuffle_epi8(_mm256_set1_epi32(int(fifth_bits<Type>(blk))),
                                         _mm256_setr_epi64x(0, 0x0101010101010101, 0x0202020202020202,
                                                            0x0303030303030303));
      bits = _mm256_cmpeq_epi8(_mm256_or_si256(bits, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe)), _mm256_set1_epi64x(-1));
      wv = _mm256_or_si256(wv, _mm256_and_si256(bits, _mm256_set1_epi8(0x10)));
    }
    products = _mm256_maddubs_epi16(wv, x);    // values 0..15 (0..31 for Q5) are unsigned
  }
  return _mm256_madd_epi16(products, _mm256_set1_epi16(1));
}

inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#else
// The sum over a block of (raw quantized weight) * (quantized activation), as an integer.
template <int Type>
inline int32_t block_idot(const uint8_t* blk, const int8_t* xq) {
  int32_t s = 0;
  if (Type == kQ8_0) {
    const int8_t* v = reinterpret_cast<const int8_t*>(blk + 2);
    for (int t = 0; t < QK; ++t) s += int32_t(v[t]) * xq[t];
  } else {
    const uint8_t* packed = blk + nibbles_at<Type>();
    const uint32_t qh = Type == kQ5_0 || Type == kQ5_1 ? fifth_bits<Type>(blk) : 0u;
    for (int t = 0; t < QK / 2; ++t) {
      const int32_t lo = int32_t(packed[t] & 0x0F) | int32_t((qh >> t) & 1) << 4;
      const int32_t hi = int32_t(packed[t] >> 4) | int32_t((qh >> (t + 16)) & 1) << 4;
      s += lo * xq[t] + hi * xq[t + QK / 2];
    }
  }
  return s;
}
#endif

// out[r] for R consecutive weight rows against one row of quantized activations: each
// activation block is loaded once for the R rows, which also gives R independent sums.
template <int Type, int R>
inline void rows_dot(float* out, const uint8_t* rows, int64_t row_bytes, const ActBlock* x,
                     int64_t nb) {
  constexpr int64_t bb = Type == kQ8_0 ? 2 + QK : nibbles_at<Type>() + QK / 2;
  float extra[R];   // Q4_0's zero point and Q4_1's minimum, through the activation block sums
#if defined(__AVX2__)
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps(), extra[r] = 0.f;
  for (int64_t b = 0; b < nb; ++b) {
    const __m256i xq = _mm256_load_si256(reinterpret_cast<const __m256i*>(x[b].q));
    for (int r = 0; r < R; ++r) {
      const uint8_t* blk = rows + r * row_bytes + b * bb;
      float dw, mw;
      block_scales<Type>(blk, dw, mw);
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block_idot8<Type>(blk, xq)), _mm256_set1_ps(dw * x[b].d), acc[r]);
      if (Type == kQ4_0) extra[r] -= 8.f * dw * x[b].dsum;
      if (Type == kQ5_0) extra[r] -= 16.f * dw * x[b].dsum;
      if (Type == kQ4_1 || Type == kQ5_1) extra[r] += mw * x[b].dsum;
    }
  }
  for (int r = 0; r < R; ++r) out[r] = hsum256(acc[r]) + extra[r];
#else
  float acc[R];
  for (int r = 0; r < R; ++r) acc[r] = 0.f, extra[r] = 0.f;
  for (int64_t b = 0; b < nb; ++b)
    for (int r = 0; r < R; ++r) {
      const uint8_t* blk = rows + r * row_bytes + b * bb;
      float dw, mw;
      block_scales<Type>(blk, dw, mw);
      acc[r] += dw * x[b].d * float(block_idot<Type>(blk, x[b].q));
      if (Type == kQ4_0) extra[r] -= 8.f * dw * x[b].dsum;
      if (Type == kQ5_0) extra[r] -= 16.f * dw * x[b].dsum;
      if (Type == kQ4_1 || Type == kQ5_1) extra[r] += mw * x[b].dsum;
    }
  for (int r = 0; r < R; ++r) out[r] = acc[r] + extra[r];
#endif
}

thread_local std::vector<ActBlock> act_blocks;
thread_local ThreadBuffer fake_quantized;

template <int Type>
void matmul_quant_int8_typed(float* out, const ActBlock* xs, const uint8_t* w, int64_t M, int64_t K, int64_t N) {
  constexpr int R = Type == kQ8_0 ? 1 : 4;
  const int64_t nb = K / QK, row_bytes = nb * block_bytes(Type);
  // Prefetch distance: about 2 KB of weights ahead, in whole groups.
  const int64_t ahead = (2048 + R * row_bytes - 1) / (R * row_bytes);
  // Work items are groups of R weight rows.
  const int64_t groups = (N + R - 1) / R;
  parallel_for(groups, imax(1, 32768 / (R * row_bytes)), [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t j = g * R;
      const uint8_t* rows = w + j * row_bytes;
      // The next groups' rows, requested now: decode streams the weights from memory once per
      // token, and the hardware prefetcher alone leaves the loads waiting.
      if (g + ahead < g1) {
        const uint8_t* next = rows + ahead * R * row_bytes;
        for (int64_t off = 0; off < R * row_bytes; off += 64) __builtin_prefetch(next + off, 0, 3);
      }
      for (int64_t i = 0; i < M; ++i) {
        if (j + R <= N) {
          rows_dot<Type, R>(out + i * N + j, rows, row_bytes, xs + i * nb, nb);
        } else {
          for (int64_t jj = j; jj < N; ++jj)
            rows_dot<Type, 1>(out + i * N + jj, w + jj * row_bytes, row_bytes, xs + i * nb, nb);
        }
      }
    }
  });
}

void matmul_quant_int8(float* out, const float* a, const uint8_t* w, int type, int64_t M, int64_t K,
                       int64_t N) {
  act_blocks.resize(size_t(M * (K / QK)));
  ActBlock* xs = act_blocks.data();
  quantize_activations(xs, a, M, K);
  switch (type) {
    case kQ8_0: return matmul_quant_int8_typed<kQ8_0>(out, xs, w, M, K, N);
    case kQ4_0: return matmul_quant_int8_typed<kQ4_0>(out, xs, w, M, K, N);
    case kQ4_1: return matmul_quant_int8_typed<kQ4_1>(out, xs, w, M, K, N);
    case kQ5_0: return matmul_quant_int8_typed<kQ5_0>(out, xs, w, M, K, N);
    case kQ5_1: return matmul_quant_int8_typed<kQ5_1>(out, xs, w, M, K, N);
  }
}

#if defined(__AVX2__)
// A block of 256 activations rounded as llama.cpp's Q8_K: int8 values, a float32 scale, and the
// sum of every 16 values (what the K-quants' minima and Q6_K's offset multiply).
struct ActBlockK {
  alignas(32) int8_t q[256];
  float d;
  int32_t bsums[16];
};

void quantize_activations_k(ActBlockK* out, const float* a, int64_t M, int64_t K) {
  for (int64_t i = 0; i < M; ++i)
    for (int64_t b = 0; b < K / 256; ++b) {
      const float* x = a + i * K + b * 256;
      ActBlockK& blk = out[i * (K / 256) + b];
      float amax = 0.f, max = 0.f;
      for (int t = 0; t < 256; ++t)
        if (std::fabs(x[t]) > amax) amax = std::fabs(x[t]), max = x[t];
      const float iscale = amax != 0.f ? -127.f / max : 0.f;
      blk.d = amax != 0.f ? 1.f / iscale : 0.f;
      for (int t = 0; t < 256; ++t) blk.q[t] = int8_t(std::fmin(127.f, std::nearbyint(iscale * x[t])));
      for (int k = 0; k < 16; ++k) {
        int32_t s = 0;
        for (int t = 0; t < 16; ++t) s += blk.q[16 * k + t];
        blk.bsums[k] = s;
      }
    }
}

inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// One K-quant super-block of weights against one of activations, in integers as llama.cpp does:
// sum over values of (d sc q - dmin m) (Q4_K) or d sc (q - 32) (Q6_K), times q_x d_x.
template <int Type>
inline float k_block_idot(const uint8_t* blk, const ActBlockK& x) {
  const __m256i ones = _mm256_set1_epi16(1), nibble = _mm256_set1_epi8(0x0F);
  __m256i isum = _mm256_setzero_si256();
  if (Type == kQ4_K) {
    int32_t mins = 0;
    for (int g = 0; g < 4; ++g) {
      int s0, m0, s1, m1;
      k4_scale_min(2 * g, blk + 4, s0, m0);
      k4_scale_min(2 * g + 1, blk + 4, s1, m1);
      const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 16 + 32 * g));
      const __m256i ylo = _mm256_load_si256(reinterpret_cast<const __m256i*>(x.q + 64 * g));
      const __m256i yhi = _mm256_load_si256(reinterpret_cast<const __m256i*>(x.q + 64 * g + 32));
      const __m256i plo = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_and_si256(q, nibble), ylo), ones);
      const __m256i phi = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(q, 4), nibble),
                                                                 yhi), ones);
      isum = _mm256_add_epi32(isum, _mm256_add_epi32(_mm256_mullo_epi32(plo, _mm256_set1_epi32(s0)),
                                                     _mm256_mullo_epi32(phi, _mm256_set1_epi32(s1))));
      mins += m0 * (x.bsums[4 * g] + x.bsums[4 * g + 1]) + m1 * (x.bsums[4 * g + 2] + x.bsums[4 * g + 3]);
    }
    const float d = half_to_float(blk), dmin = half_to_float(blk + 2);
    return d * x.d * float(hsum_epi32(isum)) - dmin * x.d * float(mins);
  }
  const uint8_t* ql = blk;
  const uint8_t* qh = blk + 128;
  const int8_t* sc = reinterpret_cast<const int8_t*>(blk + 192);
  const __m256i two_bits = _mm256_set1_epi8(3);
  int32_t offset = 0;   // 32 times the scaled activation sums: the values are q - 32
  for (int half = 0; half < 2; ++half) {
    const __m256i high = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qh + 32 * half));
    for (int i = 0; i < 4; ++i) {
      __m256i low = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql + 64 * half + 32 * (i & 1)));
      if (i >= 2) low = _mm256_srli_epi16(low, 4);
      const __m256i hb = _mm256_and_si256(_mm256_srl_epi16(high, _mm_cvtsi32_si128(2 * i)), two_bits);
      const __m256i q = _mm256_or_si256(_mm256_and_si256(low, nibble), _mm256_slli_epi16(hb, 4));   // 0..63
      const __m256i y = _mm256_load_si256(reinterpret_cast<const __m256i*>(x.q + 128 * half + 32 * i));
      const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(q, y), ones);   // lanes 0-3: values 0-15
      const int k = 8 * half + 2 * i;                                          // the scale of values 0-15
      isum = _mm256_add_epi32(isum, _mm256_mullo_epi32(p, _mm256_setr_epi32(sc[k], sc[k], sc[k], sc[k], sc[k + 1],
                                                                            sc[k + 1], sc[k + 1], sc[k + 1])));
      offset += 32 * (sc[k] * x.bsums[k] + sc[k + 1] * x.bsums[k + 1]);
    }
  }
  return half_to_float(blk + 208) * x.d * float(hsum_epi32(isum) - offset);
}

thread_local std::vector<ActBlockK> act_blocks_k;

template <int Type>
void matmul_k_quant_int8_typed(float* out, const ActBlockK* xs, const uint8_t* w, int64_t M, int64_t K, int64_t N) {
  const int64_t nb = K / 256, rb = row_bytes_of(Type, K);
  const int64_t ahead = (2048 + rb - 1) / rb;
  parallel_for(N, imax(1, 32768 / rb), [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const uint8_t* row = w + j * rb;
      if (j + ahead < j1)
        for (int64_t off = 0; off < rb; off += 64) __builtin_prefetch(row + ahead * rb + off, 0, 3);
      for (int64_t i = 0; i < M; ++i) {
        float acc = 0.f;
        for (int64_t b = 0; b < nb; ++b) acc += k_block_idot<Type>(row + b * block_bytes(Type), xs[i * nb + b]);
        out[i * N + j] = acc;
      }
    }
  });
}

void matmul_k_quant_int8(float* out, const float* a, const uint8_t* w, int type, int64_t M, int64_t K, int64_t N) {
  act_blocks_k.resize(size_t(M * (K / 256)));
  quantize_activations_k(act_blocks_k.data(), a, M, K);
  if (type == kQ4_K) return matmul_k_quant_int8_typed<kQ4_K>(out, act_blocks_k.data(), w, M, K, N);
  return matmul_k_quant_int8_typed<kQ6_K>(out, act_blocks_k.data(), w, M, K, N);
}
#endif

thread_local ThreadBuffer expanded_row;

// Decode-sized M with expanded_per_row weights: each row expanded into a buffer that stays in L1,
// then dotted with every row of a.
void matmul_expanded_rows(float* out, const float* a, const uint8_t* w, int type, int64_t M, int64_t K,
                         int64_t N) {
  const int64_t rb = row_bytes_of(type, K), bv = quant_block_values(type), nb = K / bv;
  parallel_for(N, imax(1, 16384 / imax(1, rb)), [&](int64_t j0, int64_t j1) {
    float* row = expanded_row.get(size_t(K));
    for (int64_t j = j0; j < j1; ++j) {
#if defined(__AVX2__)
      if (M == 1 && (type == kQ4_K || type == kQ6_K)) {   // decode: the values go straight into the sums
        __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
        for (int64_t b = 0; b < nb; ++b) {
          const float* x = a + b * 256;
          auto accumulate = [&](int t, __m256 v) { acc[(t >> 3) & 1] = _mm256_fmadd_ps(v, _mm256_loadu_ps(x + t), acc[(t >> 3) & 1]); };
          k_block_values(w + j * rb + b * block_bytes(type), type, accumulate);
        }
        out[j] = hsum256(_mm256_add_ps(acc[0], acc[1]));
        continue;
      }
#endif
      for (int64_t b = 0; b < nb; ++b) expand_block_to_floats(w + j * rb + b * block_bytes(type), type, row + b * bv);
      for (int64_t i = 0; i < M; ++i) {
        const float* x = a + i * K;
        vf acc0 = splat(0.f), acc1 = splat(0.f);
        for (int64_t t = 0; t < K; t += 2 * W) {   // K is a multiple of 32, so of 2 W
          acc0 += load(row + t) * load(x + t);
          acc1 += load(row + t + W) * load(x + t + W);
        }
        out[i * N + j] = hsum(acc0 + acc1);
      }
    }
  });
}

void matmul_quant_float(float* out, const float* a, const uint8_t* w, int type, int64_t M, int64_t K,
                        int64_t N) {
  if (M > 4) {
    // Row chunks of W expanded into a buffer of about 4 MB, each multiplied by the GEMM.
    const int64_t chunk = imax(1, imin(N, (int64_t(1) << 20) / imax(1, K)));
    float* wf = expanded_weights.get(size_t(chunk * K));
    for (int64_t j0 = 0; j0 < N; j0 += chunk) {
      const int64_t n = imin(chunk, N - j0);
      dequantize_rows(wf, w + j0 * row_bytes_of(type, K), type, n, K);
      gemm(M, n, K, MatView{a, K, 1}, MatView{wf, 1, K}, out + j0, N, false);
    }
    return;
  }
  if (expanded_per_row(type)) return matmul_expanded_rows(out, a, w, type, M, K, N);
  const int64_t nb = K / QK, bb = block_bytes(type);
  // Per row of a: the sum of each block of K (for the minimum and the zero point).
  float* sums = block_sums_buffer.get(size_t(M * nb));
  for (int64_t i = 0; i < M; ++i)
    for (int64_t b = 0; b < nb; ++b) {
      vf s = splat(0.f);
      for (int64_t t = 0; t < QK; t += W) s += load(a + i * K + b * QK + t);
      sums[i * nb + b] = hsum(s);
    }
  const float z = zero_point(type);
  parallel_for(N, imax(1, 8192 / imax(1, K)), [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      vf acc[4];
      float extra[4] = {0.f, 0.f, 0.f, 0.f};
      for (int64_t i = 0; i < M; ++i) acc[i] = splat(0.f);
      const uint8_t* row = w + j * nb * bb;
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* blk = row + b * bb;
        const float d = half_to_float(blk);
        const float m = type == kQ4_1 ? half_to_float(blk + 2) : 0.f;
        const vf dv = splat(d);
        for (int64_t i = 0; i < M; ++i) {
          acc[i] += block_dot(blk, type, a + i * K + b * QK) * dv;
          extra[i] += (m + z * d) * sums[i * nb + b];
        }
      }
      for (int64_t i = 0; i < M; ++i) out[i * N + j] = hsum(acc[i]) + extra[i];
    }
  });
}

}  // namespace

void matmul_quant_backward(float* dx, const float* dout, const uint8_t* w, int type, int64_t M, int64_t K,
                           int64_t N) {
  // Row chunks of W expanded as in matmul_quant_float; each adds dout[:, chunk] @ W[chunk].
  const int64_t chunk = imax(1, imin(N, (int64_t(1) << 20) / imax(1, K)));
  float* wf = expanded_weights.get(size_t(chunk * K));
  for (int64_t j0 = 0; j0 < N; j0 += chunk) {
    const int64_t n = imin(chunk, N - j0);
    dequantize_rows(wf, w + j0 * row_bytes_of(type, K), type, n, K);
    gemm(M, K, n, MatView{dout + j0, N, 1}, MatView{wf, K, 1}, dx, K, j0 > 0);
  }
}

void matmul_quant(float* out, const float* a, const uint8_t* w, int type, int64_t M, int64_t K,
                  int64_t N, bool int8_activations) {
  if (!int8_activations) return matmul_quant_float(out, a, w, type, M, K, N);
  if (type == kQ4_K || type == kQ6_K) {   // rounded as Q8_K: integer products, or the float ones
#if defined(__AVX2__)
    if (M <= 4) return matmul_k_quant_int8(out, a, w, type, M, K, N);
#endif
    float* xf = fake_quantized.get(size_t(M * K));
    fake_quantize_activations_k(xf, a, M, K);
    return matmul_quant_float(out, xf, w, type, M, K, N);
  }
  if (M <= 4) return matmul_quant_int8(out, a, w, type, M, K, N);
  // Prompts: the activations rounded exactly as the integer path rounds them, then the GEMM.
  float* xf = fake_quantized.get(size_t(M * K));
  fake_quantize_activations(xf, a, M, K);
  matmul_quant_float(out, xf, w, type, M, K, N);
}

}  // namespace PYLLM_ISA
}  // namespace pyllm
