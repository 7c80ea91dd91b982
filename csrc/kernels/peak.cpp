// The machine's limits as measured: the fp32 peak (independent FMA chains in registers, no memory
// traffic) and the memory read bandwidth (a buffer far larger than the caches, summed by every
// thread). Not kernels anyone computes with; benchmarks report matmul and decode as fractions of these.
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

double read_bandwidth_gbps(double seconds) {
  constexpr int64_t kBytes = int64_t(256) << 20;   // far beyond any last-level cache
  constexpr int64_t kChunk = int64_t(1) << 20;     // a work item: 1 MB read front to back
  const int64_t n = kBytes / int64_t(sizeof(float)), per_chunk = kChunk / int64_t(sizeof(float));
  Scratch buffer{size_t(n)};
  float* data = buffer.data();
  parallel_for(n / per_chunk, 1, [&](int64_t c0, int64_t c1) {   // touched by the threads that read it
    for (int64_t i = c0 * per_chunk; i < c1 * per_chunk; ++i) data[i] = 1.f;
  });
  double bytes = 0, elapsed = 0;
  const auto start = std::chrono::steady_clock::now();
  do {
    parallel_for(n / per_chunk, 1, [&](int64_t c0, int64_t c1) {
      vf acc[4] = {splat(0.f), splat(0.f), splat(0.f), splat(0.f)};
      for (int64_t i = c0 * per_chunk; i < c1 * per_chunk; i += 4 * W)
        for (int a = 0; a < 4; ++a) acc[a] += load(data + i + a * W);
      volatile float sink = hsum(acc[0] + acc[1] + acc[2] + acc[3]);
      (void)sink;
    });
    bytes += double(kBytes);
    elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  } while (elapsed < seconds);
  return bytes / elapsed / 1e9;
}

}  // namespace PYLLM_ISA
}  // namespace pyllm
