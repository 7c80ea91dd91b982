// Matmul against weights kept in ggml's block-quantized formats (Q8_0, Q4_0, Q4_1: blocks of 32
// values with a float16 scale, and for Q4_1 a float16 minimum; Q5_0 and Q5_1 with a fifth bit per
// value; the K-quants Q4_K and Q6_K: super-blocks of 256 values with per-sub-block scales),
// activations in float32. Q8_0, Q4_0, Q4_1 (and with int8 activations Q5_0, Q5_1) have
// register-level decode paths; the other types expand each row to floats first.
// out (M, N) = a (M, K) @ W^T with W (N, K) stored row by row as K/32 blocks.
//
// Decode-sized M: each weight block is expanded to 32 floats once and multiplied with every row
// of a; the scale is applied per block, and Q4_1's minimum (and Q4_0's offset of 8) through the
// per-block sums of a, computed once per call. Larger M: the weights are expanded to float32
// in parallel and the GEMM does the product.
#include <cmath>
#include <cstring>
#include <vector>

#include "kernels/quant_blocks.h"
#include "kernels/quant_packed.h"
#include "threads.h"

namespace pyllm {
namespace PYLLM_ISA {
namespace {

thread_local ThreadBuffer block_sums_buffer, expanded_weights;
thread_local std::vector<uint8_t> unpacked_rows;

// Rows of W expanded to floats at a time (about 4 MB), a whole number of packed groups.
int64_t expansion_rows(int64_t N, int64_t K) {
  const int64_t rows = imax(kPackedRows, (int64_t(1) << 20) / imax(1, K) / kPackedRows * kPackedRows);
  return imin(N, rows);
}

}  // namespace

namespace {

// Rows first..first+count of the (N, K) matrix w as floats: of a packed one, each row back in
// ggml's layout (a few hundred bytes) and decoded.
void dequantize_range(float* out, const uint8_t* w, int type, int64_t N, int64_t K, int64_t first, int64_t count,
                      bool packed) {
  if (!packed) return dequantize_rows(out, w + first * row_bytes_of(type, K), type, count, K, false);
  const int64_t rb = row_bytes_of(type, K);
  parallel_for(count, imax(1, 16384 / imax(1, K)), [&](int64_t r0, int64_t r1) {
    if (int64_t(unpacked_rows.size()) < rb) unpacked_rows.resize(size_t(rb));
    for (int64_t r = r0; r < r1; ++r) {
      unpack_row(unpacked_rows.data(), w, N, first + r, type, K);
      dequantize_rows(out + r * K, unpacked_rows.data(), type, 1, K, false);
    }
  });
}

}  // namespace

void embed_quant(float* out, const uint8_t* w, int type, int64_t N, int64_t K, const int64_t* ids, int64_t count,
                 bool packed) {
  for (int64_t i = 0; i < count; ++i) dequantize_range(out + i * K, w, type, N, K, ids[i], 1, packed);
}

void dequantize_rows(float* out, const uint8_t* w, int type, int64_t rows, int64_t K, bool packed) {
  if (packed) return dequantize_range(out, w, type, rows, K, 0, rows, true);
  if (expanded_per_row(type)) {
    const int64_t bv = quant_block_values(type), nb = K / bv, bb = block_bytes(type);
    parallel_for(rows, imax(1, 16384 / imax(1, K)), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t b = 0; b < nb; ++b) expand_block_to_floats(w + (r * nb + b) * bb, type, out + r * K + b * bv);
    });
    return;
  }
  const int64_t nb = K / QK, bb = block_bytes(type);
  parallel_for(rows, imax(1, 16384 / imax(1, K)), [&](int64_t r0, int64_t r1) {
    alignas(64) float q[QK];
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t b = 0; b < nb; ++b) {
        float d, m;
        expand_block(w + (r * nb + b) * bb, type, q, d, m);
        const float z = zero_point(type);
        float* o = out + r * K + b * QK;
        for (int t = 0; t < QK; ++t) o[t] = (q[t] + z) * d + m;
      }
  });
}

