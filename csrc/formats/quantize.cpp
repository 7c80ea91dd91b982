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

}  // namespace

bool can_quantize(int type) { return type == kQ4_0 || type == kQ4_1 || type == kQ8_0; }

void quantize_rows(uint8_t* out, const float* x, int type, int64_t rows, int64_t K) {
  void (*block)(uint8_t*, const float*) = type == kQ8_0 ? block_q8_0 : type == kQ4_0 ? block_q4_0 : block_q4_1;
  const int64_t bytes = type == kQ8_0 ? 34 : type == kQ4_0 ? 18 : 20, nb = K / QK;
  parallel_for(rows, std::max<int64_t>(1, 65536 / std::max<int64_t>(1, K)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t b = 0; b < nb; ++b) block(out + (r * nb + b) * bytes, x + r * K + b * QK);
  });
}

}  // namespace formats
}  // namespace pyllm
