// Binding of the decode step (csrc/model/step.h): a DecodePlan built once from the model's arrays
// (pyllm/models/transformer.py does it), then step() per new token with the GIL released.
// Not where models are described: every size is checked here against the arrays it points into,
// so a wrong plan raises instead of reading out of bounds.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "common.h"
#include "kernels/quant_types.h"
#include "model/step.h"

namespace py = pybind11;
using pyllm::check;
namespace model = pyllm::model;

namespace {

template <class T>
const T* array_of(const py::object& o, int64_t n, const std::string& name) {
  py::array a = o.cast<py::array>();
  check(py::dtype::of<T>().is(a.dtype()), name + " has the wrong dtype");
  check(a.flags() & py::array::c_style, name + " must be C-contiguous");
  check(a.size() >= n, name + " is too small: " + std::to_string(a.size()) + " < " + std::to_string(n));
  return static_cast<const T*>(a.data());
}

int64_t row_bytes(int type, int64_t K) {
  const int64_t values = pyllm::quant_block_values(type);
  check(values > 0 && K % values == 0, "a quantized matrix has an unsupported type or a partial block");
  return K / values * pyllm::quant_block_bytes(type);
}

class DecodePlan {
 public:
  DecodePlan(const std::string& arch, int64_t C, int64_t NH, int64_t NKV, int64_t HS, int64_t V,
             int64_t position_rows, float eps, bool int8_activations) {
    check(arch == "gpt2" || arch == "llama", "unknown architecture " + arch);
    check(C > 0 && NH > 0 && NKV > 0 && NH % NKV == 0 && HS > 0 && V > 0, "inconsistent model sizes");
    plan_.arch = arch == "gpt2" ? model::Arch::kGPT2 : model::Arch::kLlama;
    plan_.C = C, plan_.NH = NH, plan_.NKV = NKV, plan_.HS = HS, plan_.V = V;
    plan_.eps = eps;
    plan_.int8_activations = int8_activations;
    position_rows_ = position_rows;
  }

  // (float array or None, in_out, quantized array or None, ggml type, out, in, first column, packed)
  model::Matrix matrix(const py::tuple& t, const std::string& name) {
    model::Matrix m;
    m.out = t[4].cast<int64_t>(), m.in = t[5].cast<int64_t>(), m.col = t[6].cast<int64_t>();
    check(m.out > 0 && m.in > 0 && m.col >= 0, name + ": bad sizes");
    if (!t[0].is_none()) {
      m.f = array_of<float>(t[0], m.out * m.in, name);
      m.in_out = t[1].cast<bool>();
    } else {
      m.type = t[3].cast<int>();
      m.packed = t[7].cast<bool>();
      check(!m.packed || pyllm::packed_type(m.type), name + ": this type has no packed layout");
      m.q = array_of<uint8_t>(t[2], m.out * row_bytes(m.type, m.in), name);
    }
    keep_.push_back(t);
    return m;
  }

  // (in, out, [matrix, ...], bias or None, [(A, B, rank, out, first column, scale), ...])
  model::Linear linear(const py::tuple& t, int64_t in, int64_t out, const std::string& name) {
    model::Linear lin;
    lin.in = t[0].cast<int64_t>(), lin.out = t[1].cast<int64_t>();
    check(lin.in == in && lin.out == out, name + ": sizes do not fit the model");
    for (const auto& part : t[2].cast<py::list>()) {
      model::Matrix m = matrix(part.cast<py::tuple>(), name);
      check(m.in == in && m.col + m.out <= out, name + ": a part does not fit the product");
      lin.parts.push_back(m);
    }
    check(!lin.parts.empty(), name + ": no weights");
    check(lin.parts.size() == 1 ? lin.parts[0].out == out : lin.parts[0].q != nullptr,
          name + ": a fused product's parts are its quantized blocks");
    if (lin.parts.size() > 1)
      for (const auto& m : lin.parts) check(m.q != nullptr, name + ": mixed float and quantized parts");
    if (!t[3].is_none()) lin.bias = array_of<float>(t[3], out, name + " bias");
    for (const auto& item : t[4].cast<py::list>()) {
      py::tuple a = item.cast<py::tuple>();
      model::Adapter ad;
      ad.rank = a[2].cast<int64_t>(), ad.out = a[3].cast<int64_t>(), ad.col = a[4].cast<int64_t>();
      ad.scale = a[5].cast<float>();
      check(ad.rank > 0 && ad.out > 0 && ad.col >= 0 && ad.col + ad.out <= out, name + ": an adapter does not fit");
      ad.A = array_of<float>(a[0], ad.rank * in, name + " lora_A");
      ad.B = array_of<float>(a[1], ad.out * ad.rank, name + " lora_B");
      lin.adapters.push_back(ad);
    }
    keep_.push_back(t);
    return lin;
  }

