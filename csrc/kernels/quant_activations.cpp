// Rounding activations as llama.cpp does before its integer dot products (quant_activations.h).
// Not the products themselves (quant_matmul.cpp).
#include <cmath>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "kernels/quant_activations.h"

namespace pyllm {
namespace PYLLM_ISA {
namespace {

inline float round_to_half(float x) { return float(_Float16(x)); }

// One block: d = max|x| / 127 as a float16, q = x / d rounded to the nearest integer (ties to
// even, the vector conversions' default rounding, as nearbyint), at most 127 in magnitude.
inline void quantize_block(ActBlock& blk, const float* x) {
#if defined(__AVX512F__)
  const __m512 x0 = _mm512_loadu_ps(x), x1 = _mm512_loadu_ps(x + 16);
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
  blk.d = round_to_half(amax / 127.f);
  const __m512 inv = _mm512_set1_ps(blk.d != 0.f ? 1.f / blk.d : 0.f);
  const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
  const __m512i q0 = _mm512_min_epi32(hi, _mm512_max_epi32(lo, _mm512_cvtps_epi32(_mm512_mul_ps(x0, inv))));
  const __m512i q1 = _mm512_min_epi32(hi, _mm512_max_epi32(lo, _mm512_cvtps_epi32(_mm512_mul_ps(x1, inv))));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(blk.q), _mm512_cvtepi32_epi8(q0));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(blk.q + 16), _mm512_cvtepi32_epi8(q1));
  blk.dsum = blk.d * float(_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1)));
#elif defined(__AVX2__)
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 xs[4], m = _mm256_setzero_ps();
  for (int c = 0; c < 4; ++c) xs[c] = _mm256_loadu_ps(x + 8 * c), m = _mm256_max_ps(m, _mm256_andnot_ps(sign, xs[c]));
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
  blk.d = round_to_half(_mm_cvtss_f32(m4) / 127.f);
  const __m256 inv = _mm256_set1_ps(blk.d != 0.f ? 1.f / blk.d : 0.f);
  __m256i q[4], total = _mm256_setzero_si256();
  for (int c = 0; c < 4; ++c) {
    q[c] = _mm256_min_epi32(_mm256_set1_epi32(127),
                            _mm256_max_epi32(_mm256_set1_epi32(-127), _mm256_cvtps_epi32(_mm256_mul_ps(xs[c], inv))));
    total = _mm256_add_epi32(total, q[c]);
  }
  // int32 -> int8: the packs work within 128-bit lanes, so the lanes are put back in order after.
  const __m256i words = _mm256_packs_epi32(q[0], q[1]), words2 = _mm256_packs_epi32(q[2], q[3]);
  const __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(words, words2),
                                                    _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(blk.q), bytes);
  __m128i t = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1));
  blk.dsum = blk.d * float(_mm_cvtsi128_si32(t));
#else
  float amax = 0.f;
  for (int t = 0; t < QK; ++t) amax = std::fmax(amax, std::fabs(x[t]));
  blk.d = round_to_half(amax / 127.f);
  const float inv = blk.d != 0.f ? 1.f / blk.d : 0.f;
  int32_t sum = 0;
  for (int t = 0; t < QK; ++t) {
    const int v = int(std::nearbyint(x[t] * inv));
    blk.q[t] = int8_t(v < -127 ? -127 : v > 127 ? 127 : v);
    sum += blk.q[t];
  }
  blk.dsum = blk.d * float(sum);
#endif
}

}  // namespace

void quantize_activations(ActBlock* out, const float* a, int64_t M, int64_t K) {
  const int64_t nb = K / QK;
  for (int64_t i = 0; i < M; ++i)
    for (int64_t b = 0; b < nb; ++b) quantize_block(out[i * nb + b], a + i * K + b * QK);
}

void fake_quantize_activations(float* out, const float* a, int64_t M, int64_t K) {
  ActBlock blk;
  for (int64_t i = 0; i < M; ++i)
    for (int64_t b = 0; b < K / QK; ++b) {
      quantize_activations(&blk, a + i * K + b * QK, 1, QK);
      for (int t = 0; t < QK; ++t) out[i * K + b * QK + t] = float(blk.q[t]) * blk.d;
    }
}

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

#if defined(__AVX2__)
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

#endif

}  // namespace PYLLM_ISA
}  // namespace pyllm
