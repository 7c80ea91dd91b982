// The packed layout's helpers for the native kernels (quant_matmul.cpp): products of packed rows,
// and a packed row turned back into ggml's layout. Kernel-internal (per ISA).
#pragma once

#include <cstdint>

#include "kernels/isa.h"
#include "kernels/quant_types.h"

namespace pyllm {
namespace PYLLM_ISA {

// Row `row` of the packed (N, K) matrix w back in ggml's block layout (row bytes of its own).
void unpack_row(uint8_t* native, const uint8_t* w, int64_t N, int64_t row, int type, int64_t K);

}  // namespace PYLLM_ISA
}  // namespace pyllm