  const float* vector(const py::object& o, int64_t n, const std::string& name) {
    if (o.is_none()) return nullptr;
    keep_.push_back(o);
    return array_of<float>(o, n, name);
  }

  void set_embedding(const py::tuple& m, const py::object& positions) {
    plan_.embedding = matrix(m, "embedding");
    check(plan_.embedding.out == plan_.V && plan_.embedding.in == plan_.C && !plan_.embedding.in_out,
          "the embedding must be (V, C)");
    plan_.positions = vector(positions, position_rows_ * plan_.C, "positions");
    check((plan_.positions != nullptr) == (plan_.arch == model::Arch::kGPT2), "positions belong to GPT-2");
  }

  // Gemma's additions to the llama block: the gate's activation ("swiglu" or "geglu"), the embedding
  // scale, q's scale and the logits' soft cap (0: none).
  void set_options(const std::string& activation, float embed_scale, float q_scale, float logit_softcap) {
    check(activation == "swiglu" || activation == "geglu", "unknown activation " + activation);
    check(std::isfinite(embed_scale) && std::isfinite(q_scale) && std::isfinite(logit_softcap) && embed_scale > 0 &&
              q_scale > 0 && logit_softcap >= 0,
          "scales must be finite and positive");
    check(plan_.arch == model::Arch::kLlama || (activation == "swiglu" && embed_scale == 1.f && q_scale == 1.f),
          "these options belong to the llama block");
    plan_.geglu = activation == "geglu";
    plan_.embed_scale = embed_scale, plan_.q_scale = q_scale, plan_.logit_softcap = logit_softcap;
  }

  void set_head(const py::object& w, const py::object& b, const py::tuple& head) {
    plan_.final_w = vector(w, plan_.C, "final norm");
    plan_.final_b = vector(b, plan_.C, "final norm bias");
    check(plan_.final_w != nullptr, "the final norm needs a weight");
    plan_.head = linear(head, plan_.C, plan_.V, "head");
  }

  void add_layer(const py::object& n1w, const py::object& n1b, const py::tuple& qkv, const py::tuple& o,
                 const py::object& n2w, const py::object& n2b, const py::list& mlp, const py::object& q_norm,
                 const py::object& k_norm, const py::object& post1, const py::object& post2, int64_t window,
                 bool local_rope) {
    const int64_t C = plan_.C, A = plan_.NH * plan_.HS, QKV = (plan_.NH + 2 * plan_.NKV) * plan_.HS;
    const std::string name = "layer " + std::to_string(plan_.layers.size());
    model::Layer layer;
    layer.norm1_w = vector(n1w, C, name + " norm1");
    layer.norm1_b = vector(n1b, C, name + " norm1 bias");
    layer.norm2_w = vector(n2w, C, name + " norm2");
    layer.norm2_b = vector(n2b, C, name + " norm2 bias");
    const bool gpt2 = plan_.arch == model::Arch::kGPT2;
    check(layer.norm1_w && layer.norm2_w && (layer.norm1_b != nullptr) == gpt2 && (layer.norm2_b != nullptr) == gpt2,
          name + ": norms do not fit the architecture");
    layer.q_norm = vector(q_norm, plan_.HS, name + " q norm");
    layer.k_norm = vector(k_norm, plan_.HS, name + " k norm");
    check((layer.q_norm != nullptr) == (layer.k_norm != nullptr) && (!layer.q_norm || !gpt2),
          name + ": head norms come as a pair, in the llama block");
    layer.post1_w = vector(post1, C, name + " norm after attention");
    layer.post2_w = vector(post2, C, name + " norm after the feed-forward");
    check((layer.post1_w != nullptr) == (layer.post2_w != nullptr) && (!layer.post1_w || !gpt2),
          name + ": norms after the sub-blocks come as a pair, in the llama block");
    check(window >= 0 && (window == 0 || !gpt2) && (!local_rope || !gpt2), name + ": a window belongs to the llama block");
    layer.window = window;
    layer.local_rope = local_rope;
    layer.qkv = linear(qkv, C, QKV, name + " qkv");
    layer.o = linear(o, A, C, name + " o");
    check(mlp.size() == (gpt2 ? 2u : 3u), name + ": the feed-forward does not fit the architecture");
    const int64_t F = mlp[0].cast<py::tuple>()[1].cast<int64_t>();
    for (size_t i = 0; i < mlp.size(); ++i) {
      const bool last = i + 1 == mlp.size();
      layer.mlp.push_back(linear(mlp[i].cast<py::tuple>(), last ? F : C, last ? C : F, name + " mlp"));
    }
    plan_.layers.push_back(std::move(layer));
  }

