// Float weights encoded as ggml blocks, as llama.cpp's reference quantizers (quantize_row_*_ref in
// ggml-quants.c) encode them, so that a GGUF file pyllm writes holds the bytes llama.cpp's own
// converter would. Not a kernel of the per-ISA table (an export runs once; its arithmetic is kept
// scalar and uncontracted so every build gives the same bytes), and not decoding (quant_blocks.h).
#pragma once

#include <cstdint>

namespace pyllm {
namespace formats {

// The types quantize_rows writes (ggml ids): Q4_0, Q4_1, Q8_0, Q4_K.
bool can_quantize(int type);

// out (rows, K / block values) = x (rows, K) in blocks of `type`; K a multiple of the block. Rows on the pool.
void quantize_rows(uint8_t* out, const float* x, int type, int64_t rows, int64_t K);

}  // namespace formats
}  // namespace pyllm
