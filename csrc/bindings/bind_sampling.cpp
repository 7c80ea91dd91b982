// Binding of the sampler (a (B, V) logits array in, B token ids out, rows on the thread pool) and of
// the JSON grammar that constrained decoding masks the vocabulary with.
// Not where parameters are validated for users (pyllm/kernels.py, sample); here only what keeps memory safe.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "common.h"
#include "sampling/json_grammar.h"
#include "sampling/sampler.h"
#include "threads.h"

namespace py = pybind11;

void bind_sampling(py::module_& m) {
  // Arrays are used in place, never converted: a converted copy would be a temporary that the
  // sampler then writes into or that dies before use.
  auto exact = [](const py::array& a, const py::dtype& dtype, const char* name, bool writeable) {
    pyllm::check(a.dtype().is(dtype), std::string(name) + " has the wrong dtype");
    pyllm::check(a.flags() & py::array::c_style, std::string(name) + " must be C-contiguous");
    pyllm::check(!writeable || a.writeable(), std::string(name) + " must be writeable");
  };
  m.def("sample", [exact](py::array out, py::array logits, py::array history, py::array seeds,
                          py::array steps, double temperature, int64_t top_k, double top_p, double min_p,
                          double repetition_penalty, double presence_penalty, double frequency_penalty,
                          py::object probs_obj) {
    exact(out, py::dtype::of<int64_t>(), "out", true);
    exact(logits, py::dtype::of<float>(), "logits", false);
    exact(history, py::dtype::of<int64_t>(), "history", false);
    exact(seeds, py::dtype::of<uint64_t>(), "seeds", false);
    exact(steps, py::dtype::of<uint64_t>(), "steps", false);
    pyllm::check(logits.ndim() == 2, "logits must be (B, V)");
    const int64_t B = logits.shape(0), V = logits.shape(1);
    pyllm::check(V >= 1, "logits need at least one column");
    pyllm::check(out.size() == B && seeds.size() == B && steps.size() == B,
                 "out, seeds and steps need one entry per row");
    pyllm::check(history.ndim() == 2 && history.shape(0) == B, "history must be (B, H)");
    const int64_t H = history.shape(1);
    const int64_t* hist = static_cast<const int64_t*>(history.data());
    for (int64_t i = 0; i < B * H; ++i) pyllm::check(hist[i] < V, "history holds an id >= V");
    float* pprobs = nullptr;
    py::array probs;
    if (!probs_obj.is_none()) {
      probs = probs_obj.cast<py::array>();
      exact(probs, py::dtype::of<float>(), "probs", true);
      pyllm::check(probs.size() == B * V, "probs must be (B, V)");
      pprobs = static_cast<float*>(probs.mutable_data());
    }
    pyllm::sampling::Params params{temperature, top_k, top_p, min_p, repetition_penalty, presence_penalty,
                                   frequency_penalty};
    const float* px = static_cast<const float*>(logits.data());
    const uint64_t* ps = static_cast<const uint64_t*>(seeds.data());
    const uint64_t* pst = static_cast<const uint64_t*>(steps.data());
    int64_t* po = static_cast<int64_t*>(out.mutable_data());
    py::gil_scoped_release release;
    pyllm::parallel_for(B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        po[b] = pyllm::sampling::sample_row(px + b * V, V, hist + b * H, H, params, ps[b], pst[b],
                                            pprobs ? pprobs + b * V : nullptr);
    });
  });
  using pyllm::sampling::JsonGrammar;
  using pyllm::sampling::SchemaNode;
  using pyllm::sampling::TokenBytes;
  py::class_<TokenBytes>(m, "TokenBytes")
      .def(py::init([](const std::vector<py::bytes>& tokens) {
        std::vector<std::string> t;
        t.reserve(tokens.size());
        for (const py::bytes& b : tokens) t.emplace_back(std::string(b));
        return TokenBytes(std::move(t));
      }))
      .def("__len__", [](const TokenBytes& t) { return t.tokens.size(); })
      .def("__getitem__", [](const TokenBytes& t, int64_t i) {
        if (i < 0 || i >= int64_t(t.tokens.size())) throw py::index_error("token id outside the vocabulary");
        return py::bytes(t.tokens[size_t(i)]);
      });
  py::class_<JsonGrammar::State>(m, "JsonState").def("copy", [](const JsonGrammar::State& s) { return s; });
  // nodes: (kind, keys, children, required, additional, literals) per schema node; none: any JSON.
  py::class_<JsonGrammar>(m, "JsonGrammar")
      .def(py::init([](const py::list& nodes, int root) {
        std::vector<SchemaNode> out;
        for (const py::handle& item : nodes) {
          const py::tuple t = item.cast<py::tuple>();
          pyllm::check(t.size() == 6, "a schema node is (kind, keys, children, required, additional, literals)");
          SchemaNode n;
          n.kind = t[0].cast<int>();
          for (const py::handle& k : t[1].cast<py::list>()) n.keys.emplace_back(std::string(k.cast<py::bytes>()));
          n.children = t[2].cast<std::vector<int>>();
          n.required = t[3].cast<std::vector<bool>>();
          n.additional = t[4].cast<bool>();
          for (const py::handle& l : t[5].cast<py::list>()) n.literals.emplace_back(std::string(l.cast<py::bytes>()));
          out.push_back(std::move(n));
        }
        try {
          return JsonGrammar(std::move(out), root);
        } catch (const std::invalid_argument& e) {
          throw py::value_error(e.what());
        }
      }), py::arg("nodes"), py::arg("root"))
      .def("start", &JsonGrammar::start)
      .def("feed", [](const JsonGrammar& g, JsonGrammar::State& s, const py::bytes& b) {
        const std::string bytes(b);
        JsonGrammar::State t = s;
        if (!g.feed(t, bytes.data(), int64_t(bytes.size()))) return false;
        s = t;   // unchanged when refused
        return true;
      })
      .def("complete", &JsonGrammar::complete)
      .def("ended", &JsonGrammar::ended)
      .def("closing_length", &JsonGrammar::closing_length)
      .def("mask", [exact](const JsonGrammar& g, const JsonGrammar::State& s, const TokenBytes& vocab, py::array out,
                           int64_t budget) {
        exact(out, py::dtype::of<uint8_t>(), "out", true);
        pyllm::check(out.size() >= int64_t(vocab.tokens.size()), "out must hold a flag per token");
        uint8_t* po = static_cast<uint8_t*>(out.mutable_data());
        py::gil_scoped_release release;
        g.mask(s, vocab, po, budget);
      }, py::arg("state"), py::arg("vocab"), py::arg("out"), py::arg("budget") = -1);
  m.def("sample_uniform", &pyllm::sampling::uniform, py::arg("seed"), py::arg("step"),
        "The sampler's uniform number for (seed, step), for the numpy twin's tests.");
}