namespace {

// out[r] for R consecutive weight rows against one row of quantized activations: each
// activation block is loaded once for the R rows, which also gives R independent sums.
template <int Type, int R>
inline void rows_dot(float* out, const uint8_t* rows, int64_t row_bytes, const ActBlock* x,
                     int64_t nb) {
  constexpr int64_t bb = quant_block_bytes(Type);
  float extra[R];   // Q4_0's zero point and Q4_1's minimum, through the activation block sums
#if defined(__AVX2__)
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps(), extra[r] = 0.f;
  for (int64_t b = 0; b < nb; ++b) {
    const __m256i xq = _mm256_load_si256(reinterpret_cast<const __m256i*>(x[b].q));
    for (int r = 0; r < R; ++r) {
      const uint8_t* blk = rows + r * row_bytes + b * bb;
      float dw, mw;
      block_scales<Type>(blk, dw, mw);
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block_idot8<Type>(blk, xq)), _mm256_set1_ps(dw * x[b].d), acc[r]);
      if (Type == kQ4_0) extra[r] -= 8.f * dw * x[b].dsum;
      if (Type == kQ5_0) extra[r] -= 16.f * dw * x[b].dsum;
      if (Type == kQ4_1 || Type == kQ5_1) extra[r] += mw * x[b].dsum;
    }
  }
  for (int r = 0; r < R; ++r) out[r] = hsum256(acc[r]) + extra[r];
#else
  float acc[R];
  for (int r = 0; r < R; ++r) acc[r] = 0.f, extra[r] = 0.f;
  for (int64_t b = 0; b < nb; ++b)
    for (int r = 0; r < R; ++r) {
      const uint8_t* blk = rows + r * row_bytes + b * bb;
      float dw, mw;
      block_scales<Type>(blk, dw, mw);
      acc[r] += dw * x[b].d * float(block_idot<Type>(blk, x[b].q));
      if (Type == kQ4_0) extra[r] -= 8.f * dw * x[b].dsum;
      if (Type == kQ5_0) extra[r] -= 16.f * dw * x[b].dsum;
      if (Type == kQ4_1 || Type == kQ5_1) extra[r] += mw * x[b].dsum;
    }
  for (int r = 0; r < R; ++r) out[r] = acc[r] + extra[r];
#endif
}

thread_local std::vector<ActBlock> act_blocks;
thread_local ThreadBuffer fake_quantized;

template <int Type>
void matmul_quant_int8_typed(float* out, const ActBlock* xs, const uint8_t* w, int64_t M, int64_t K, int64_t N) {
  constexpr int R = Type == kQ8_0 ? 1 : 4;
  const int64_t nb = K / QK, row_bytes = nb * block_bytes(Type);
  // Prefetch distance: about 2 KB of weights ahead, in whole groups.
  const int64_t ahead = (2048 + R * row_bytes - 1) / (R * row_bytes);
  // Work items are groups of R weight rows, handed out in four runs per thread (one memory stream
  // each: many small runs restart the stream and make the threads fight over the counter).
  const int64_t groups = (N + R - 1) / R;
  parallel_for(groups, imax(1, groups / (4 * num_threads())), [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t j = g * R;
      const uint8_t* rows = w + j * row_bytes;
      // The next groups' rows, requested now: decode streams the weights from memory once per
      // token, and the hardware prefetcher alone leaves the loads waiting.
      if (g + ahead < g1) {
        const uint8_t* next = rows + ahead * R * row_bytes;
        for (int64_t off = 0; off < R * row_bytes; off += 64) __builtin_prefetch(next + off, 0, 3);
      }
      for (int64_t i = 0; i < M; ++i) {
        if (j + R <= N) {
          rows_dot<Type, R>(out + i * N + j, rows, row_bytes, xs + i * nb, nb);
        } else {
          for (int64_t jj = j; jj < N; ++jj)
            rows_dot<Type, 1>(out + i * N + jj, w + jj * row_bytes, row_bytes, xs + i * nb, nb);
        }
      }
    }
  });
}

