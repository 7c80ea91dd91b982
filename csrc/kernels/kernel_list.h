// Every kernel's signature, written once: PYLLM_KERNELS(X) calls X(name, return type, (parameters))
// for each, and kernels.h expands it into the KernelTable, isa.h into each ISA's declarations,
// table.cpp into the table entries. Not documentation of the arguments' meaning: that sits beside
// each entry here, and the conventions at the top of kernels.h.
//
// Order of arguments (llm.c's): outputs, saved values, inputs, weights, then dims.
#pragma once

#define PYLLM_KERNELS(X)                                                                              \
  /* out (M, N) = a (M, K) @ b (K, N) + bias (N) [bias may be null]; trans_b: b is (N, K). */        \
  X(matmul_forward, void, (float* out, const float* a, const float* b, const float* bias,            \
                           int64_t M, int64_t K, int64_t N, bool trans_b))                            \
  /* da (M, K) = dout @ b^T; db (K, N) [(N, K) if trans_b] += a^T @ dout; dbias (N) += row sums. */   \
  X(matmul_backward, void, (float* da, float* db, float* dbias, const float* dout, const float* a,   \
                            const float* b, int64_t M, int64_t K, int64_t N, bool trans_b))           \
  X(softmax_forward, void, (float* out, const float* inp, int64_t N, int64_t C))                      \
  X(softmax_backward, void, (float* dinp, const float* dout, const float* out, int64_t N, int64_t C)) \
  /* losses (N), lse (N) from logits (N, V); rows whose target is ignore_index get loss 0. */          \
  X(cross_entropy_forward, void, (float* losses, float* lse, const float* logits,                    \
                                  const int64_t* targets, int64_t N, int64_t V, int64_t ignore_index)) \
  /* dlogits = (softmax(logits) - onehot(target)) * scale for kept rows, 0 for ignored rows. */        \
  X(cross_entropy_backward, void, (float* dlogits, const float* logits, const float* lse,            \
                                   const int64_t* targets, float scale, int64_t N, int64_t V,         \
                                   int64_t ignore_index))                                             \
  X(layernorm_forward, void, (float* out, float* mean, float* rstd, const float* inp, const float* w, \
                              const float* b, int64_t N, int64_t C, float eps))                       \
  X(layernorm_backward, void, (float* dinp, float* dw, float* db, const float* dout,                 \
                               const float* inp, const float* w, const float* mean,                   \
                               const float* rstd, int64_t N, int64_t C))                              \
  X(rmsnorm_forward, void, (float* out, float* rstd, const float* inp, const float* w, int64_t N,    \
                            int64_t C, float eps))                                                    \
  X(rmsnorm_backward, void, (float* dinp, float* dw, const float* dout, const float* inp,            \
                             const float* w, const float* rstd, int64_t N, int64_t C))                \
  X(gelu_forward, void, (float* out, const float* inp, int64_t n))                                    \
  X(gelu_backward, void, (float* dinp, const float* dout, const float* inp, int64_t n))               \
  X(silu_forward, void, (float* out, const float* inp, int64_t n))                                    \
  X(silu_backward, void, (float* dinp, const float* dout, const float* inp, int64_t n))               \
  X(swiglu_forward, void, (float* out, const float* gate, const float* up, int64_t n))                \
  X(swiglu_backward, void, (float* dgate, float* dup, const float* dout, const float* gate,          \
                            const float* up, int64_t n))                                              \
  /* gelu(gate) * up, gelu the tanh form (Gemma's feed-forward). */                                     \
  X(geglu_forward, void, (float* out, const float* gate, const float* up, int64_t n))                \
  X(geglu_backward, void, (float* dgate, float* dup, const float* dout, const float* gate,          \
                            const float* up, int64_t n))                                              \
  /* cos, sin (P, HS/2): the rotation angles p / (theta^(2i / HS) freq_factors[i]) of positions   \
     p = positions[r] [positions null: r; freq_factors null: 1], computed in double precision. */   \
  X(rope_tables, void, (float* cos, float* sin, const double* positions, int64_t P, int64_t HS,      \
                        double theta, const double* freq_factors))                                    \
  /* inp, out (B, T, H, HS) at any strides (values contiguous), HS even; the rotation of (b, t) is  \
     row pos0[b] + t of cos, sin (P, HS/2) [pos0 null: t]. out may be inp (in place). */             \
  X(rope_forward, void, (float* out, const float* inp, const float* cos, const float* sin,           \
                         const int64_t* pos0, int64_t B, int64_t T, int64_t H, int64_t HS,            \
                         HeadStrides out_s, HeadStrides inp_s))                                        \
  X(rope_backward, void, (float* dinp, const float* dout, const float* cos, const float* sin,        \
                          const int64_t* pos0, int64_t B, int64_t T, int64_t H, int64_t HS,           \
                          HeadStrides dinp_s, HeadStrides dout_s))                                     \
  /* cache (rows, H, capacity, HS) row (r_b, h, pos0[b] + t) = src (B, T, H, HS) row (b, t, h): new   \
     keys or values appended to a KV cache (src at any strides, values contiguous); r_b = rows[b],   \
     or b when rows is null (the cache rows of a continuous batch need not be consecutive). */       \
  X(kv_write, void, (float* cache, const float* src, const int64_t* pos0, const int64_t* rows,        \
                     int64_t B, int64_t T, int64_t H, int64_t HS, int64_t capacity, HeadStrides src_s)) \
  /* The same into a float16 cache (IEEE half, rounded to nearest even). */                          \
  X(kv_write_half, void, (uint16_t* cache, const float* src, const int64_t* pos0, const int64_t* rows, \
                          int64_t B, int64_t T, int64_t H, int64_t HS, int64_t capacity,              \
                          HeadStrides src_s))                                                         \
  /* q, out (B, NH, Tq, HS) and k, v (B, NKV, Tk, HS), each at its own strides (values contiguous); \
     lse (B, NH, Tq). kv_lengths, if not null, gives batch row b its own key count (<= Tk), for     \
     ragged batches; kv_rows, if not null, the row of k and v it reads (a continuous batch's cache   \
     rows). Causal aligns the last query with the last key: query i sees keys                      \
     j <= i + Tk - Tq (Tk the row's own count); a window > 0 (causal only) keeps the last `window`  \
     of those, j > i + Tk - Tq - window (sliding-window attention). */                               \
  X(attention_forward, void, (float* out, float* lse, const float* q, const float* k, const float* v, \
                              int64_t B, int64_t NH, int64_t NKV, int64_t Tq, int64_t Tk, int64_t HS, \
                              bool causal, int64_t window, const int64_t* kv_lengths,                \
                              const int64_t* kv_rows, HeadStrides out_s, HeadStrides q_s,             \
                              HeadStrides k_s, HeadStrides v_s))                                      \
  /* The same with k and v float16 (a half-precision KV cache), widened as they are read. */          \
  X(attention_forward_half, void, (float* out, float* lse, const float* q, const uint16_t* k,        \
                                   const uint16_t* v, int64_t B, int64_t NH, int64_t NKV, int64_t Tq, \
                                   int64_t Tk, int64_t HS, bool causal, int64_t window,               \
                                   const int64_t* kv_lengths, const int64_t* kv_rows,                 \
                                   HeadStrides out_s, HeadStrides q_s, HeadStrides k_s,               \
                                   HeadStrides v_s))                                                  \
  /* dq, dk, dv at the strides of q, k, v; dout and out at out_s. */                                   \
  X(attention_backward, void, (float* dq, float* dk, float* dv, const float* dout, const float* q,   \
                               const float* k, const float* v, const float* out, const float* lse,    \
                               int64_t B, int64_t NH, int64_t NKV, int64_t Tq, int64_t Tk,            \
                               int64_t HS, bool causal, int64_t window, HeadStrides out_s,            \
                               HeadStrides q_s, HeadStrides k_s, HeadStrides v_s))                    \
  /* probs (B, NH, Tq, Tk), C-contiguous: the softmax weights attention_forward used, recomputed    \
     from q, k and its lse (as backward does), 0 where a query does not see a key. */                 \
  X(attention_probabilities, void, (float* probs, const float* q, const float* k, const float* lse,   \
                                    int64_t B, int64_t NH, int64_t NKV, int64_t Tq, int64_t Tk,       \
                                    int64_t HS, bool causal, int64_t window, HeadStrides q_s,         \
                                    HeadStrides k_s))                                                 \
  X(embedding_forward, void, (float* out, const int64_t* ids, const float* weight, int64_t N,        \
                              int64_t V, int64_t C))                                                  \
  X(embedding_backward, void, (float* dweight, const float* dout, const int64_t* ids, int64_t N,     \
                               int64_t V, int64_t C))                                                 \
  X(adamw_update, void, (float* param, float* m, float* v, const float* grad, int64_t n, double lr,  \
                         double beta1, double beta2, double eps, double weight_decay,                 \
                         double grad_scale, int64_t step))                                            \
  /* GFLOP/s of a register-only FMA loop on every pool thread: the machine's measured fp32 peak. */   \
  X(fma_peak_gflops, double, (double seconds))                                                        \
  /* GB/s of every pool thread summing a 256 MB buffer: the machine's measured memory read bandwidth. */ \
  X(read_bandwidth_gbps, double, (double seconds))                                                    \
  /* Block-quantized weights (quant_types.h): w holds N rows of K / block_values blocks, in ggml's   \
     layout or (packed, for the types that have one) pack_quant's. out (M, N) = a (M, K) @ W^T.      \
     int8_activations: a is first rounded as llama.cpp rounds it (per block of 32 to int8 with a     \
     float16 scale; for the K-quants per block of 256 with a float32 scale, as Q8_K), for integer    \
     dot products: packed rows at any M (matmul_rows), ggml's layout at up to 4 rows (prompts run    \
     the GEMM on the rounded values). */                                                              \
  X(matmul_quant, void, (float* out, const float* a, const uint8_t* w, int type, int64_t M,          \
                         int64_t K, int64_t N, bool int8_activations, bool packed))                   \
  /* out (rows, K) = the float32 values of the matrix of `rows` rows of blocks. */                    \
  X(dequantize_rows, void, (float* out, const uint8_t* w, int type, int64_t rows, int64_t K,         \
                            bool packed))                                                             \
  /* out (count, K) = rows ids[0..count) of the (N, K) matrix w as float32 (an embedding lookup). */  \
  X(embed_quant, void, (float* out, const uint8_t* w, int type, int64_t N, int64_t K,                \
                        const int64_t* ids, int64_t count, bool packed))                              \
  /* The rows of a packed type (quant_types.h) interleaved in groups of 16 for integer products      \
     (quant_packed.cpp); the same bytes. */                                                           \
  X(pack_quant, void, (uint8_t* out, const uint8_t* w, int type, int64_t rows, int64_t K))            \
  /* outs[p] (M, Ns[p]) = a (M, K) @ W_p^T for `parts` packed matrices of one type that read the     \
     same input (Llama's gate and up), each row of a a sequence of its own (a decode batch): a is     \
     rounded to int8 per block of 32 (Q8_0) once and multiplied in integers, so a row gets the same   \
     result whatever else shares the batch. */                                                         \
  X(matmul_rows, void, (float* const* outs, const uint8_t* const* ws, const int64_t* Ns, int64_t parts, \
                        const float* a, int type, int64_t M, int64_t K))                              \
  /* The input gradient through a frozen quantized weight: dx (M, K) = dout (M, N) @ W. */            \
  X(matmul_quant_backward, void, (float* dx, const float* dout, const uint8_t* w, int type,          \
                                  int64_t M, int64_t K, int64_t N, bool packed))
