// The ggml tensor types pyllm reads, written once: ggml's id, values per block, bytes per block, and
// whether matmul_quant multiplies it. Python reads this table from the module (pyllm.kernels.
// GGML_TYPES), so a type's layout is known in one place. Not the block decoders (quant_blocks.h).
#pragma once

#include <cstdint>

// X(name, ggml id, values per block, bytes per block, quantized, packed: pack_quant/matmul_rows take it)
#define PYLLM_GGML_TYPES(X)                                                                         \
  X(F32, 0, 1, 4, false, false)                                                                     \
  X(F16, 1, 1, 2, false, false)                                                                     \
  X(Q4_0, 2, 32, 18, true, true)     /* d (f16), 32 nibbles */                                      \
  X(Q4_1, 3, 32, 20, true, true)     /* d, m (f16), 32 nibbles */                                   \
  X(Q5_0, 6, 32, 22, true, true)     /* d (f16), the 32 fifth bits, 32 nibbles */                   \
  X(Q5_1, 7, 32, 24, true, true)     /* d, m (f16), the 32 fifth bits, 32 nibbles */                \
  X(Q8_0, 8, 32, 34, true, true)     /* d (f16), 32 int8 */                                         \
  X(Q4_K, 12, 256, 144, true, false) /* d, dmin (f16), 8 x (6-bit scale, 6-bit min) in 12 bytes, 256 nibbles */ \
  X(Q6_K, 14, 256, 210, true, false) /* 256 x (4 low + 2 high bits), 16 int8 scales, d (f16) */     \
  X(BF16, 30, 1, 2, false, false)

namespace pyllm {

enum QuantType : int {
#define PYLLM_TYPE_ID(name, id, values, bytes, quantized, packed) k##name = id,
  PYLLM_GGML_TYPES(PYLLM_TYPE_ID)
#undef PYLLM_TYPE_ID
};

struct GgmlType {
  const char* name;
  int id;
  int64_t block_values;
  int64_t block_bytes;
  bool quantized;   // matmul_quant, dequantize_rows and matmul_quant_backward take it
  bool packed;      // pack_quant and matmul_rows take it
};

inline constexpr GgmlType kGgmlTypes[] = {
#define PYLLM_TYPE_ENTRY(name, id, values, bytes, quantized, packed) {#name, id, values, bytes, quantized, packed},
    PYLLM_GGML_TYPES(PYLLM_TYPE_ENTRY)
#undef PYLLM_TYPE_ENTRY
};

// Internal linkage (static) and constexpr (usable as a template's constant): kernel sources include
// this with -m flags, and an inline function shared with baseline code could be linked in its
// AVX-512 form (see simd.h).
// The index in kGgmlTypes of a quantized type id, or -1 for a float type or an unknown id (an index,
// not a pointer: GCC's UBSan makes a pointer's comparison with null no constant expression).
static constexpr int quant_index(int id) {
  for (int i = 0; i < int(sizeof(kGgmlTypes) / sizeof(kGgmlTypes[0])); ++i)
    if (kGgmlTypes[i].id == id) return kGgmlTypes[i].quantized ? i : -1;
  return -1;
}
// Values per block (32, or 256 for the K-quants' super-blocks) of a quantized type, 0 if not one.
static constexpr int64_t quant_block_values(int id) {
  return quant_index(id) >= 0 ? kGgmlTypes[quant_index(id)].block_values : 0;
}
static constexpr int64_t quant_block_bytes(int id) {
  return quant_index(id) >= 0 ? kGgmlTypes[quant_index(id)].block_bytes : 0;
}
static constexpr bool packed_type(int id) { return quant_index(id) >= 0 && kGgmlTypes[quant_index(id)].packed; }

// A packed matrix keeps its rows in groups of this many (quant_packed.cpp): a range of its rows
// that starts at a multiple of it (and ends at one, or at the last row) is a packed matrix too.
constexpr int64_t kPackedRows = 16;

}  // namespace pyllm
