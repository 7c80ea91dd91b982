// The decode step (step.h): the pre-norm block of pyllm/models/blocks.py, layer after layer, over
// the kernel table. Not compiled per ISA: it only sequences kernels, which pick their own copy.
#include "model/step.h"

#include <chrono>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "kernels/kernels.h"
#include "kernels/quant_types.h"

namespace pyllm {
namespace model {

const char* const kOpNames[] = {
#define PYLLM_STEP_OP_NAME(name) #name,
    PYLLM_STEP_OPS(PYLLM_STEP_OP_NAME)
#undef PYLLM_STEP_OP_NAME
};

namespace {

// Adds the time since the last mark to an operation's total, when profiling.
class Clock {
 public:
  explicit Clock(double* profile) : profile_(profile), last_(profile ? now() : 0) {}
  void mark(Op op) {
    if (!profile_) return;
    const int64_t t = now();
    profile_[int(op)] += double(t - last_);
    last_ = t;
  }

 private:
  static int64_t now() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(
               std::chrono::steady_clock::now().time_since_epoch()).count();
  }
  double* profile_;
  int64_t last_;
};

// The step's activation buffers, per calling thread (two threads may decode on one model), grown
// to the largest batch seen and reused.
struct Buffers {
  std::vector<float> x, ln, qkv, atty, proj, mlp1, mlp2, last, lnf, mean, rstd, lse, part, lora_u, lora_d, heads,
      heads_out;
  std::vector<int64_t> kv_lengths, window_kv_lengths;
};
thread_local Buffers buffers;

float* sized(std::vector<float>& v, int64_t n) {
  if (int64_t(v.size()) < n) v.resize(size_t(n));
  return v.data();
}

void add(float* x, const float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] += y[i];
}

// A product with quantized weights (packed rows with int8 activations: the integer products per
// row, so a row's result does not depend on what shares the batch).
void quantized(const Plan& plan, const Matrix& m, float* out, const float* x, int64_t M, int64_t K) {
  kernels().matmul_quant(out, x, m.q, m.type, M, K, m.out, plan.int8_activations, m.packed);
}

// out (M, lin.out) = x (M, lin.in) W^T + bias, plus the adapters: what layers.linear computes.
void linear(const Plan& plan, const Linear& lin, float* out, const float* x, int64_t M) {
  const KernelTable& k = kernels();
  const Matrix& first = lin.parts.front();
  if (lin.parts.size() == 1 && first.q == nullptr) {
    k.matmul_forward(out, x, first.f, lin.bias, M, lin.in, lin.out, !first.in_out);
  } else if (lin.parts.size() == 1) {
    quantized(plan, first, out, x, M, lin.in);
  } else {   // the parts of a fused product, each quantized in its own type
    for (const Matrix& part : lin.parts) {
      float* piece = sized(buffers.part, M * part.out);
      quantized(plan, part, piece, x, M, lin.in);
      for (int64_t i = 0; i < M; ++i)
        std::memcpy(out + i * lin.out + part.col, piece + i * part.out, sizeof(float) * part.out);
    }
  }
  if (lin.bias != nullptr && first.q != nullptr)
    for (int64_t i = 0; i < M; ++i) add(out + i * lin.out, lin.bias, lin.out);
  for (const Adapter& a : lin.adapters) {   // out[:, cols] += scale (x A^T) B^T, as pyllm.lora does
    float* u = sized(buffers.lora_u, M * a.rank);
    float* d = sized(buffers.lora_d, M * a.out);
    k.matmul_forward(u, x, a.A, nullptr, M, lin.in, a.rank, true);
    k.matmul_forward(d, u, a.B, nullptr, M, a.rank, a.out, true);
    for (int64_t i = 0; i < M * a.out; ++i) d[i] *= a.scale;
    for (int64_t i = 0; i < M; ++i) add(out + i * lin.out + a.col, d + i * a.out, a.out);
  }
}

// Two products of the same input (gate and up): for packed rows of one type with int8 activations
// and no bias or adapters, one call (the input rounded once, one parallel region); else one each.
void linear_pair(const Plan& plan, const Linear& a, const Linear& b, float* out_a, float* out_b, const float* x,
                 int64_t M) {
  const Matrix &ma = a.parts.front(), &mb = b.parts.front();
  if (plan.int8_activations && a.parts.size() == 1 && b.parts.size() == 1 && ma.packed && mb.packed &&
      ma.type == mb.type && !a.bias && !b.bias && a.adapters.empty() && b.adapters.empty()) {
    float* outs[2] = {out_a, out_b};
    const uint8_t* ws[2] = {ma.q, mb.q};
    const int64_t Ns[2] = {ma.out, mb.out};
    kernels().matmul_rows(outs, ws, Ns, 2, x, ma.type, M, a.in);
    return;
  }
  linear(plan, a, out_a, x, M);
  linear(plan, b, out_b, x, M);
}

void norm(const Plan& plan, float* out, const float* x, const float* w, const float* b, int64_t N) {
  Buffers& bf = buffers;
  if (plan.arch == Arch::kGPT2)
    kernels().layernorm_forward(out, sized(bf.mean, N), sized(bf.rstd, N), x, w, b, N, plan.C, plan.eps);
  else
    kernels().rmsnorm_forward(out, sized(bf.rstd, N), x, w, N, plan.C, plan.eps);
}

// The H heads of HS values at the start of each of N rows of `stride` values, each replaced by its
// RMSNorm with weights w: gathered one head a row, normalized by the one kernel, put back (as
// blocks.py's _head_norms does, for the same bits).
void head_norm(const Plan& plan, float* base, int64_t H, int64_t N, int64_t stride, const float* w) {
  Buffers& bf = buffers;
  const int64_t HS = plan.HS, width = H * HS;
  float* in = sized(bf.heads, N * width);
  float* out = sized(bf.heads_out, N * width);
  for (int64_t i = 0; i < N; ++i) std::memcpy(in + i * width, base + i * stride, sizeof(float) * width);
  kernels().rmsnorm_forward(out, sized(bf.rstd, N * H), in, w, N * H, HS, plan.eps);
  for (int64_t i = 0; i < N; ++i) std::memcpy(base + i * stride, out + i * width, sizeof(float) * width);
}

// What a sub-block adds to the residual: its output (N, C), or that through the RMSNorm after it
// (Gemma), written to out.
const float* post_norm(const Plan& plan, float* out, const float* x, const float* w, int64_t N) {
  if (w == nullptr) return x;
  kernels().rmsnorm_forward(out, sized(buffers.rstd, N), x, w, N, plan.C, plan.eps);
  return out;
}

void embed(const Plan& plan, float* x, const int64_t* ids, int64_t B, int64_t Tq, const int64_t* lengths) {
  const int64_t N = B * Tq, C = plan.C;
  const Matrix& e = plan.embedding;
  if (e.q == nullptr) {
    kernels().embedding_forward(x, ids, e.f, N, plan.V, C);
  } else {
    kernels().embed_quant(x, e.q, e.type, plan.V, C, ids, N, e.packed);
  }
  if (plan.embed_scale != 1.f)
    for (int64_t i = 0; i < N * C; ++i) x[i] *= plan.embed_scale;
  if (plan.positions != nullptr)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < Tq; ++t) add(x + (b * Tq + t) * C, plan.positions + (lengths[b] + t) * C, C);
}

