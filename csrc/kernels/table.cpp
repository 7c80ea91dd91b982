// Fills this ISA's KernelTable with its copy of every kernel.
#include "kernels/isa.h"

#define PYLLM_STR2(x) #x
#define PYLLM_STR(x) PYLLM_STR2(x)

namespace pyllm {
namespace PYLLM_ISA {

KernelTable table() {
  KernelTable t{};
  t.isa = PYLLM_STR(PYLLM_ISA);
  t.matmul_forward = &matmul_forward;
  t.matmul_backward = &matmul_backward;
  t.softmax_forward = &softmax_forward;
  t.softmax_backward = &softmax_backward;
  t.cross_entropy_forward = &cross_entropy_forward;
  t.cross_entropy_backward = &cross_entropy_backward;
  t.layernorm_forward = &layernorm_forward;
  t.layernorm_backward = &layernorm_backward;
  t.rmsnorm_forward = &rmsnorm_forward;
  t.rmsnorm_backward = &rmsnorm_backward;
  t.gelu_forward = &gelu_forward;
  t.gelu_backward = &gelu_backward;
  t.silu_forward = &silu_forward;
  t.silu_backward = &silu_backward;
  t.swiglu_forward = &swiglu_forward;
  t.swiglu_backward = &swiglu_backward;
  t.rope_forward = &rope_forward;
  t.rope_backward = &rope_backward;
  t.attention_forward = &attention_forward;
  t.attention_backward = &attention_backward;
  t.embedding_forward = &embedding_forward;
  t.embedding_backward = &embedding_backward;
  t.adamw_update = &adamw_update;
  t.fma_peak_gflops = &fma_peak_gflops;
  t.matmul_quant = &matmul_quant;
  t.dequantize_rows = &dequantize_rows;
  t.matmul_quant_backward = &matmul_quant_backward;
  return t;
}

}  // namespace PYLLM_ISA
}  // namespace pyllm
