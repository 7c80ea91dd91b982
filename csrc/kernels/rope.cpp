// Rotary position embedding, Hugging Face's "rotate half" layout: the pair (x[i], x[i + HS/2])
// is rotated by angle[p, i] at position p. Heads are read and written at any strides, so rope
// runs in place on the q and k columns of a fused qkv projection, each batch row at its own
// starting position (a ragged batch). Not the interleaved GPT-J layout (a GGUF loader permutes
// to this one); KV-cache writes are kv_write's (kv_cache.cpp).
#include <cmath>
#include <vector>

#include "kernels/isa.h"
#include "threads.h"

namespace pyllm {
namespace PYLLM_ISA {
namespace {

// out = R(sign * angle) inp, rows (b, t, h) of (B, T, H, HS); out may be inp.
void rotate(float* out, const float* inp, const float* cos, const float* sin, const int64_t* pos0,
            int64_t B, int64_t T, int64_t H, int64_t HS, HeadStrides os, HeadStrides is, float sign) {
  const int64_t half = HS / 2;
  parallel_for(B * T * H, imax(1, 4096 / imax(1, HS)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t h = r % H, t = (r / H) % T, b = r / (H * T);
      const int64_t p = (pos0 ? pos0[b] : 0) + t;
      const float *x = inp + b * is.batch + t * is.pos + h * is.head, *c = cos + p * half, *s = sin + p * half;
      float* y = out + b * os.batch + t * os.pos + h * os.head;
      for (int64_t i = 0; i < half; i += W) {
        const int64_t n = imin(W, half - i);
        const vf x1 = load_partial(x + i, n), x2 = load_partial(x + half + i, n);
        const vf cv = load_partial(c + i, n), sv = sign * load_partial(s + i, n);
        // Both halves are read before either is stored, so out may be inp.
        store_partial(y + i, x1 * cv - x2 * sv, n);
        store_partial(y + half + i, x2 * cv + x1 * sv, n);
      }
    }
  });
}
}  // namespace

void rope_tables(float* cos, float* sin, const double* positions, int64_t P, int64_t HS, double theta,
                 const double* freq_factors) {
  const int64_t half = HS / 2;
  std::vector<double> inv_freq(static_cast<size_t>(half));
  for (int64_t i = 0; i < half; ++i) {
    inv_freq[size_t(i)] = 1.0 / std::pow(theta, double(2 * i) / double(HS));
    if (freq_factors) inv_freq[size_t(i)] /= freq_factors[i];   // scaled rope (Llama 3): slower frequencies
  }
  parallel_for(P, imax(1, 4096 / imax(1, half)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const double p = positions ? positions[r] : double(r);
      for (int64_t i = 0; i < half; ++i) {
        double s, c;
        ::sincos(p * inv_freq[size_t(i)], &s, &c);   // both at once (glibc); the same values as cos, sin
        cos[r * half + i] = float(c);
        sin[r * half + i] = float(s);
      }
    }
  });
}

void rope_forward(float* out, const float* inp, const float* cos, const float* sin, const int64_t* pos0,
                  int64_t B, int64_t T, int64_t H, int64_t HS, HeadStrides out_s, HeadStrides inp_s) {
  rotate(out, inp, cos, sin, pos0, B, T, H, HS, out_s, inp_s, 1.0f);
}

void rope_backward(float* dinp, const float* dout, const float* cos, const float* sin, const int64_t* pos0,
                   int64_t B, int64_t T, int64_t H, int64_t HS, HeadStrides dinp_s, HeadStrides dout_s) {
  rotate(dinp, dout, cos, sin, pos0, B, T, H, HS, dinp_s, dout_s, -1.0f);  // the inverse rotation
}

}  // namespace PYLLM_ISA
}  // namespace pyllm
