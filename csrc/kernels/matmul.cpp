// GEMM in the BLIS style: operands packed into cache-sized panels, a register-blocked
// micro-kernel of MR x NR outputs, threads over tiles of C; and matmul's forward/backward on it.
// Not a call into an outside BLAS, and no transposed copies: transposes are strides (MatView).
#include <cstring>

#include "kernels/isa.h"
#include "threads.h"

namespace pyllm {
namespace PYLLM_ISA {
namespace {

// Micro-tile: MR rows x NR = NV vectors of columns, all accumulators in registers
// (AVX2: 6 x 16 = 12 ymm of 16; AVX-512: 14 x 32 = 28 zmm of 32; SSE: 4 x 8 = 8 xmm).
constexpr int NV = 2;
constexpr int NR = NV * W;
constexpr int MR = W == 16 ? 14 : (W == 8 ? 6 : 4);
// Cache blocking: a KC x NR panel of B stays in L1 while MR x KC panels of A stream from an
// MC x KC block kept in L2; the KC x NC block of B sits in L2/L3.
// (Measured on Zen 3 for AVX2; AVX-512's KC keeps its 32-column B panel within a 32 KB L1.)
#ifndef PYLLM_GEMM_KC
#define PYLLM_GEMM_KC (W == 16 ? 256 : 384)
#endif
constexpr int64_t KC = PYLLM_GEMM_KC;
constexpr int64_t MC = MR * (W == 16 ? 8 : 16);
constexpr int64_t NC = NR * (W == 16 ? 64 : 96);

thread_local ThreadBuffer pack_a_buffer, pack_b_buffer;

// A (mc x kc block at i0, k0) -> MR-row panels, each stored k-major (kc x MR), zero padded.
void pack_a(float* dst, MatView A, int64_t i0, int64_t k0, int64_t mc, int64_t kc) {
  for (int64_t ir = 0; ir < mc; ir += MR) {
    const int64_t rows = imin(MR, mc - ir);
    const float* src = A.p + (i0 + ir) * A.rs + k0 * A.cs;
    if (rows < MR) std::memset(dst, 0, sizeof(float) * kc * MR);
    if (A.rs == 1 && rows == MR) {  // transposed operand: the MR rows of one k are contiguous
      for (int64_t k = 0; k < kc; ++k)
#pragma GCC unroll 16
        for (int r = 0; r < MR; ++r) dst[k * MR + r] = src[k * A.cs + r];
    } else if (A.rs == 1) {
      for (int64_t k = 0; k < kc; ++k) std::memcpy(dst + k * MR, src + k * A.cs, sizeof(float) * rows);
    } else {
      for (int64_t r = 0; r < rows; ++r) {
        const float* row = src + r * A.rs;
        for (int64_t k = 0; k < kc; ++k) dst[k * MR + r] = row[k * A.cs];
      }
    }
    dst += kc * MR;
  }
}

// B (kc x nc block at k0, j0) -> NR-column panels, each stored k-major (kc x NR), zero padded.
void pack_b(float* dst, MatView B, int64_t k0, int64_t j0, int64_t kc, int64_t nc) {
  for (int64_t jr = 0; jr < nc; jr += NR) {
    const int64_t cols = imin(NR, nc - jr);
    const float* src = B.p + k0 * B.rs + (j0 + jr) * B.cs;
    if (cols < NR) std::memset(dst, 0, sizeof(float) * kc * NR);
    if (B.cs == 1 && cols == NR) {  // row-major B: the NR columns of one k are contiguous
      for (int64_t k = 0; k < kc; ++k)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) store(dst + k * NR + v * W, load(src + k * B.rs + v * W));
    } else if (B.cs == 1) {
      for (int64_t k = 0; k < kc; ++k) std::memcpy(dst + k * NR, src + k * B.rs, sizeof(float) * cols);
    } else {
      for (int64_t j = 0; j < cols; ++j) {
        const float* col = src + j * B.cs;
        for (int64_t k = 0; k < kc; ++k) dst[k * NR + j] = col[k * B.rs];
      }
    }
    dst += kc * NR;
  }
}

// c (MR x NR, row stride ldc) = or += a (kc x MR panel) . b (kc x NR panel).
inline void micro_kernel(int64_t kc, const float* __restrict a, const float* __restrict b,
                         float* __restrict c, int64_t ldc, bool accumulate) {
  // C is usually far out of cache; start fetching its tile now, it is needed after the k loop.
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) __builtin_prefetch(c + r * ldc, 1, 3);
  vf acc[MR][NV];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = splat(0.f);
  for (int64_t k = 0; k < kc; ++k) {
    vf bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = load(b + v * W);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const vf ar = splat(a[r]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] += ar * bv[v];
    }
    a += MR;
    b += NR;
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      float* p = c + r * ldc + v * W;
      store(p, accumulate ? load(p) + acc[r][v] : acc[r][v]);
    }
}

