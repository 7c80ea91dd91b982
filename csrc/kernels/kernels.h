// The kernel table: one function pointer per kernel of kernel_list.h. Each ISA's copy of the
// kernels fills one table (kernels/table.cpp); csrc/dispatch.cpp hands out the best one the CPU runs.
// Not where kernels are written (kernels/<family>.cpp) nor checked (pyllm/kernels.py, bindings).
//
// Conventions (llm.c's): arguments are outputs, saved values, inputs, weights, then dims;
// forward kernels overwrite their outputs; backward kernels OVERWRITE the gradients of their
// inputs (dinp, da, dq, dk, dv, dlogits, ...) and ACCUMULATE (+=) into the gradients of
// parameters (dw, db, dbias, matmul's db, dweight), so micro-batches add up in one buffer
// that the caller zeroes once per step. A null gradient pointer means "not needed".
// cross_entropy_backward may be given dlogits == logits (in place).
// Arrays are C-contiguous float32 (ids and targets int64) unless a HeadStrides says otherwise;
// dims are int64_t.
#pragma once

#include <cstdint>

#include "kernels/kernel_list.h"
#include "kernels/quant_types.h"

namespace pyllm {

// Where row (b, h, t) of a (B, H, T, HS) tensor of heads starts, in floats from its first value:
// b * batch + h * head + t * pos; the HS values of a row are contiguous. The same memory seen as
// (B, T, H, HS) (tokens first, as a projection writes it) or (B, H, T, HS) (as a KV cache keeps
// it): no transposed copy is needed to pass either to attention or rope.
struct HeadStrides {
  int64_t batch, head, pos;
};

struct KernelTable {
  const char* isa;
#define PYLLM_TABLE_ENTRY(name, ret, params) ret(*name) params;
  PYLLM_KERNELS(PYLLM_TABLE_ENTRY)
#undef PYLLM_TABLE_ENTRY
};

// Each ISA's copy provides its table (declared here, defined in kernels/table.cpp).
namespace avx512 { KernelTable table(); }
namespace avx2 { KernelTable table(); }
namespace generic { KernelTable table(); }

// The table in use (the best the CPU supports, or the one chosen with select_isa).
const KernelTable& kernels();
// Names of the compiled ISAs this CPU can run, worst to best.
const char* const* available_isas(int* count);
// Switches the table in use; throws std::invalid_argument for an unknown or unsupported name.
void select_isa(const char* name);
// The names of every kernel in the table, in order, and how many there are.
const char* const* kernel_names(int* count);

}  // namespace pyllm
