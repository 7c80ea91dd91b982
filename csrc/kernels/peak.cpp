// The machine's fp32 peak as measured: independent FMA chains in registers, no memory traffic.
// Not a kernel anyone computes with; benchmarks report matmul as a fraction of this.
#include <chrono>

#include "kernels/isa.h"
#include "threads.h"

namespace pyllm {
namespace PYLLM_ISA {

double fma_peak_gflops(double seconds) {
  constexpr int kChains = 12;  // enough independent chains to cover FMA latency x throughput
  constexpr int64_t kIters = 1 << 16;
  // Many short items rather than one per thread, so a thread that starts late does not leave
  // the measurement to the others.
  const int64_t items = 64 * num_threads();
  double total_flops = 0;
  auto start = std::chrono::steady_clock::now();
  double elapsed = 0;
  do {
    parallel_for(items, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t item = i0; item < i1; ++item) {
      vf acc[kChains];
      for (int c = 0; c < kChains; ++c) acc[c] = splat(0.001f * c);
      const vf x = splat(0.999999f), y = splat(1e-7f);
      for (int64_t i = 0; i < kIters; ++i)
#pragma GCC unroll 16
        for (int c = 0; c < kChains; ++c) acc[c] = acc[c] * x + y;
      vf sum = splat(0.f);
      for (int c = 0; c < kChains; ++c) sum += acc[c];
      volatile float sink = hsum(sum);  // keeps the loop from being optimised away
      (void)sink;
      }
    });
    total_flops += 2.0 * W * kChains * kIters * items;
    elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  } while (elapsed < seconds);
  return total_flops / elapsed / 1e9;
}

}  // namespace PYLLM_ISA
}  // namespace pyllm
