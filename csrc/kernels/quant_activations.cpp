// Rounding activations as llama.cpp does before its integer dot products (quant_activations.h).
// Not the products themselves (quant_matmul.cpp).
#include <cmath>

#include "kernels/quant_activations.h"

namespace pyllm {
namespace PYLLM_ISA {
namespace {

inline float round_to_half(float x) { return float(_Float16(x)); }

}  // namespace

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