// One layer's part of the cache: its keys and values, capacity, and each row's held positions.
struct LayerCache {
  void* k;
  void* v;
  int64_t capacity;
  const int64_t* held;      // (B,) positions before the step: where the new ones are written
  const int64_t* visible;   // (B,) held + Tq: the keys attention reads
};

// The new keys and values appended to the layer's cache, then the attention of q over it (float32
// or, KV = uint16_t, float16 cache: the kernels of each).
template <class KV>
void cache_attention(const Plan& plan, const Cache& cache, const LayerCache& lc, int64_t window, float* atty,
                     float* lse, const float* q, const float* kk, const float* vv, int64_t B, int64_t Tq,
                     HeadStrides q_s, HeadStrides att_s, Clock& clock) {
  const KernelTable& k = kernels();
  const int64_t NH = plan.NH, NKV = plan.NKV, HS = plan.HS, cap = lc.capacity;
  const HeadStrides cache_s{NKV * cap * HS, cap * HS, HS};
  KV* k_cache = static_cast<KV*>(lc.k);
  KV* v_cache = static_cast<KV*>(lc.v);
  constexpr bool half = std::is_same_v<KV, uint16_t>;
  if constexpr (half) {
    k.kv_write_half(k_cache, kk, lc.held, cache.rows, B, Tq, NKV, HS, cap, q_s);
    k.kv_write_half(v_cache, vv, lc.held, cache.rows, B, Tq, NKV, HS, cap, q_s);
  } else {
    k.kv_write(k_cache, kk, lc.held, cache.rows, B, Tq, NKV, HS, cap, q_s);
    k.kv_write(v_cache, vv, lc.held, cache.rows, B, Tq, NKV, HS, cap, q_s);
  }
  clock.mark(Op::kv_write);
  if constexpr (half)
    k.attention_forward_half(atty, lse, q, k_cache, v_cache, B, NH, NKV, Tq, cap, HS, true, window, lc.visible,
                             cache.rows, att_s, q_s, cache_s, cache_s);
  else
    k.attention_forward(atty, lse, q, k_cache, v_cache, B, NH, NKV, Tq, cap, HS, true, window, lc.visible,
                        cache.rows, att_s, q_s, cache_s, cache_s);
}

}  // namespace

