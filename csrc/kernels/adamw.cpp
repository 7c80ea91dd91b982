// The fused AdamW update: one pass over param, grad and both moments.
// Not the schedule or clipping policy (pyllm/optim.py decides lr and grad_scale per step).
#include <cmath>

#include "kernels/isa.h"
#include "threads.h"

namespace pyllm {
namespace PYLLM_ISA {

void adamw_update(float* param, float* m, float* v, const float* grad, int64_t n, double lr,
                  double beta1, double beta2, double eps, double weight_decay, double grad_scale,
                  int64_t step) {
  // Constants derived in double, then rounded once: 1 - beta2 for beta2 = 0.999 computed in
  // float32 would be 0.00099998713, a 1e-5 relative error in every second moment.
  const float b1 = float(beta1), b2 = float(beta2), one_minus_b1 = float(1.0 - beta1),
              one_minus_b2 = float(1.0 - beta2), scale = float(grad_scale);
  const float c1 = float(1.0 / (1.0 - std::pow(beta1, double(step))));  // bias corrections
  const float c2 = float(1.0 / (1.0 - std::pow(beta2, double(step))));
  const float lr_f = float(lr), eps_f = float(eps), decay = float(weight_decay);
  constexpr int64_t kGrain = 1 << 14;
  parallel_for((n + kGrain - 1) / kGrain, 1, [&](int64_t c0, int64_t c1_) {
    const int64_t end = imin(n, c1_ * kGrain);
    for (int64_t i = c0 * kGrain; i < end; i += W) {
      const int64_t k = imin(W, end - i);
      const vf g = load_partial(grad + i, k) * scale;
      const vf mv = b1 * load_partial(m + i, k) + one_minus_b1 * g;
      const vf vv = b2 * load_partial(v + i, k) + one_minus_b2 * g * g;
      vf root = vv * c2;
      for (int t = 0; t < W; ++t) root[t] = __builtin_sqrtf(root[t]);
      const vf p = load_partial(param + i, k);
      store_partial(m + i, mv, k);
      store_partial(v + i, vv, k);
      store_partial(param + i, p - lr_f * ((mv * c1) / (root + eps_f) + decay * p), k);
    }
  });
}

}  // namespace PYLLM_ISA
}  // namespace pyllm
