// The SIMD vocabulary of the kernels: one float vector type whose width follows the
// instruction set this copy of the kernels is compiled for (16 lanes AVX-512, 8 AVX2, 4 otherwise).
// Not intrinsics: GCC/Clang vector extensions, so one source serves every width and the
// compiler picks the instructions; everything here lives in the ISA's own namespace so the
// copies compiled with different flags never meet at link time.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#ifndef PYLLM_ISA
#error "kernel sources are compiled once per ISA with -DPYLLM_ISA=<name>"
#endif

namespace pyllm {
namespace PYLLM_ISA {

#if defined(PYLLM_FORCE_WIDTH)  // testing only: e.g. the AVX-512 layout on an AVX2 machine
constexpr int W = PYLLM_FORCE_WIDTH;
#elif defined(__AVX512F__)
constexpr int W = 16;
#elif defined(__AVX2__)
constexpr int W = 8;
#else
constexpr int W = 4;
#endif

typedef float vf __attribute__((vector_size(W * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(W * sizeof(int32_t))));

static inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
static inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
// x in every lane. Written as (-0.0) + x, the one addition the compiler may drop (it is exact
// for every x), so this is a single broadcast; 0.0 + x would cost an add in hot loops.
static inline vf splat(float x) {
  const vi sign = vi{} + int32_t(0x80000000u);
  vf neg_zero;
  std::memcpy(&neg_zero, &sign, sizeof neg_zero);
  return neg_zero + x;
}
// The first min(n, W) lanes from p, zeros after: tails go through the same vector math as
// the body, so a result never depends on where a thread's chunk happened to end.
static inline vf load_partial(const float* p, int64_t n) {
  if (n >= W) return load(p);
  float tmp[W] = {};
  std::memcpy(tmp, p, n * sizeof(float));
  return load(tmp);
}
static inline void store_partial(float* p, vf v, int64_t n) {
  if (n >= W) return store(p, v);
  float tmp[W];
  store(tmp, v);
  std::memcpy(p, tmp, n * sizeof(float));
}

// W IEEE half-precision values (numpy's float16: a float16 KV cache) widened to floats, and W
// floats rounded to them (to nearest, ties to even), with F16C's conversions where the width has them.
static inline vf load_half(const uint16_t* p) {
#if defined(__AVX512F__) && !defined(PYLLM_FORCE_WIDTH)
  return vf(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
#elif defined(__AVX2__) && defined(__F16C__) && !defined(PYLLM_FORCE_WIDTH)
  return vf(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#else
  vf v;
  for (int i = 0; i < W; ++i) {
    _Float16 h;
    std::memcpy(&h, p + i, 2);
    v[i] = float(h);
  }
  return v;
#endif
}
static inline vf load_half_partial(const uint16_t* p, int64_t n) {
  if (n >= W) return load_half(p);
  uint16_t tmp[W] = {};
  std::memcpy(tmp, p, n * sizeof(uint16_t));
  return load_half(tmp);
}
static inline void store_half(uint16_t* p, vf v) {
#if defined(__AVX512F__) && !defined(PYLLM_FORCE_WIDTH)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(__m512(v), _MM_FROUND_TO_NEAREST_INT));
#elif defined(__AVX2__) && defined(__F16C__) && !defined(PYLLM_FORCE_WIDTH)
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(__m256(v), _MM_FROUND_TO_NEAREST_INT));
#else
  for (int i = 0; i < W; ++i) {
    const _Float16 h = _Float16(v[i]);
    std::memcpy(p + i, &h, 2);
  }
#endif
}
static inline void store_half_partial(uint16_t* p, vf v, int64_t n) {
  if (n >= W) return store_half(p, v);
  uint16_t tmp[W];
  store_half(tmp, v);
  std::memcpy(p, tmp, n * sizeof(uint16_t));
}
static inline vf vmax(vf a, vf b) { return a > b ? a : b; }
static inline vf vmin(vf a, vf b) { return a < b ? a : b; }
static inline float hsum(vf v) {
  float s = 0.f;
  for (int i = 0; i < W; ++i) s += v[i];
  return s;
}
static inline float hmax(vf v) {
  float m = v[0];
  for (int i = 1; i < W; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

// exp(x) to about 1 ulp (Cephes' expf): x = n ln2 + r with |r| <= ln2/2, a degree-5
// polynomial for exp(r), and 2^n built in the exponent bits. Below -87.3 gives 0 (no
// denormals); above 88 gives inf (exp(88.7) is the float limit; nothing here needs that last bit).
static inline vf vexp(vf x) {
  const vf hi = splat(88.0f), lo = splat(-87.3365447504f);
  vf xc = vmin(vmax(x, lo), hi);
  vf n = xc * 1.44269504088896341f;
  n = __builtin_convertvector(__builtin_convertvector(n + (n >= 0 ? splat(0.5f) : splat(-0.5f)), vi), vf);
  vf r = xc - n * 0.693359375f + n * 2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  vf scale;
  std::memcpy(&scale, &bits, sizeof scale);
  vf y = p * scale;
  y = x < lo ? splat(0.f) : y;
  y = x > hi ? splat(__builtin_inff()) : y;
  return x != x ? x : y;  // NaN in, NaN out
}

static inline vf vsigmoid(vf x) { return 1.0f / (1.0f + vexp(-x)); }

}  // namespace PYLLM_ISA
}  // namespace pyllm

namespace pyllm {
namespace PYLLM_ISA {

static inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

// A 64-byte aligned float scratch buffer owned by one scope (no raw new/delete).
class Scratch {
 public:
  explicit Scratch(size_t n) {
    size_t bytes = ((n * sizeof(float) + 63) / 64) * 64;
    data_ = static_cast<float*>(std::aligned_alloc(64, bytes ? bytes : 64));
    if (!data_) throw std::bad_alloc();
  }
  ~Scratch() { std::free(data_); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  float* data() { return data_; }

 private:
  float* data_;
};

// A per-thread buffer that grows and is kept for the thread's life: packing buffers reused
// across calls, so a GEMM does not page-fault fresh memory each time.
class ThreadBuffer {
 public:
  ~ThreadBuffer() { std::free(data_); }
  float* get(size_t n) {
    if (n > size_) {
      std::free(data_);
      data_ = nullptr;
      size_t bytes = ((n * sizeof(float) + 63) / 64) * 64;
      data_ = static_cast<float*>(std::aligned_alloc(64, bytes));
      if (!data_) throw std::bad_alloc();
      size_ = n;
    }
    return data_;
  }

 private:
  float* data_ = nullptr;
  size_t size_ = 0;
};

}  // namespace PYLLM_ISA
}  // namespace pyllm