  // logits (B, V) out; ids (B, Tq); counts (B,) or None; lengths (B,); k, v (L, R, NKV, capacity, HS)
  // with each layer's rows contiguous; rows (B,) distinct cache rows, or None for rows 0..B-1;
  // cos, sin (P, HS/2) or None.
  // The cache buffers' layout: (layers, rows >= B, NKV, capacity, HS), each layer contiguous.
  static void check_cache_buffers(model::Cache& cache, py::array& k, py::array& v, int64_t layers, int64_t B,
                                  const model::Plan& p, bool window) {
    const int64_t f = cache.half ? 2 : 4;   // bytes per value
    for (py::array* c : {&k, &v}) {
      check((cache.half ? py::dtype("float16").is(c->dtype()) : py::dtype::of<float>().is(c->dtype())) &&
                c->ndim() == 5 && c->writeable(),
            "the cache must be writeable float32 or float16 (L, B, NKV, capacity, HS), keys and values alike");
      check(c->shape(0) == layers && c->shape(1) >= B && c->shape(2) == p.NKV && c->shape(4) == p.HS,
            "the cache does not fit the model and the batch");
      const int64_t cap = c->shape(3);
      check(c->strides(4) == f && c->strides(3) == p.HS * f && c->strides(2) == cap * p.HS * f &&
                c->strides(1) == p.NKV * cap * p.HS * f && c->strides(0) >= 0 && c->strides(0) % f == 0,
            "each layer of the cache must be contiguous");
      (window ? cache.window_capacity : cache.capacity) = cap;
      (window ? cache.window_layer_stride : cache.layer_stride) = c->strides(0) / f;
    }
    check(k.shape(3) == v.shape(3) && k.strides(0) == v.strides(0) && k.shape(1) == v.shape(1),
          "keys and values differ in layout");
    (window ? cache.k_window : cache.k) = k.mutable_data();
    (window ? cache.v_window : cache.v) = v.mutable_data();
  }

