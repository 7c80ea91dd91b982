#include "sampling/sampler.h"

#include <algorithm>
#include <functional>
#include <cmath>
#include <limits>

namespace pyllm {
namespace sampling {
namespace {

uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// Per-thread work arrays, reused from call to call (a call per token: no allocation per token).
thread_local std::vector<double> z_buffer, w_buffer;
thread_local std::vector<std::pair<double, int64_t>> heap_buffer;
thread_local std::vector<int64_t> order_buffer, ids_buffer;

// Penalised logits as doubles: each distinct id of history changed once, by its count.
std::vector<double>& penalised(const float* logits, int64_t V, const int64_t* history, int64_t n,
                               const Params& p) {
  std::vector<double>& x = z_buffer;
  x.assign(logits, logits + V);
  const bool any = p.repetition_penalty != 1.0 || p.presence_penalty != 0.0 || p.frequency_penalty != 0.0;
  if (!any || n == 0) return x;
  std::vector<int64_t> seen;
  for (int64_t i = 0; i < n; ++i)
    if (history[i] >= 0) seen.push_back(history[i]);   // negative ids pad ragged histories
  std::sort(seen.begin(), seen.end());
  for (size_t i = 0; i < seen.size();) {
    size_t j = i;
    while (j < seen.size() && seen[j] == seen[i]) ++j;
    double& v = x[seen[i]];
    if (p.repetition_penalty != 1.0) v = v > 0 ? v / p.repetition_penalty : v * p.repetition_penalty;
    v -= p.presence_penalty + p.frequency_penalty * double(j - i);
    i = j;
  }
  return x;
}

}  // namespace

double uniform(uint64_t seed, uint64_t step) {
  return double(splitmix64(seed + step * 0xD1B54A32D192ED03ull) >> 11) * 0x1.0p-53;
}

int64_t sample_row(const float* logits, int64_t V, const int64_t* history, int64_t n_history,
                   const Params& p, uint64_t seed, uint64_t step, float* probs) {
  const bool penalties = p.repetition_penalty != 1.0 || p.presence_penalty != 0.0 || p.frequency_penalty != 0.0;
  if (p.temperature == 0.0 && !penalties && !probs)   // greedy: the first largest logit, as below
    return std::max_element(logits, logits + V) - logits;
  std::vector<double>& z = penalised(logits, V, history, n_history, p);
  if (p.temperature == 0.0) {
    const int64_t best = std::max_element(z.begin(), z.end()) - z.begin();
    if (probs) {
      std::fill(probs, probs + V, 0.f);
      probs[best] = 1.f;
    }
    return best;
  }
  // Shifted by the largest logit before dividing, so a tiny temperature cannot overflow to inf.
  const double xmax = *std::max_element(z.begin(), z.end());
  if (xmax != -std::numeric_limits<double>::infinity())
    for (double& v : z) v = (v - xmax) / p.temperature;
  // The kept candidates (top-k: the k largest logits, ties to the smaller id) in order[0, kept),
  // in ascending id order; top-p orders only as many of them by logit as it needs.
  std::vector<int64_t>& order = order_buffer;
  auto before = [&](int64_t a, int64_t b) { return z[a] > z[b] || (z[a] == z[b] && a < b); };
  int64_t kept = V;
  if (p.top_k > 0 && p.top_k < V) {
    // One pass keeping the k best seen so far in a heap whose front is the worst of them (on the
    // scaled logits: scaling can make two logits equal, and equals go to the smaller id).
    using Entry = std::pair<double, int64_t>;
    auto better = [](const Entry& a, const Entry& b) { return a.first > b.first || (a.first == b.first && a.second < b.second); };
    std::vector<Entry>& heap = heap_buffer;
    heap.clear();
    for (int64_t i = 0; i < V; ++i) {
      if (int64_t(heap.size()) < p.top_k) {
        heap.emplace_back(z[i], i);
        std::push_heap(heap.begin(), heap.end(), better);
      } else if (better(Entry(z[i], i), heap.front())) {
        std::pop_heap(heap.begin(), heap.end(), better);
        heap.back() = Entry(z[i], i);
        std::push_heap(heap.begin(), heap.end(), better);
      }
    }
    order.clear();
    for (const Entry& e : heap) order.push_back(e.second);
    std::sort(order.begin(), order.end());
    kept = p.top_k;
  } else {
    order.resize(V);
    for (int64_t i = 0; i < V; ++i) order[i] = i;
  }
  double zmax = -std::numeric_limits<double>::infinity();
  for (int64_t r = 0; r < kept; ++r) zmax = std::max(zmax, z[order[r]]);
  if (zmax == -std::numeric_limits<double>::infinity()) {
    // Every logit is -inf: nothing is possible but a uniform choice.
    for (int64_t r = 0; r < kept; ++r) z[order[r]] = 0.0;
  }
  const double top = zmax == -std::numeric_limits<double>::infinity() ? 0.0 : zmax;
  // The kept ids in ascending order (the others weigh 0): sums run in that order, as the numpy
  // twin's cumsum does, so both round alike.
  std::vector<int64_t>& ids = ids_buffer;
  ids.assign(order.begin(), order.begin() + kept);
  // Unnormalised probabilities of the kept tokens, 0 elsewhere: the buffer is all zeros between
  // calls (the kept entries are cleared before returning; nothing below allocates or throws).
  std::vector<double>& w = w_buffer;
  if (int64_t(w.size()) != V) w.assign(V, 0.0);
  for (int64_t r = 0; r < kept; ++r) w[order[r]] = std::exp(z[order[r]] - top);
  auto sum = [&] {
    double t = 0.0;
    for (int64_t i : ids) t += w[i];
    return t;
  };
  double total = sum();
  if (p.top_p < 1.0) {
    // The smallest prefix (by probability) whose mass reaches top_p: order prefixes of growing
    // length until one is enough, so a peaked distribution sorts only a few tokens.
    int64_t sorted = 0, need = std::min<int64_t>(kept, 64);
    double mass = 0.0, goal = p.top_p * total;
    int64_t cut = kept;
    while (true) {
      std::partial_sort(order.begin() + sorted, order.begin() + need, order.begin() + kept, before);
      for (; sorted < need; ++sorted) {
        mass += w[order[sorted]];
        if (mass >= goal) break;
      }
      if (sorted < need) { cut = sorted + 1; break; }
      if (need == kept) break;
      need = std::min(kept, need * 4);
    }
    for (int64_t r = cut; r < kept; ++r) w[order[r]] = 0.0;
    kept = cut;
  }
  if (p.min_p > 0.0) {
    for (int64_t r = 0; r < kept; ++r)
      if (w[order[r]] < p.min_p) w[order[r]] = 0.0;   // the largest weight is exp(0) = 1
  }
  total = sum();
  const double target = uniform(seed, step) * total;
  int64_t chosen = -1, last = -1;
  double cumulative = 0.0;
  for (int64_t i : ids) {
    if (w[i] == 0.0) continue;
    last = i;
    cumulative += w[i];
    if (chosen < 0 && cumulative > target) chosen = i;
  }
  if (chosen < 0) chosen = last;   // rounding at the very top of the range
  if (probs)
    for (int64_t i = 0; i < V; ++i) probs[i] = float(w[i] / total);
  for (int64_t i : ids) w[i] = 0.0;
  return chosen;
}

}  // namespace sampling
}  // namespace pyllm