// C block (mc x nc) from packed A (mc x kc) and packed B (kc x nc); edge tiles go through a
// full-size temporary so the micro-kernel never reads or writes outside C.
void macro_kernel(int64_t mc, int64_t nc, int64_t kc, const float* ap, const float* bp, float* C,
                  int64_t ldc, bool accumulate) {
  for (int64_t jr = 0; jr < nc; jr += NR) {
    const int64_t cols = imin(NR, nc - jr);
    for (int64_t ir = 0; ir < mc; ir += MR) {
      const int64_t rows = imin(MR, mc - ir);
      float* c = C + ir * ldc + jr;
      if (rows == MR && cols == NR) {
        micro_kernel(kc, ap + ir * kc, bp + jr * kc, c, ldc, accumulate);
      } else {
        alignas(64) float tmp[MR * NR];
        micro_kernel(kc, ap + ir * kc, bp + jr * kc, tmp, NR, false);
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t j = 0; j < cols; ++j)
            c[r * ldc + j] = accumulate ? c[r * ldc + j] + tmp[r * NR + j] : tmp[r * NR + j];
      }
    }
  }
}

// One thread's share of C: rows [m0, m1), columns [n0, n1), all of K.
void gemm_tile(int64_t m0, int64_t m1, int64_t n0, int64_t n1, int64_t K, MatView A, MatView B,
               float* C, int64_t ldc, bool accumulate) {
  float* bufb = pack_b_buffer.get(KC * imin(NC, n1 - n0 + NR));
  float* bufa = pack_a_buffer.get(KC * imin(MC, m1 - m0 + MR));
  for (int64_t jc = n0; jc < n1; jc += NC) {
    const int64_t nc = imin(NC, n1 - jc);
    for (int64_t pc = 0; pc < K; pc += KC) {
      const int64_t kc = imin(KC, K - pc);
      pack_b(bufb, B, pc, jc, kc, nc);
      for (int64_t ic = m0; ic < m1; ic += MC) {
        const int64_t mc = imin(MC, m1 - ic);
        pack_a(bufa, A, ic, pc, mc, kc);
        macro_kernel(mc, nc, kc, bufa, bufb, C + ic * ldc + jc, ldc, accumulate || pc > 0);
      }
    }
  }
}

void zero_or_keep(int64_t M, int64_t N, float* C, int64_t ldc, bool accumulate) {
  if (accumulate) return;
  for (int64_t i = 0; i < M; ++i) std::memset(C + i * ldc, 0, sizeof(float) * N);
}

}  // namespace

void gemm_serial(int64_t M, int64_t N, int64_t K, MatView A, MatView B, float* C, int64_t ldc,
                 bool accumulate) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) return zero_or_keep(M, N, C, ldc, accumulate);
  gemm_tile(0, M, 0, N, K, A, B, C, ldc, accumulate);
}

