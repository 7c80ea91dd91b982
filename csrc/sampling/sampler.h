// Choosing the next token from a row of logits: penalties, temperature, top-k, top-p, min-p, and a
// seeded draw. Not vectorised per ISA: the work is a few passes over one row per sequence.
//
// Order (Hugging Face's): penalties on the raw logits, then temperature, top-k, top-p, min-p.
// The draw walks the kept tokens in ascending id order, so the chosen token depends only on the
// probabilities and the uniform number, never on a sort's tie order.
#pragma once

#include <cstdint>
#include <vector>

namespace pyllm {
namespace sampling {

struct Params {
  double temperature = 1.0;        // 0: greedy (the first largest logit)
  int64_t top_k = 0;               // 0: off
  double top_p = 1.0;              // 1: off
  double min_p = 0.0;              // 0: off
  double repetition_penalty = 1.0; // 1: off; > 1 makes seen tokens less likely (CTRL's rule)
  double presence_penalty = 0.0;   // subtracted once from every seen token's logit
  double frequency_penalty = 0.0;  // subtracted per occurrence
};

// The uniform number in [0, 1) for (seed, step): splitmix64 of a counter, 53 random bits.
double uniform(uint64_t seed, uint64_t step);

// Samples one token from logits[0..V). history holds the ids seen so far (for the penalties);
// probs, if not null, receives the distribution that was sampled from (V floats).
int64_t sample_row(const float* logits, int64_t V, const int64_t* history, int64_t n_history,
                   const Params& params, uint64_t seed, uint64_t step, float* probs);

}  // namespace sampling
}  // namespace pyllm
