// ggml's reference quantizers for the 32-value types (quantize.h). Each block: a float16 scale
// (and Q4_1's float16 minimum) and its 32 values rounded as ggml-quants.c rounds them.
#pragma GCC optimize("fp-contract=off")   // a * b + c stays two roundings, as ggml's reference code
#include "formats/quantize.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>

#include "kernels/quant_types.h"
#include "threads.h"

namespace pyllm {
namespace formats {
namespace {

constexpr int QK = 32;

void put_half(uint8_t* p, float x) {
  const _Float16 h = _Float16(x);   // round to nearest even, as ggml's GGML_FP32_TO_FP16
  std::memcpy(p, &h, 2);
}

void block_q8_0(uint8_t* out, const float* x) {
  float amax = 0.f;
  for (int j = 0; j < QK; ++j) amax = std::fmax(amax, std::fabs(x[j]));
  const float d = amax / 127.f, id = d != 0.f ? 1.f / d : 0.f;
  put_half(out, d);
  for (int j = 0; j < QK; ++j) out[2 + j] = uint8_t(int8_t(std::roundf(x[j] * id)));
}

void block_q4_0(uint8_t* out, const float* x) {
  float amax = 0.f, max = 0.f;   // the value of largest magnitude, with its sign
  for (int j = 0; j < QK; ++j)
    if (amax < std::fabs(x[j])) amax = std::fabs(x[j]), max = x[j];
  const float d = max / -8.f, id = d != 0.f ? 1.f / d : 0.f;
  put_half(out, d);
  for (int j = 0; j < QK / 2; ++j) {
    const float x0 = x[j] * id, x1 = x[QK / 2 + j] * id;
    const int lo = std::min(15, int(int8_t(x0 + 8.5f))), hi = std::min(15, int(int8_t(x1 + 8.5f)));
    out[2 + j] = uint8_t(lo | (hi << 4));
  }
}

void block_q4_1(uint8_t* out, const float* x) {
  float min = FLT_MAX, max = -FLT_MAX;
  for (int j = 0; j < QK; ++j) min = std::fmin(min, x[j]), max = std::fmax(max, x[j]);
  const float d = (max - min) / 15.f, id = d != 0.f ? 1.f / d : 0.f;
  put_half(out, d);
  put_half(out + 2, min);
  for (int j = 0; j < QK / 2; ++j) {
    const float x0 = (x[j] - min) * id, x1 = (x[QK / 2 + j] - min) * id;
    const int lo = std::min(15, int(int8_t(x0 + 0.5f))), hi = std::min(15, int(int8_t(x1 + 0.5f)));
    out[4 + j] = uint8_t(lo | (hi << 4));
  }
}

// ggml's nearest_int: to the nearest integer, ties to even, through the float's mantissa.
inline int nearest_int(float fval) {
  const float val = fval + 12582912.f;
  int i;
  std::memcpy(&i, &val, 4);
  return (i & 0x007fffff) - 0x00400000;
}

// ggml's make_qkx2_quants: the scale and minimum of n values at nmax + 1 levels that minimise
// the weighted squared error, searched over nstep + 1 candidate scales; L the levels.
float make_qkx2_quants(int n, int nmax, const float* x, const float* weights, uint8_t* L, float* the_min,
                       uint8_t* Laux, float rmin, float rdelta, int nstep) {
  float min = x[0], max = x[0], sum_w = weights[0], sum_x = sum_w * x[0];
  for (int i = 1; i < n; ++i) {
    if (x[i] < min) min = x[i];
    if (x[i] > max) max = x[i];
    const float w = weights[i];
    sum_w += w;
    sum_x += w * x[i];
  }
  if (min > 0) min = 0;
  if (max == min) {
    for (int i = 0; i < n; ++i) L[i] = 0;
    *the_min = -min;
    return 0.f;
  }
  float iscale = nmax / (max - min), scale = 1 / iscale, best = 0;
  for (int i = 0; i < n; ++i) {
    const int l = nearest_int(iscale * (x[i] - min));
    L[i] = uint8_t(std::max(0, std::min(nmax, l)));
    float diff = scale * L[i] + min - x[i];
    diff = diff * diff;
    best += weights[i] * diff;
  }
  for (int is = 0; is <= nstep; ++is) {
    iscale = (rmin + rdelta * is + nmax) / (max - min);
    float sum_l = 0, sum_l2 = 0, sum_xl = 0;
    for (int i = 0; i < n; ++i) {
      int l = nearest_int(iscale * (x[i] - min));
      l = std::max(0, std::min(nmax, l));
      Laux[i] = uint8_t(l);
      const float w = weights[i];
      sum_l += w * l;
      sum_l2 += w * l * l;
      sum_xl += w * l * x[i];
    }
    const float D = sum_w * sum_l2 - sum_l * sum_l;
    if (D > 0) {
      float this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
      float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
      if (this_min > 0) {
        this_min = 0;
        this_scale = sum_xl / sum_l2;
      }
      float error = 0;
      for (int i = 0; i < n; ++i) {
        float diff = this_scale * Laux[i] + this_min - x[i];
        diff = diff * diff;
        error += weights[i] * diff;
      }
      if (error < best) {
        for (int i = 0; i < n; ++i) L[i] = Laux[i];
        best = error;
        scale = this_scale;
        min = this_min;
      }
    }
  }
  *the_min = -min;
  return scale;
}

float half_value(const uint8_t* p) {
  _Float16 h;
  std::memcpy(&h, p, 2);
  return float(h);
}

// Q4_K, ggml's quantize_row_q4_K_ref: 8 sub-blocks of 32, each with a 6-bit scale and minimum
// (of the block's float16 d and dmin), their levels then recomputed from the rounded scales.
void block_q4_k(uint8_t* out, const float* x) {
  uint8_t L[256], Laux[32];
  float weights[32], mins[8], scales[8], max_scale = 0, max_min = 0;
  for (int j = 0; j < 8; ++j) {
    float sum_x2 = 0;
    for (int l = 0; l < 32; ++l) sum_x2 += x[32 * j + l] * x[32 * j + l];
    const float av_x = std::sqrt(sum_x2 / 32);
    for (int l = 0; l < 32; ++l) weights[l] = av_x + std::fabs(x[32 * j + l]);
    scales[j] = make_qkx2_quants(32, 15, x + 32 * j, weights, L + 32 * j, &mins[j], Laux, -1.f, 0.1f, 20);
    if (scales[j] > max_scale) max_scale = scales[j];
    if (mins[j] > max_min) max_min = mins[j];
  }
  const float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f, inv_min = max_min > 0 ? 63.f / max_min : 0.f;
  uint8_t* sc = out + 4;
  std::memset(sc, 0, 12);
  for (int j = 0; j < 8; ++j) {
    uint8_t ls = uint8_t(nearest_int(inv_scale * scales[j])), lm = uint8_t(nearest_int(inv_min * mins[j]));
    ls = std::min<uint8_t>(63, ls);
    lm = std::min<uint8_t>(63, lm);
    if (j < 4) {
      sc[j] = ls;
      sc[j + 4] = lm;
    } else {
      sc[j + 4] = uint8_t((ls & 0xF) | ((lm & 0xF) << 4));
      sc[j - 4] |= uint8_t((ls >> 4) << 6);
      sc[j] |= uint8_t((lm >> 4) << 6);
    }
  }
  put_half(out, max_scale / 63.f);
  put_half(out + 2, max_min / 63.f);
  const float d_all = half_value(out), dmin_all = half_value(out + 2);
  for (int j = 0; j < 8; ++j) {
    int s, m;
    if (j < 4) {
      s = sc[j] & 63, m = sc[j + 4] & 63;
    } else {
      s = (sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4), m = (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4);
    }
    const float d = d_all * float(s);
    if (d == 0.f) continue;
    const float dm = dmin_all * float(m);
    for (int ii = 0; ii < 32; ++ii) {
      const int l = nearest_int((x[32 * j + ii] + dm) / d);
      L[32 * j + ii] = uint8_t(std::max(0, std::min(15, l)));
    }
  }
  uint8_t* q = out + 16;
  for (int j = 0; j < 256; j += 64, q += 32)
    for (int l = 0; l < 32; ++l) q[l] = uint8_t(L[j + l] | (L[j + l + 32] << 4));
}

}  // namespace

bool can_quantize(int type) { return type == kQ4_0 || type == kQ4_1 || type == kQ8_0 || type == kQ4_K; }

void quantize_rows(uint8_t* out, const float* x, int type, int64_t rows, int64_t K) {
  void (*block)(uint8_t*, const float*) =
      type == kQ8_0 ? block_q8_0 : type == kQ4_0 ? block_q4_0 : type == kQ4_1 ? block_q4_1 : block_q4_k;
  const int64_t values = quant_block_values(type), bytes = quant_block_bytes(type), nb = K / values;
  parallel_for(rows, std::max<int64_t>(1, 65536 / std::max<int64_t>(1, K)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t b = 0; b < nb; ++b) block(out + (r * nb + b) * bytes, x + r * K + b * values);
  });
}

}  // namespace formats
}  // namespace pyllm