void step(const Plan& plan, float* logits, const int64_t* ids, int64_t B, int64_t Tq, const int64_t* counts,
          const int64_t* lengths, const Cache& cache, const Rope& rope, double* profile) {
  const KernelTable& k = kernels();
  Clock clock(profile);
  Buffers& bf = buffers;
  const int64_t N = B * Tq, C = plan.C, NH = plan.NH, NKV = plan.NKV, HS = plan.HS;
  const int64_t QKV = (NH + 2 * NKV) * HS, cap = cache.capacity;
  float* x = sized(bf.x, N * C);
  float* ln = sized(bf.ln, N * C);
  float* qkv = sized(bf.qkv, N * QKV);
  float* atty = sized(bf.atty, N * NH * HS);
  float* proj = sized(bf.proj, N * C);
  float* lse = sized(bf.lse, N * NH);
  bf.kv_lengths.resize(size_t(B));
  for (int64_t b = 0; b < B; ++b) bf.kv_lengths[size_t(b)] = lengths[b] + Tq;
  if (cache.window_lengths != nullptr) {
    bf.window_kv_lengths.resize(size_t(B));
    for (int64_t b = 0; b < B; ++b) bf.window_kv_lengths[size_t(b)] = cache.window_lengths[b] + Tq;
  }
  const auto layer_cache = [&](size_t l) {
    const int64_t slot = cache.layer_slots ? cache.layer_slots[l] : int64_t(l);
    const int64_t f = cache.half ? 2 : 4;
    if (slot >= 0)
      return LayerCache{static_cast<char*>(cache.k) + slot * cache.layer_stride * f,
                        static_cast<char*>(cache.v) + slot * cache.layer_stride * f, cap, lengths,
                        bf.kv_lengths.data()};
    const int64_t w = -1 - slot;
    return LayerCache{static_cast<char*>(cache.k_window) + w * cache.window_layer_stride * f,
                      static_cast<char*>(cache.v_window) + w * cache.window_layer_stride * f, cache.window_capacity,
                      cache.window_lengths, bf.window_kv_lengths.data()};
  };
  // q, k and v are column blocks of qkv, tokens first; the cache keeps heads first.
  const HeadStrides q_s{Tq * QKV, HS, QKV}, att_s{Tq * NH * HS, HS, NH * HS};
  float *q = qkv, *kk = qkv + NH * HS, *vv = qkv + (NH + NKV) * HS;
  embed(plan, x, ids, B, Tq, lengths);
  clock.mark(Op::embed);
  for (size_t l = 0; l < plan.layers.size(); ++l) {
    const Layer& layer = plan.layers[l];
    norm(plan, ln, x, layer.norm1_w, layer.norm1_b, N);
    clock.mark(Op::norm);
    linear(plan, layer.qkv, qkv, ln, N);
    clock.mark(Op::qkv);
    if (layer.q_norm != nullptr) {
      head_norm(plan, q, NH, N, QKV, layer.q_norm);
      head_norm(plan, kk, NKV, N, QKV, layer.k_norm);
      clock.mark(Op::norm);
    }
    if (plan.arch == Arch::kLlama) {
      const float* cos = layer.local_rope ? rope.cos_local : rope.cos;
      const float* sin = layer.local_rope ? rope.sin_local : rope.sin;
      k.rope_forward(q, q, cos, sin, lengths, B, Tq, NH, HS, q_s, q_s);
      k.rope_forward(kk, kk, cos, sin, lengths, B, Tq, NKV, HS, q_s, q_s);
      if (plan.q_scale != 1.f)
        for (int64_t i = 0; i < N; ++i)
          for (int64_t j = 0; j < NH * HS; ++j) q[i * QKV + j] *= plan.q_scale;
      clock.mark(Op::rope);
    }
    const LayerCache lc = layer_cache(l);
    if (cache.half)
      cache_attention<uint16_t>(plan, cache, lc, layer.window, atty, lse, q, kk, vv, B, Tq, q_s, att_s, clock);
    else
      cache_attention<float>(plan, cache, lc, layer.window, atty, lse, q, kk, vv, B, Tq, q_s, att_s, clock);
    clock.mark(Op::attention);
    linear(plan, layer.o, proj, atty, N);
    clock.mark(Op::o);
    add(x, post_norm(plan, ln, proj, layer.post1_w, N), N * C);   // ln is free: qkv consumed it
    clock.mark(Op::residual);
    norm(plan, ln, x, layer.norm2_w, layer.norm2_b, N);
    clock.mark(Op::norm);
    const int64_t F = layer.mlp.front().out;
    float* h1 = sized(bf.mlp1, N * F);
    if (plan.arch == Arch::kGPT2) {
      linear(plan, layer.mlp[0], h1, ln, N);
      clock.mark(Op::mlp_in);
      k.gelu_forward(h1, h1, N * F);
      clock.mark(Op::activation);
      linear(plan, layer.mlp[1], proj, h1, N);
    } else {
      float* h2 = sized(bf.mlp2, N * F);
      linear_pair(plan, layer.mlp[0], layer.mlp[1], h1, h2, ln, N);
      clock.mark(Op::mlp_in);
      (plan.geglu ? k.geglu_forward : k.swiglu_forward)(h1, h1, h2, N * F);
      clock.mark(Op::activation);
      linear(plan, layer.mlp[2], proj, h1, N);
    }
    clock.mark(Op::mlp_out);
    add(x, post_norm(plan, ln, proj, layer.post2_w, N), N * C);
    clock.mark(Op::residual);
  }
  const float* last = x;
  if (Tq > 1) {
    float* rows = sized(bf.last, B * C);
    for (int64_t b = 0; b < B; ++b) {
      const int64_t t = (counts ? counts[b] : Tq) - 1;
      std::memcpy(rows + b * C, x + (b * Tq + t) * C, sizeof(float) * C);
    }
    last = rows;
  }
  float* lnf = sized(bf.lnf, B * C);
  norm(plan, lnf, last, plan.final_w, plan.final_b, B);
  clock.mark(Op::norm);
  linear(plan, plan.head, logits, lnf, B);
  if (plan.logit_softcap > 0.f) {
    const float c = plan.logit_softcap;
    for (int64_t i = 0; i < B * plan.V; ++i) logits[i] = std::tanh(logits[i] / c) * c;
  }
  clock.mark(Op::head);
}

}  // namespace model
}  // namespace pyllm
