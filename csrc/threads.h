// The thread pool every kernel runs on: parallel_for over independent work items.
// Not a general task system: one job at a time, no nesting (a nested call runs inline).
//
// Determinism: a work item's result must not depend on which thread runs it or on how
// items are grouped, so kernels give each item its own output region (or a fixed-size chunk
// of a reduction that is combined afterwards in a fixed order).
#pragma once

#include <cstdint>

namespace pyllm {

int num_threads();
void set_num_threads(int n);

using RangeFn = void (*)(void* ctx, int64_t begin, int64_t end);
// Runs fn(ctx, begin, end) over [0, n) in chunks of `grain` items, on all pool threads.
void parallel_run(int64_t n, int64_t grain, RangeFn fn, void* ctx);

template <class F>
void parallel_for(int64_t n, int64_t grain, F&& f) {
  if (n <= 0) return;
  if (grain < 1) grain = 1;
  parallel_run(n, grain, [](void* ctx, int64_t b, int64_t e) { (*static_cast<F*>(ctx))(b, e); },
               static_cast<void*>(&f));
}

}  // namespace pyllm
