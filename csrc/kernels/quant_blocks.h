// The block layouts of ggml's quantized types (quant_types.h), one block at a time: decoded to
// floats, and dotted with float activations (block_dot) or with int8 activations rounded as
// llama.cpp rounds them (block_idot*, k_block_idot). Kernel-internal (per ISA, inline); not the
// strategies that run them over whole matrices (quant_matmul.cpp).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "kernels/quant_activations.h"

namespace pyllm {
namespace PYLLM_ISA {

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

inline int64_t block_bytes(int type) { return quant_block_bytes(type); }

// Bytes of one row of K values.
inline int64_t row_bytes_of(int type, int64_t K) { return K / quant_block_values(type) * quant_block_bytes(type); }

// Types without a register-level float path: their rows are expanded to floats before a product
// with float activations (Q5_0 and Q5_1 do have the integer path).
inline bool expanded_per_row(int type) { return type == kQ5_0 || type == kQ5_1 || type == kQ4_K || type == kQ6_K; }

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
inline void expand_block_to_floats(const uint8_t* blk, int type, float* y) {
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

#if defined(__AVX2__)
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

#endif

}  // namespace PYLLM_ISA
}  // namespace pyllm
