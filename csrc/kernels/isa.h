// Declarations of one ISA's copy of every kernel (signatures in kernel_list.h), plus
// the GEMM that matmul and attention share. Included only by kernel sources.
// Not a public header: the rest of the code reaches kernels through the KernelTable.
#pragma once

#include <cstdint>

#include "kernels/kernels.h"
#include "simd.h"

namespace pyllm {
namespace PYLLM_ISA {

// A matrix view with any strides: element (i, j) is p[i * rs + j * cs]. A transposed
// operand is the same memory with rs and cs swapped, so no transposed copy is ever made.
struct MatView {
  const float* p;
  int64_t rs, cs;
};

// C (M, N, row stride ldc) = A (M, K) @ B (K, N), or += when accumulate. Threads over tiles of C.
void gemm(int64_t M, int64_t N, int64_t K, MatView A, MatView B, float* C, int64_t ldc,
          bool accumulate);
// The same on the calling thread only (for callers already inside a parallel_for).
void gemm_serial(int64_t M, int64_t N, int64_t K, MatView A, MatView B, float* C, int64_t ldc,
                 bool accumulate);

// One declaration per kernel of kernel_list.h, in this ISA's namespace.
#define PYLLM_DECLARE_KERNEL(name, ret, params) ret name params;
PYLLM_KERNELS(PYLLM_DECLARE_KERNEL)
#undef PYLLM_DECLARE_KERNEL

}  // namespace PYLLM_ISA
}  // namespace pyllm
