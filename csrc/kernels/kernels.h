// The kernel table: every C++ kernel's signature, once. Each ISA's copy of the kernels
// fills one table (kernels/table.cpp); csrc/dispatch.cpp hands out the best one the CPU runs.
// Not where kernels are written (kernels/<family>.cpp) nor checked (pyllm/kernels.py, bindings).
//
// Conventions (llm.c's): arguments are outputs, saved values, inputs, weights, then dims;
// forward kernels overwrite their outputs; backward kernels OVERWRITE the gradients of their
// inputs (dinp, da, dq, dk, dv, dlogits, ...) and ACCUMULATE (+=) into the gradients of
// parameters (dw, db, dbias, matmul's db, dweight), so micro-batches add up in one buffer
// that the caller zeroes once per step. A null gradient pointer means "not needed".
// cross_entropy_backward may be given dlogits == logits (in place).
// All arrays are C-contiguous float32 (ids and targets int64); dims are int64_t.
#pragma once

#include <cstdint>

namespace pyllm {

// ggml's type ids for the block formats matmul_quant reads.
enum QuantType { kQ4_0 = 2, kQ4_1 = 3, kQ5_0 = 6, kQ5_1 = 7, kQ8_0 = 8, kQ4_K = 12, kQ6_K = 14 };

// Values per block of a quantized type (32, or 256 for the K-quants' super-blocks), 0 if unknown.
inline int64_t quant_block_values(int type) {
  switch (type) {
    case kQ4_0: case kQ4_1: case kQ5_0: case kQ5_1: case kQ8_0: return 32;
    case kQ4_K: case kQ6_K: return 256;
  }
  return 0;
}
// Bytes per block: float16 scale(s) and the packed values.
inline int64_t quant_block_bytes(int type) {
  switch (type) {
    case kQ4_0: return 18;
    case kQ4_1: return 20;
    case kQ5_0: return 22;    // d (f16), the 32 fifth bits, 32 nibbles
    case kQ5_1: return 24;    // d, m (f16), the 32 fifth bits, 32 nibbles
    case kQ8_0: return 34;
    case kQ4_K: return 144;   // d, dmin (f16), 8 x (6-bit scale, 6-bit min) in 12 bytes, 256 nibbles
    case kQ6_K: return 210;   // 256 x (4 low bits + 2 high bits), 16 int8 scales, d (f16)
  }
  return 0;
}

struct KernelTable {
  const char* isa;

  // out (M, N) = a (M, K) @ b (K, N) + bias (N) [bias may be null]; trans_b: b is (N, K).
  void (*matmul_forward)(float* out, const float* a, const float* b, const float* bias,
                         int64_t M, int64_t K, int64_t N, bool trans_b);
  // da (M, K) = dout @ b^T; db (K, N) [(N, K) if trans_b] += a^T @ dout; dbias (N) += sum of rows.
  void (*matmul_backward)(float* da, float* db, float* dbias, const float* dout, const float* a,
                          const float* b, int64_t M, int64_t K, int64_t N, bool trans_b);

  void (*softmax_forward)(float* out, const float* inp, int64_t N, int64_t C);
  void (*softmax_backward)(float* dinp, const float* dout, const float* out, int64_t N, int64_t C);
  // losses (N), lse (N) from logits (N, V); rows whose target is ignore_index get loss 0.
  void (*cross_entropy_forward)(float* losses, float* lse, const float* logits,
                                const int64_t* targets, int64_t N, int64_t V, int64_t ignore_index);
  // dlogits = (softmax(logits) - onehot(target)) * scale for kept rows, 0 for ignored rows.
  void (*cross_entropy_backward)(float* dlogits, const float* logits, const float* lse,
                                 const int64_t* targets, float scale, int64_t N, int64_t V,
                                 int64_t ignore_index);

