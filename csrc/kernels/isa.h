// Declarations of one ISA's copy of every kernel (signatures documented in kernels.h), plus
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

void matmul_forward(float* out, const float* a, const float* b, const float* bias, int64_t M,
                    int64_t K, int64_t N, bool trans_b);
void matmul_backward(float* da, float* db, float* dbias, const float* dout, const float* a,
                     const float* b, int64_t M, int64_t K, int64_t N, bool trans_b);
void softmax_forward(float* out, const float* inp, int64_t N, int64_t C);
void softmax_backward(float* dinp, const float* dout, const float* out, int64_t N, int64_t C);
void cross_entropy_forward(float* losses, float* lse, const float* logits, const int64_t* targets,
                           int64_t N, int64_t V, int64_t ignore_index);
void cross_entropy_backward(float* dlogits, const float* logits, const float* lse,
                            const int64_t* targets, float scale, int64_t N, int64_t V,
                            int64_t ignore_index);
void layernorm_forward(float* out, float* mean, float* rstd, const float* inp, const float* w,
                       const float* b, int64_t N, int64_t C, float eps);
void layernorm_backward(float* dinp, float* dw, float* db, const float* dout, const float* inp,
                        const float* w, const float* mean, const float* rstd, int64_t N, int64_t C);
void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* w, int64_t N,
                     int64_t C, float eps);
void rmsnorm_backward(float* dinp, float* dw, const float* dout, const float* inp, const float* w,
                      const float* rstd, int64_t N, int64_t C);
void gelu_forward(float* out, const float* inp, int64_t n);
void gelu_backward(float* dinp, const float* dout, const float* inp, int64_t n);
void silu_forward(float* out, const float* inp, int64_t n);
void silu_backward(float* dinp, const float* dout, const float* inp, int64_t n);
void swiglu_forward(float* out, const float* gate, const float* up, int64_t n);
void swiglu_backward(float* dgate, float* dup, const float* dout, const float* gate,
                     const float* up, int64_t n);
void rope_forward(float* out, const float* inp, const float* cos, const float* sin, int64_t BH,
                  int64_t T, int64_t HS);
void rope_backward(float* dinp, const float* dout, const float* cos, const float* sin, int64_t BH,
                   int64_t T, int64_t HS);
void attention_forward(float* out, float* lse, const float* q, const float* k, const float* v,
                       int64_t B, int64_t NH, int64_t NKV, int64_t Tq, int64_t Tk, int64_t HS,
                       bool causal, int64_t kv_stride, const int64_t* kv_lengths);
void attention_backward(float* dq, float* dk, float* dv, const float* dout, const float* q,
                        const float* k, const float* v, const float* out, const float* lse,
                        int64_t B, int64_t NH, int64_t NKV, int64_t Tq, int64_t Tk, int64_t HS,
                        bool causal);
void embedding_forward(float* out, const int64_t* ids, const float* weight, int64_t N, int64_t V,
                       int64_t C);
void embedding_backward(float* dweight, const float* dout, const int64_t* ids, int64_t N,
                        int64_t V, int64_t C);
void adamw_update(float* param, float* m, float* v, const float* grad, int64_t n, double lr,
                  double beta1, double beta2, double eps, double weight_decay, double grad_scale,
                  int64_t step);
double fma_peak_gflops(double seconds);
void matmul_quant(float* out, const float* a, const uint8_t* w, int type, int64_t M, int64_t K, int64_t N,
                  bool int8_activations);
void dequantize_rows(float* out, const uint8_t* w, int type, int64_t rows, int64_t K);
void matmul_quant_backward(float* dx, const float* dout, const uint8_t* w, int type, int64_t M, int64_t K,
                           int64_t N);

}  // namespace PYLLM_ISA
}  // namespace pyllm
