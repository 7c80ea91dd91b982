// Rotary position embedding, Hugging Face's "rotate half" layout: the pair (x[i], x[i + HS/2])
// is rotated by angle[t, i]. Not the interleaved GPT-J layout (a GGUF loader permutes to this).
#include "kernels/isa.h"
#include "threads.h"

namespace pyllm {
namespace PYLLM_ISA {
namespace {

// out = R(sign * angle) inp for inp (BH, T, HS), cos/sin (T, HS/2); out may be inp.
void rotate(float* out, const float* inp, const float* cos, const float* sin, int64_t BH,
            int64_t T, int64_t HS, float sign) {
  const int64_t half = HS / 2;
  parallel_for(BH * T, imax(1, 4096 / imax(1, HS)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t t = r % T;
      const float *x = inp + r * HS, *c = cos + t * half, *s = sin + t * half;
      float* y = out + r * HS;
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

void rope_forward(float* out, const float* inp, const float* cos, const float* sin, int64_t BH,
                  int64_t T, int64_t HS) {
  rotate(out, inp, cos, sin, BH, T, HS, 1.0f);
}

void rope_backward(float* dinp, const float* dout, const float* cos, const float* sin, int64_t BH,
                   int64_t T, int64_t HS) {
  rotate(dinp, dout, cos, sin, BH, T, HS, -1.0f);  // the inverse rotation
}

}  // namespace PYLLM_ISA
}  // namespace pyllm