void matmul_quant_int8(float* out, const float* a, const uint8_t* w, int type, int64_t M, int64_t K,
                       int64_t N) {
  act_blocks.resize(size_t(M * (K / QK)));
  ActBlock* xs = act_blocks.data();
  quantize_activations(xs, a, M, K);
  switch (type) {
    case kQ8_0: return matmul_quant_int8_typed<kQ8_0>(out, xs, w, M, K, N);
    case kQ4_0: return matmul_quant_int8_typed<kQ4_0>(out, xs, w, M, K, N);
    case kQ4_1: return matmul_quant_int8_typed<kQ4_1>(out, xs, w, M, K, N);
    case kQ5_0: return matmul_quant_int8_typed<kQ5_0>(out, xs, w, M, K, N);
    case kQ5_1: return matmul_quant_int8_typed<kQ5_1>(out, xs, w, M, K, N);
  }
}

#if defined(__AVX2__)
thread_local std::vector<ActBlockK> act_blocks_k;

template <int Type>
void matmul_k_quant_int8_typed(float* out, const ActBlockK* xs, const uint8_t* w, int64_t M, int64_t K, int64_t N) {
  const int64_t nb = K / 256, rb = row_bytes_of(Type, K);
  const int64_t ahead = (2048 + rb - 1) / rb;
  parallel_for(N, imax(1, N / (4 * num_threads())), [&](int64_t j0, int64_t j1) {   // four runs per thread
    for (int64_t j = j0; j < j1; ++j) {
      const uint8_t* row = w + j * rb;
      if (j + ahead < j1)
        for (int64_t off = 0; off < rb; off += 64) __builtin_prefetch(row + ahead * rb + off, 0, 3);
      for (int64_t i = 0; i < M; ++i) {
        float acc = 0.f;
        for (int64_t b = 0; b < nb; ++b) acc += k_block_idot<Type>(row + b * block_bytes(Type), xs[i * nb + b]);
        out[i * N + j] = acc;
      }
    }
  });
}

void matmul_k_quant_int8(float* out, const float* a, const uint8_t* w, int type, int64_t M, int64_t K, int64_t N) {
  act_blocks_k.resize(size_t(M * (K / 256)));
  quantize_activations_k(act_blocks_k.data(), a, M, K);
  if (type == kQ4_K) return matmul_k_quant_int8_typed<kQ4_K>(out, act_blocks_k.data(), w, M, K, N);
  return matmul_k_quant_int8_typed<kQ6_K>(out, act_blocks_k.data(), w, M, K, N);
}
#endif

thread_local ThreadBuffer expanded_row;

// Decode-sized M with expanded_per_row weights: each row expanded into a buffer that stays in L1,
// then dotted with every row of a.
void matmul_expanded_rows(float* out, const float* a, const uint8_t* w, int type, int64_t M, int64_t K,
                         int64_t N) {
  const int64_t rb = row_bytes_of(type, K), bv = quant_block_values(type), nb = K / bv;
  parallel_for(N, imax(1, 16384 / imax(1, rb)), [&](int64_t j0, int64_t j1) {
    float* row = expanded_row.get(size_t(K));
    for (int64_t j = j0; j < j1; ++j) {
#if defined(__AVX2__)
      if (M == 1 && (type == kQ4_K || type == kQ6_K)) {   // decode: the values go straight into the sums
        __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
        for (int64_t b = 0; b < nb; ++b) {
          const float* x = a + b * 256;
          auto accumulate = [&](int t, __m256 v) { acc[(t >> 3) & 1] = _mm256_fmadd_ps(v, _mm256_loadu_ps(x + t), acc[(t >> 3) & 1]); };
          k_block_values(w + j * rb + b * block_bytes(type), type, accumulate);
        }
        out[j] = hsum256(_mm256_add_ps(acc[0], acc[1]));
        continue;
      }
#endif
      for (int64_t b = 0; b < nb; ++b) expand_block_to_floats(w + j * rb + b * block_bytes(type), type, row + b * bv);
      for (int64_t i = 0; i < M; ++i) {
        const float* x = a + i * K;
        vf acc0 = splat(0.f), acc1 = splat(0.f);
        for (int64_t t = 0; t < K; t += 2 * W) {   // K is a multiple of 32, so of 2 W
          acc0 += load(row + t) * load(x + t);
          acc1 += load(row + t + W) * load(x + t + W);
        }
        out[i * N + j] = hsum(acc0 + acc1);
      }
    }
  });
}

