// The packed layout's helpers for the native kernels (quant_matmul.cpp): products of packed rows,
// and a packed row turned back into ggml's layout. Kernel-internal (per ISA).
#pragma once

#include <cstdint>

#include "kernels/isa.h"

namespace pyllm {
namespace PYLLM_ISA {

// One packed row of K values back in ggml's block layout (the same number of bytes).
void unpack_row(uint8_t* native, const uint8_t* packed, int type, int64_t K);

}  // namespace PYLLM_ISA
}  // namespace pyllm