void gemm(int64_t M, int64_t N, int64_t K, MatView A, MatView B, float* C, int64_t ldc,
          bool accumulate) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) return zero_or_keep(M, N, C, ldc, accumulate);
  if (2.0 * M * N * K < 2e6 || num_threads() == 1)  // too small to pay for waking the pool
    return gemm_tile(0, M, 0, N, K, A, B, C, ldc, accumulate);
  // BLIS's loop nest with the threads inside it: each KC x NC block of B is packed once, by
  // all threads together, then the threads take (MC rows x column group) items of C from a
  // shared counter, each packing its own block of A. Taking items dynamically keeps both cores
  // busy when one runs slower; the arithmetic of every element is the same whatever thread
  // does it, so results do not depend on the thread count.
  const int64_t row_blocks = (M + MC - 1) / MC;
  float* bufb = pack_b_buffer.get(KC * (imin(NC, N) + NR));
  for (int64_t jc = 0; jc < N; jc += NC) {
    const int64_t nc = imin(NC, N - jc);
    const int64_t panels = (nc + NR - 1) / NR;
    // Few row blocks (a wide, short C): also split the columns, in whole NR panels.
    const int64_t groups = imin(panels, imax(1, (4 * num_threads() + row_blocks - 1) / row_blocks));
    const int64_t panels_per_group = (panels + groups - 1) / groups;
    for (int64_t pc = 0; pc < K; pc += KC) {
      const int64_t kc = imin(KC, K - pc);
      parallel_for(panels, 4, [&](int64_t p0, int64_t p1) {
        const int64_t j0 = p0 * NR, j1 = imin(nc, p1 * NR);
        pack_b(bufb + j0 * kc, B, pc, jc + j0, kc, j1 - j0);
      });
      const bool acc = accumulate || pc > 0;
      parallel_for(row_blocks * groups, 1, [&](int64_t t0, int64_t t1) {
        float* bufa = pack_a_buffer.get(KC * (MC + MR));
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t ic = (t / groups) * MC, mc = imin(MC, M - ic);
          const int64_t j0 = (t % groups) * panels_per_group * NR;
          if (j0 >= nc) continue;
          const int64_t j1 = imin(nc, j0 + panels_per_group * NR);
          pack_a(bufa, A, ic, pc, mc, kc);
          macro_kernel(mc, j1 - j0, kc, bufa, bufb + j0 * kc, C + ic * ldc + jc + j0, ldc, acc);
        }
      });
    }
  }
}

namespace {

thread_local ThreadBuffer row_buffer;

// out (M, N) = a (M, K) @ B for a few rows (decode-sized M): B streams once straight from
// memory instead of being packed, which would cost as much as the product itself. Each work item
// owns a block of output columns and keeps several independent accumulators, so the FMAs of one
// row do not wait on each other.
void matmul_few_rows(float* out, const float* a, const float* b, int64_t M, int64_t K, int64_t N,
                     bool trans_b) {
  if (!trans_b) {
    // One wide block of columns per thread, accumulated in a buffer that stays in L1 while
    // long contiguous stretches of B's rows stream past (what the hardware prefetcher follows),
    // four rows per pass: acc += a[i,k..k+4) . b[k..k+4, j..j+CW).
    const int64_t CW = imin(4096, imax(W, (N + num_threads() - 1) / num_threads() + W - 1) / W * W);
    const int64_t blocks = (N + CW - 1) / CW;
    parallel_for(blocks, 1, [&](int64_t c0, int64_t c1) {
      float* acc = row_buffer.get(CW);
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t j = c * CW, width = imin(CW, N - j), full = width / W * W, rest = width - full;
        for (int64_t i = 0; i < M; ++i) {
          const float* x = a + i * K;
          for (int64_t v = 0; v < width; ++v) acc[v] = 0.f;
          int64_t k = 0;
          for (; k + 4 <= K; k += 4) {
            const vf x0 = splat(x[k]), x1 = splat(x[k + 1]), x2 = splat(x[k + 2]), x3 = splat(x[k + 3]);
            const float *r0 = b + k * N + j, *r1 = r0 + N, *r2 = r1 + N, *r3 = r2 + N;
            for (int64_t v = 0; v < full; v += W)
              store(acc + v, load(acc + v) + x0 * load(r0 + v) + x1 * load(r1 + v) + x2 * load(r2 + v) +
                                 x3 * load(r3 + v));
            if (rest)
              store_partial(acc + full, load_partial(acc + full, rest) + x0 * load_partial(r0 + full, rest) +
                                            x1 * load_partial(r1 + full, rest) + x2 * load_partial(r2 + full, rest) +
                                            x3 * load_partial(r3 + full, rest), rest);
          }
          for (; k < K; ++k) {
            const vf xk = splat(x[k]);
            const float* r = b + k * N + j;
            for (int64_t v = 0; v < full; v += W) store(acc + v, load(acc + v) + xk * load(r + v));
            if (rest) store_partial(acc + full, load_partial(acc + full, rest) + xk * load_partial(r + full, rest), rest);
          }
          for (int64_t v = 0; v < width; ++v) out[i * N + j + v] = acc[v];
        }
      }
    });
  } else {
    // out[i, j] = dot(a[i, :], b[j, :]): RB rows of b at a time, each with two accumulators. Four
    // runs of consecutive rows per thread, each one stream from memory (many small items restart
    // the stream and make the threads fight over the counter), the next rows requested ahead.
    constexpr int64_t RB = 4;
    const int64_t groups = (N + RB - 1) / RB;
    parallel_for(groups, imax(1, groups / (4 * num_threads())), [&](int64_t g0, int64_t g1) {
      for (int64_t g = g0; g < g1; ++g) {
        const int64_t j0 = g * RB, rows = imin(RB, N - j0);
        if (g + 1 < g1)
          for (int64_t off = 0; off < RB * K; off += 16) __builtin_prefetch(b + (j0 + RB) * K + off, 0, 3);
        for (int64_t i = 0; i < M; ++i) {
          const float* x = a + i * K;
          vf acc0[RB], acc1[RB];
          for (int64_t r = 0; r < RB; ++r) acc0[r] = acc1[r] = splat(0.f);
          int64_t k = 0;
          if (rows == RB) {
            for (; k + 2 * W <= K; k += 2 * W) {
              const vf x0 = load(x + k), x1 = load(x + k + W);
              for (int64_t r = 0; r < RB; ++r) {
                const float* y = b + (j0 + r) * K + k;
                acc0[r] += x0 * load(y);
                acc1[r] += x1 * load(y + W);
              }
            }
          }
          for (int64_t r = 0; r < rows; ++r) {
            const float* y = b + (j0 + r) * K;
            int64_t kk = k;
            for (; kk + W <= K; kk += W) acc0[r] += load(x + kk) * load(y + kk);
            if (kk < K) acc0[r] += load_partial(x + kk, K - kk) * load_partial(y + kk, K - kk);
            out[i * N + j0 + r] = hsum(acc0[r] + acc1[r]);
          }
        }
      }
    });
  }
}

}  // namespace