void matmul_quant_float(float* out, const float* a, const uint8_t* w, int type, int64_t M, int64_t K,
                        int64_t N, bool packed) {
  if (M > 4 || packed) {
    // Row chunks of W expanded into a buffer of about 4 MB, each multiplied by the GEMM.
    const int64_t chunk = expansion_rows(N, K);
    float* wf = expanded_weights.get(size_t(chunk * K));
    for (int64_t j0 = 0; j0 < N; j0 += chunk) {
      const int64_t n = imin(chunk, N - j0);
      dequantize_range(wf, w, type, N, K, j0, n, packed);
      gemm(M, n, K, MatView{a, K, 1}, MatView{wf, 1, K}, out + j0, N, false);
    }
    return;
  }
  if (expanded_per_row(type)) return matmul_expanded_rows(out, a, w, type, M, K, N);
  const int64_t nb = K / QK, bb = block_bytes(type);
  // Per row of a: the sum of each block of K (for the minimum and the zero point).
  float* sums = block_sums_buffer.get(size_t(M * nb));
  for (int64_t i = 0; i < M; ++i)
    for (int64_t b = 0; b < nb; ++b) {
      vf s = splat(0.f);
      for (int64_t t = 0; t < QK; t += W) s += load(a + i * K + b * QK + t);
      sums[i * nb + b] = hsum(s);
    }
  const float z = zero_point(type);
  parallel_for(N, imax(1, 8192 / imax(1, K)), [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      vf acc[4];
      float extra[4] = {0.f, 0.f, 0.f, 0.f};
      for (int64_t i = 0; i < M; ++i) acc[i] = splat(0.f);
      const uint8_t* row = w + j * nb * bb;
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* blk = row + b * bb;
        const float d = half_to_float(blk);
        const float m = type == kQ4_1 ? half_to_float(blk + 2) : 0.f;
        const vf dv = splat(d);
        for (int64_t i = 0; i < M; ++i) {
          acc[i] += block_dot(blk, type, a + i * K + b * QK) * dv;
          extra[i] += (m + z * d) * sums[i * nb + b];
        }
      }
      for (int64_t i = 0; i < M; ++i) out[i * N + j] = hsum(acc[i]) + extra[i];
    }
  });
}

}  // namespace

void matmul_quant_backward(float* dx, const float* dout, const uint8_t* w, int type, int64_t M, int64_t K,
                           int64_t N, bool packed) {
  // Row chunks of W expanded as in matmul_quant_float; each adds dout[:, chunk] @ W[chunk].
  const int64_t chunk = expansion_rows(N, K);
  float* wf = expanded_weights.get(size_t(chunk * K));
  for (int64_t j0 = 0; j0 < N; j0 += chunk) {
    const int64_t n = imin(chunk, N - j0);
    dequantize_range(wf, w, type, N, K, j0, n, packed);
    gemm(M, K, n, MatView{dout + j0, N, 1}, MatView{wf, K, 1}, dx, K, j0 > 0);
  }
}

void matmul_quant(float* out, const float* a, const uint8_t* w, int type, int64_t M, int64_t K,
                  int64_t N, bool int8_activations, bool packed) {
  if (!int8_activations) return matmul_quant_float(out, a, w, type, M, K, N, packed);
  if (packed) return matmul_rows(&out, &w, &N, 1, a, type, M, K);   // integer products at any M
  if (type == kQ4_K || type == kQ6_K) {   // rounded as Q8_K: integer products, or the float ones
#if defined(__AVX2__)
    if (M <= 4) return matmul_k_quant_int8(out, a, w, type, M, K, N);
#endif
    float* xf = fake_quantized.get(size_t(M * K));
    fake_quantize_activations_k(xf, a, M, K);
    return matmul_quant_float(out, xf, w, type, M, K, N, packed);
  }
  if (M <= 4) return matmul_quant_int8(out, a, w, type, M, K, N);
  // Prompts: the activations rounded exactly as the integer path rounds them, then the GEMM.
  float* xf = fake_quantized.get(size_t(M * K));
  fake_quantize_activations(xf, a, M, K);
  matmul_quant_float(out, xf, w, type, M, K, N, packed);
}

}  // namespace PYLLM_ISA
}  // namespace pyllm
