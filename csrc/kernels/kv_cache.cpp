// Appending new keys or values to a KV cache: rows (b, t, h) of a projection's output, read at any
// strides, copied to rows (b, h, pos0[b] + t) of a (B, H, capacity, HS) cache, each batch row at
// its own length, as float32 or rounded to float16 (a cache of half the bytes, which decoding reads
// whole at every step). Not attention over the cache (attention.cpp) nor the rotation of keys (rope.cpp).
#include <cstring>

#include "kernels/isa.h"
#include "threads.h"

namespace pyllm {
namespace PYLLM_ISA {

void kv_write(float* cache, const float* src, const int64_t* pos0, const int64_t* rows, int64_t B, int64_t T,
              int64_t H, int64_t HS, int64_t capacity, HeadStrides src_s) {
  parallel_for(B * H * T, imax(1, 16384 / imax(1, HS)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t t = r % T, h = (r / T) % H, b = r / (T * H);
      std::memcpy(cache + (((rows ? rows[b] : b) * H + h) * capacity + pos0[b] + t) * HS,
                  src + b * src_s.batch + t * src_s.pos + h * src_s.head, sizeof(float) * HS);
    }
  });
}

void kv_write_half(uint16_t* cache, const float* src, const int64_t* pos0, const int64_t* rows, int64_t B,
                   int64_t T, int64_t H, int64_t HS, int64_t capacity, HeadStrides src_s) {
  parallel_for(B * H * T, imax(1, 16384 / imax(1, HS)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t t = r % T, h = (r / T) % H, b = r / (T * H);
      uint16_t* dst = cache + (((rows ? rows[b] : b) * H + h) * capacity + pos0[b] + t) * HS;
      const float* row = src + b * src_s.batch + t * src_s.pos + h * src_s.head;
      for (int64_t d = 0; d < HS; d += W) store_half_partial(dst + d, load_partial(row + d, HS - d), HS - d);
    }
  });
}

}  // namespace PYLLM_ISA
}  // namespace pyllm
