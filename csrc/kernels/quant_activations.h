// Activations rounded for integer dot products with quantized weights, as llama.cpp rounds them:
// blocks of 32 as its Q8_0/Q8_1 (int8, float16 scale), blocks of 256 as its Q8_K (int8, float32
// scale, sums of 16). Kernel-internal (per ISA); not the weights' block layouts (quant_blocks.h).
#pragma once

#include <cstdint>

#include "kernels/isa.h"

namespace pyllm {
namespace PYLLM_ISA {

constexpr int64_t QK = quant_block_values(kQ8_0);   // values per block of the 32-value types (and of ActBlock)

// One block of activations quantized as llama.cpp's Q8_0/Q8_1 do: d = max|x| / 127 (stored as
// float16), q = x / d rounded to the nearest integer (ties to even), and d times the sum of the q
// (what Q4_0's zero point and Q4_1's minimum multiply).
struct ActBlock {
  alignas(32) int8_t q[QK];
  float d;
  float dsum;
};

// a (M, K) -> M * K / 32 blocks.
void quantize_activations(ActBlock* out, const float* a, int64_t M, int64_t K);
// The activations rounded as quantize_activations does, back in float32 (for the GEMM path).
void fake_quantize_activations(float* out, const float* a, int64_t M, int64_t K);
// The activations rounded as llama.cpp's Q8_K (what it multiplies K-quant weights with) rounds
// them, back in float32: per block of 256, the value of largest magnitude maps to -127, the
// scale is kept as a float32 (1 / iscale), q = nearest integer (ties even), at most 127.
void fake_quantize_activations_k(float* out, const float* a, int64_t M, int64_t K);

#if defined(__AVX2__)
// A block of 256 activations rounded as llama.cpp's Q8_K: int8 values, a float32 scale, and the
// sum of every 16 values (what the K-quants' minima and Q6_K's offset multiply).
struct ActBlockK {
  alignas(32) int8_t q[256];
  float d;
  int32_t bsums[16];
};

// a (M, K) -> M * K / 256 blocks.
void quantize_activations_k(ActBlockK* out, const float* a, int64_t M, int64_t K);
#endif

}  // namespace PYLLM_ISA
}  // namespace pyllm