  // window: None, or (k_window, v_window, window_lengths (B,), layer_slots (L,)) for a cache whose
  // sliding-window layers keep only their window (pyllm/models/cache.py).
  void step(py::array logits, py::array ids, py::object counts, py::array lengths, py::array k, py::array v,
            py::object rows, py::object cos, py::object sin, py::object cos_local, py::object sin_local,
            py::object window, py::object profile) {
    const model::Plan& p = plan_;
    check(!p.layers.empty() && p.head.out == p.V, "the plan is not complete");
    check(ids.ndim() == 2, "ids must be (B, Tq)");
    const int64_t B = ids.shape(0), Tq = ids.shape(1), L = int64_t(p.layers.size());
    check(B >= 1 && Tq >= 1, "ids must hold at least one token per row");
    const int64_t* pid = array_of<int64_t>(ids, B * Tq, "ids");
    for (int64_t i = 0; i < B * Tq; ++i) check(pid[i] >= 0 && pid[i] < p.V, "an id is outside [0, V)");
    check(logits.writeable(), "logits must be writeable");
    float* plog = const_cast<float*>(array_of<float>(logits, B * p.V, "logits"));
    const int64_t* pc = nullptr;
    if (!counts.is_none()) {
      pc = array_of<int64_t>(counts, B, "counts");
      for (int64_t b = 0; b < B; ++b) check(pc[b] >= 1 && pc[b] <= Tq, "counts outside [1, Tq]");
    }
    const int64_t* plen = array_of<int64_t>(lengths, B, "lengths");
    model::Cache cache;
    cache.half = py::dtype("float16").is(k.dtype());
    int64_t full_layers = L;
    std::vector<int64_t> window_held;
    if (!window.is_none()) {
      py::tuple w = window.cast<py::tuple>();
      check(w.size() == 4, "window must be (k_window, v_window, window_lengths, layer_slots)");
      cache.layer_slots = array_of<int64_t>(w[3], L, "layer_slots");
      int64_t windowed = 0;
      for (int64_t l = 0; l < L; ++l) {
        const int64_t s = cache.layer_slots[l];
        check(s == (s >= 0 ? l - windowed : -1 - windowed), "layer_slots must number each kind's layers in order");
        windowed += s < 0;
      }
      full_layers = L - windowed;
      check(windowed > 0, "a window buffer with no layer in it");
      py::array kw = w[0].cast<py::array>(), vw = w[1].cast<py::array>();
      check_cache_buffers(cache, kw, vw, windowed, B, p, true);
      check(kw.shape(1) == k.shape(1), "the window buffers and the full ones hold different rows");
      cache.window_lengths = array_of<int64_t>(w[2], B, "window_lengths");
      for (int64_t b = 0; b < B; ++b)
        check(cache.window_lengths[b] >= 0 && cache.window_lengths[b] <= cache.window_capacity - Tq &&
                  cache.window_lengths[b] <= plen[b],
              "a row's window buffer holds too few positions for this step");
    }
    check_cache_buffers(cache, k, v, full_layers, B, p, false);    if (rows.is_none()) {
      check(k.shape(1) == B, "the cache holds more rows than the batch: say which rows the batch uses");
    } else {
      cache.rows = array_of<int64_t>(rows, B, "rows");
      std::vector<bool> seen(size_t(k.shape(1)), false);
      for (int64_t b = 0; b < B; ++b) {
        check(cache.rows[b] >= 0 && cache.rows[b] < k.shape(1), "a row outside the cache");
        check(!seen[size_t(cache.rows[b])], "a cache row given twice");
        seen[size_t(cache.rows[b])] = true;
      }
    }
    int64_t longest = 0;
    for (int64_t b = 0; b < B; ++b) {
      check(plen[b] >= 0 && plen[b] <= cache.capacity - Tq, "the cache holds too few positions for this step");
      longest = std::max(longest, plen[b] + Tq);
    }
    model::Rope rope;
    if (p.arch == model::Arch::kLlama) {
      auto table = [&](const py::object& t, const char* name) {
        check(!t.is_none(), "a rotary model needs its tables");
        py::array a = t.cast<py::array>();
        check(a.ndim() == 2 && a.shape(1) == p.HS / 2 && a.shape(0) >= longest, "the rope tables are too short");
        return array_of<float>(t, a.shape(0) * p.HS / 2, name);
      };
      rope.cos = table(cos, "cos"), rope.sin = table(sin, "sin");
      rope.cos_local = table(cos_local, "local cos"), rope.sin_local = table(sin_local, "local sin");
    } else {
      check(longest <= position_rows_, "positions past the model's block_size");
    }
    double* pprof = nullptr;
    if (!profile.is_none()) {
      py::array pa = profile.cast<py::array>();
      check(py::dtype::of<double>().is(pa.dtype()) && (pa.flags() & py::array::c_style) && pa.writeable() &&
                pa.size() >= int64_t(model::Op::count),
            "profile must be a writeable float64 array with one entry per operation");
      pprof = static_cast<double*>(pa.mutable_data());
    }
    py::gil_scoped_release release;
    model::step(p, plog, pid, B, Tq, pc, plen, cache, rope, pprof);
  }

 private:
  model::Plan plan_;
  int64_t position_rows_ = 0;
  std::vector<py::object> keep_;   // the arrays the plan points into stay alive with it
};

}  // namespace

void bind_model(py::module_& m) {
  py::class_<DecodePlan>(m, "DecodePlan")
      .def(py::init<const std::string&, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, float, bool>())
      .def("set_embedding", &DecodePlan::set_embedding)
      .def("set_head", &DecodePlan::set_head)
      .def("set_options", &DecodePlan::set_options)
      .def("add_layer", &DecodePlan::add_layer)
      .def("step", &DecodePlan::step, py::arg("logits"), py::arg("ids"), py::arg("counts"), py::arg("lengths"),
           py::arg("k"), py::arg("v"), py::arg("rows"), py::arg("cos"), py::arg("sin"), py::arg("cos_local"),
           py::arg("sin_local"), py::arg("window") = py::none(), py::arg("profile") = py::none())
      .def_property_readonly_static("operations", [](py::object) {
        std::vector<std::string> names(model::kOpNames, model::kOpNames + int(model::Op::count));
        return names;
      });
}
