// The decode step of a whole model in C++: new tokens of a batch of sequences through every layer,
// their keys and values appended to the KV cache, the logits of each row's last new token out.
// What pyllm/models/blocks.py's block is, run with no Python between the kernels: the same kernels
// (through the KernelTable), in the same order, on the same buffers, so it gives the same bits.
// Not training (no saved activations, no backward: blocks.py), and not where weights come from (a
// Plan only points at arrays the Python model owns).
//
// Shape legend: B batch rows, Tq new tokens per row, N = B * Tq, C channels, NH query heads, NKV
// key/value heads, HS head size, F feed-forward width, V vocabulary, L layers.
#pragma once

#include <cstdint>
#include <vector>

namespace pyllm {
namespace model {

enum class Arch { kGPT2, kLlama };

// One weight matrix of `out` rows of `in` inputs: float32 stored (out, in) (or (in, out) when
// in_out, GPT-2's Conv1D), or ggml blocks (out rows of quantized values).
struct Matrix {
  const float* f = nullptr;
  bool in_out = false;
  const uint8_t* q = nullptr;
  int type = 0;
  bool packed = false;   // q in pack_quant's layout
  int64_t out = 0, in = 0;
  int64_t col = 0;   // where its outputs go in the product it is part of (a fused q|k|v)
};

// A LoRA adapter on columns [col, col + out) of a product: out += scale (x A^T) B^T, A (rank, in),
// B (out, rank).
struct Adapter {
  const float* A = nullptr;
  const float* B = nullptr;
  int64_t rank = 0, out = 0, col = 0;
  float scale = 0.f;
};

// out (M, out) = x (M, in) W^T + bias, W one matrix or the column blocks of a fused product.
struct Linear {
  int64_t in = 0, out = 0;
  std::vector<Matrix> parts;
  const float* bias = nullptr;
  std::vector<Adapter> adapters;
};

struct Layer {
  const float *norm1_w = nullptr, *norm1_b = nullptr, *norm2_w = nullptr, *norm2_b = nullptr;
  Linear qkv, o;
  std::vector<Linear> mlp;   // GPT-2: c_fc, c_proj. Llama (and Gemma): gate, up, down.
  const float *q_norm = nullptr, *k_norm = nullptr;   // Qwen3: an RMSNorm (HS weights) on each q and k head
  const float *post1_w = nullptr, *post2_w = nullptr;  // Gemma: RMSNorms after attention and the feed-forward
  int64_t window = 0;                 // > 0: sliding-window attention over the last `window` keys
  bool local_rope = false;            // rope from the local tables (Gemma's sliding layers)
};

struct Plan {
  Arch arch = Arch::kLlama;
  int64_t C = 0, NH = 0, NKV = 0, HS = 0, F = 0, V = 0;
  float eps = 1e-5f;
  bool int8_activations = true;
  bool geglu = false;                 // the llama block's gate: gelu(gate) * up (Gemma), not silu
  float embed_scale = 1.f;            // token embeddings multiplied by it (Gemma: sqrt(C))
  float q_scale = 1.f;                // q multiplied by it after rope (Gemma's query_pre_attn_scalar)
  float logit_softcap = 0.f;          // > 0: logits = c tanh(logits / c)
  Matrix embedding;                   // the token embedding (V, C), float or quantized rows
  const float* positions = nullptr;   // GPT-2's learned position table (block_size, C)
  const float *final_w = nullptr, *final_b = nullptr;
  Linear head;
  std::vector<Layer> layers;
};

// The KV cache the step appends to, float32 or float16 (half). Layers that see every key share one
// buffer, (L_full, rows, NKV, capacity, HS): layer slot s's keys at k + s * layer_stride. Sliding-
// window layers may keep only their window, in a second buffer of window_capacity positions per
// row (pyllm/models/cache.py), where row b holds window_lengths[b] positions (its latest). Batch row
// b of a step reads and writes cache row rows[b] (b when rows is null).
struct Cache {
  void* k = nullptr;
  void* v = nullptr;
  bool half = false;
  int64_t layer_stride = 0, capacity = 0;   // in values
  const int64_t* rows = nullptr;
  void* k_window = nullptr;
  void* v_window = nullptr;
  int64_t window_layer_stride = 0, window_capacity = 0;
  const int64_t* window_lengths = nullptr;   // (B,) positions each row's window buffers hold
  const int64_t* layer_slots = nullptr;      // (L,) s >= 0: slot s of k; < 0: slot -1 - s of k_window
};

// Where a step's time goes, by operation (nanoseconds, added to), when a profile is asked for.
#define PYLLM_STEP_OPS(X) \
  X(embed) X(norm) X(qkv) X(rope) X(kv_write) X(attention) X(o) X(mlp_in) X(activation) X(mlp_out) \
  X(residual) X(head)
enum class Op {
#define PYLLM_STEP_OP(name) name,
  PYLLM_STEP_OPS(PYLLM_STEP_OP)
#undef PYLLM_STEP_OP
  count
};
extern const char* const kOpNames[];

// logits (B, V) of each row's last new token (counts[b] - 1 when counts is given, else Tq - 1);
// rows hold lengths[b] positions before the step. rope: the tables of the global and the local
// layers (the same pointers when the model has one rope base).
// profile, if not null, gets each Op's nanoseconds added (int(Op::count) entries).
struct Rope {
  const float *cos = nullptr, *sin = nullptr, *cos_local = nullptr, *sin_local = nullptr;
};
void step(const Plan& plan, float* logits, const int64_t* ids, int64_t B, int64_t Tq, const int64_t* counts,
          const int64_t* lengths, const Cache& cache, const Rope& rope, double* profile = nullptr);

}  // namespace model
}  // namespace pyllm
