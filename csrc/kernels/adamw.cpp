// The fused AdamW update: one pass over param, grad and both moments.
// Not the schedule or clipping policy (pyllm/optim.py decides lr and grad_scale per step).
#include <cmath>

#include "kernels/isa.h"
#include "threads.h"

namespace pyllm {
namespace PYLLM_ISA {

void adamw_update(float* param, float* m, float* v, const float* grad, int64_t n, float lr,
                  float beta1, float beta2, float eps, float weight_decay, float grad_scale,
                  int64_t step) {
  // Bias corrections in double: beta^step underflows gracefully and 1 - beta^step stays exact.
  const float c1 = float(1.0 / (1.0 - std::pow(double(beta1), double(step))));
  const float c2 = float(1.0 / (1.0 - std::pow(double(beta2), double(step))));
  constexpr int64_t kGrain = 1 << 14;
  parallel_for((n + kGrain - 1) / kGrain, 1, [&](int64_t c0, int64_t c1_) {
    const int64_t end = imin(n, c1_ * kGrain);
    for (int64_t i = c0 * kGrain; i < end; i += W) {
      const int64_t k = imin(W, end - i);
      const vf g = load_partial(grad + i, k) * grad_scale;
      const vf mv = beta1 * load_partial(m + i, k) + (1.0f - beta1) * g;
      const vf vv = beta2 * load_partial(v + i, k) + (1.0f - beta2) * g * g;
      vf root = vv * c2;
      for (int t = 0; t < W; ++t) root[t] = __builtin_sqrtf(root[t]);
      const vf p = load_partial(param + i, k);
      store_partial(m + i, mv, k);
      store_partial(v + i, vv, k);
      store_partial(param + i, p - lr * ((mv * c1) / (root + eps) + weight_decay * p), k);
    }
  });
}

}  // namespace PYLLM_ISA
}  // namespace pyllm
