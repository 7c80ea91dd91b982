// Token embedding: a row gather forward, a scatter-add backward.
// Not position embeddings specially: those are the same gather with ids 0..T-1.
#include <cstring>

#include "kernels/isa.h"
#include "threads.h"

namespace pyllm {
namespace PYLLM_ISA {

void embedding_forward(float* out, const int64_t* ids, const float* weight, int64_t N, int64_t V,
                       int64_t C) {
  (void)V;  // ids were range-checked at the boundary
  parallel_for(N, imax(1, 16384 / imax(1, C)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) std::memcpy(out + r * C, weight + ids[r] * C, sizeof(float) * C);
  });
}

void embedding_backward(float* dweight, const float* dout, const int64_t* ids, int64_t N,
                        int64_t V, int64_t C) {
  // Each work item owns a range of vocabulary rows and adds the gradient rows of its ids in
  // sequence order: no two threads touch a row, and each row's sum order is fixed.
  const int64_t items = imin(V, 64);
  const int64_t rows_per = (V + items - 1) / items;
  parallel_for(items, 1, [&](int64_t i0, int64_t i1) {
    const int64_t lo = i0 * rows_per, hi = imin(V, i1 * rows_per);
    for (int64_t r = 0; r < N; ++r) {
      const int64_t id = ids[r];
      if (id < lo || id >= hi) continue;
      float* dst = dweight + id * C;
      const float* src = dout + r * C;
      int64_t j = 0;
      for (; j + W <= C; j += W) store(dst + j, load(dst + j) + load(src + j));
      for (; j < C; ++j) dst[j] += src[j];
    }
  });
}

}  // namespace PYLLM_ISA
}  // namespace pyllm