  void (*layernorm_forward)(float* out, float* mean, float* rstd, const float* inp, const float* w,
                            const float* b, int64_t N, int64_t C, float eps);
  void (*layernorm_backward)(float* dinp, float* dw, float* db, const float* dout, const float* inp,
                             const float* w, const float* mean, const float* rstd, int64_t N,
                             int64_t C);
  void (*rmsnorm_forward)(float* out, float* rstd, const float* inp, const float* w, int64_t N,
                          int64_t C, float eps);
  void (*rmsnorm_backward)(float* dinp, float* dw, const float* dout, const float* inp,
                           const float* w, const float* rstd, int64_t N, int64_t C);

  void (*gelu_forward)(float* out, const float* inp, int64_t n);
  void (*gelu_backward)(float* dinp, const float* dout, const float* inp, int64_t n);
  void (*silu_forward)(float* out, const float* inp, int64_t n);
  void (*silu_backward)(float* dinp, const float* dout, const float* inp, int64_t n);
  void (*swiglu_forward)(float* out, const float* gate, const float* up, int64_t n);
  void (*swiglu_backward)(float* dgate, float* dup, const float* dout, const float* gate,
                          const float* up, int64_t n);

  // inp, out (BH, T, HS) with HS even; cos, sin (T, HS/2). out may be inp (in place).
  void (*rope_forward)(float* out, const float* inp, const float* cos, const float* sin,
                       int64_t BH, int64_t T, int64_t HS);
  void (*rope_backward)(float* dinp, const float* dout, const float* cos, const float* sin,
                        int64_t BH, int64_t T, int64_t HS);

  // q, out (B, NH, Tq, HS); k, v (B, NKV, kv_stride, HS) of which the first Tk rows per head
  // are keys (kv_stride >= Tk; a KV cache is longer than what it holds); lse (B, NH, Tq).
  // kv_lengths, if not null, gives batch row b its own key count (<= Tk), for ragged batches.
  // Causal aligns the last query with the last key: query i sees keys j <= i + Tk - Tq.
  void (*attention_forward)(float* out, float* lse, const float* q, const float* k, const float* v,
                            int64_t B, int64_t NH, int64_t NKV, int64_t Tq, int64_t Tk, int64_t HS,
                            bool causal, int64_t kv_stride, const int64_t* kv_lengths);
  void (*attention_backward)(float* dq, float* dk, float* dv, const float* dout, const float* q,
                             const float* k, const float* v, const float* out, const float* lse,
                             int64_t B, int64_t NH, int64_t NKV, int64_t Tq, int64_t Tk, int64_t HS,
                             bool causal);

  void (*embedding_forward)(float* out, const int64_t* ids, const float* weight, int64_t N,
                            int64_t V, int64_t C);
  void (*embedding_backward)(float* dweight, const float* dout, const int64_t* ids, int64_t N,
                             int64_t V, int64_t C);

  void (*adamw_update)(float* param, float* m, float* v, const float* grad, int64_t n, double lr,
                       double beta1, double beta2, double eps, double weight_decay, double grad_scale,
                       int64_t step);

  // GFLOP/s of a register-only FMA loop on every pool thread: the machine's measured fp32 peak.
  double (*fma_peak_gflops)(double seconds);

  // Block-quantized weights (ggml's Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q6_K; QuantType above): w holds N rows
  // of K / quant_block_values blocks. matmul_quant: out (M, N) = a (M, K) @ W^T. dequantize_rows:
  // out (rows, K) = W. int8_activations: a is first rounded per block of 32 to int8 with a float16
  // scale, as llama.cpp does (integer dot products for decode-sized M; for the K-quants per block
  // of 256 with a float32 scale, as llama.cpp's Q8_K, then float products).
  void (*matmul_quant)(float* out, const float* a, const uint8_t* w, int type, int64_t M, int64_t K,
                       int64_t N, bool int8_activations);
  void (*dequantize_rows)(float* out, const uint8_t* w, int type, int64_t rows, int64_t K);
  // The input gradient through a frozen quantized weight: dx (M, K) = dout (M, N) @ W.
  void (*matmul_quant_backward)(float* dx, const float* dout, const uint8_t* w, int type, int64_t M,
                                int64_t K, int64_t N);
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

}  // namespace pyllm