void matmul_forward(float* out, const float* a, const float* b, const float* bias, int64_t M,
                    int64_t K, int64_t N, bool trans_b) {
  constexpr int64_t kFewRows = 4;
  if (M <= kFewRows && K > 0) {
    matmul_few_rows(out, a, b, M, K, N, trans_b);
  } else {
    const MatView A{a, K, 1};
    const MatView B = trans_b ? MatView{b, 1, K} : MatView{b, N, 1};
    gemm(M, N, K, A, B, out, N, false);
  }
  if (bias) {
    parallel_for(M, imax(1, 16384 / imax(1, N)), [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0; i < r1; ++i)
        for (int64_t j = 0; j < N; j += W) {
          const int64_t w = imin(W, N - j);
          store_partial(out + i * N + j, load_partial(out + i * N + j, w) + load_partial(bias + j, w), w);
        }
    });
  }
}

void matmul_backward(float* da, float* db, float* dbias, const float* dout, const float* a,
                     const float* b, int64_t M, int64_t K, int64_t N, bool trans_b) {
  const MatView dC{dout, N, 1}, dCt{dout, 1, N}, At{a, 1, K};
  if (da) {  // da (M, K) = dout (M, N) @ B^T, where B^T (N, K) is b read with swapped strides
    const MatView Bt = trans_b ? MatView{b, K, 1} : MatView{b, 1, N};
    gemm(M, K, N, dC, Bt, da, K, false);
  }
  if (db) {
    if (trans_b)
      gemm(N, K, M, dCt, MatView{a, K, 1}, db, K, true);  // db (N, K) += dout^T @ a
    else
      gemm(K, N, M, At, dC, db, N, true);                  // db (K, N) += a^T @ dout
  }
  if (dbias) {
    // Column sums. Each item owns a block of 8 vectors of columns, summed in registers over the
    // rows in order: contiguous reads, and a result that does not depend on the thread count.
    constexpr int kVecs = 8;
    constexpr int64_t kCols = kVecs * W;
    parallel_for((N + kCols - 1) / kCols, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t j0 = c * kCols, n = imin(kCols, N - j0);
        vf acc[kVecs];
#pragma GCC unroll 8
        for (int v = 0; v < kVecs; ++v) acc[v] = load_partial(dbias + j0 + v * W, imax(0, n - v * W));
        if (n == kCols) {
          for (int64_t i = 0; i < M; ++i)
#pragma GCC unroll 8
            for (int v = 0; v < kVecs; ++v) acc[v] += load(dout + i * N + j0 + v * W);
        } else {
          for (int64_t i = 0; i < M; ++i)
            for (int v = 0; v < kVecs; ++v)
              acc[v] += load_partial(dout + i * N + j0 + v * W, imax(0, n - v * W));
        }
        for (int v = 0; v < kVecs; ++v) store_partial(dbias + j0 + v * W, acc[v], imax(0, n - v * W));
      }
    });
  }
}

}  // namespace PYLLM_ISA
}  // namespace pyllm
