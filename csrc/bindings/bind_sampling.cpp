// Binding of the sampler: a (B, V) logits array in, B token ids out, rows on the thread pool.
// Not where parameters are validated for users (pyllm/sampling.py); here only what keeps memory safe.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include "common.h"
#include "sampling/sampler.h"
#include "threads.h"

namespace py = pybind11;

void bind_sampling(py::module_& m) {
  using Floats = py::array_t<float, py::array::c_style>;
  using Ints = py::array_t<int64_t, py::array::c_style>;
  m.def("sample", [](Ints out, Floats logits, Ints history, py::array_t<uint64_t, py::array::c_style> seeds,
                     int64_t step, double temperature, int64_t top_k, double top_p, double min_p,
                     double repetition_penalty, double presence_penalty, double frequency_penalty,
                     py::object probs) {
    pyllm::check(logits.ndim() == 2, "logits must be (B, V)");
    const int64_t B = logits.shape(0), V = logits.shape(1);
    pyllm::check(V >= 1, "logits need at least one column");
    pyllm::check(out.size() == B && seeds.size() == B, "out and seeds need one entry per row");
    pyllm::check(history.ndim() == 2 && history.shape(0) == B, "history must be (B, H)");
    const int64_t H = history.shape(1);
    const int64_t* hist = history.data();
    for (int64_t i = 0; i < B * H; ++i) pyllm::check(hist[i] < V, "history holds an id >= V");
    float* pprobs = nullptr;
    if (!probs.is_none()) {
      auto arr = probs.cast<Floats>();
      pyllm::check(arr.size() == B * V && arr.writeable(), "probs must be a writeable (B, V) float32 array");
      pprobs = arr.mutable_data();
    }
    pyllm::sampling::Params params{temperature, top_k, top_p, min_p, repetition_penalty, presence_penalty,
                                   frequency_penalty};
    const float* px = logits.data();
    const uint64_t* ps = seeds.data();
    int64_t* po = out.mutable_data();
    py::gil_scoped_release release;
    pyllm::parallel_for(B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        po[b] = pyllm::sampling::sample_row(px + b * V, V, hist + b * H, H, params, ps[b], uint64_t(step),
                                            pprobs ? pprobs + b * V : nullptr);
    });
  });
  m.def("sample_uniform", &pyllm::sampling::uniform, py::arg("seed"), py::arg("step"),
        "The sampler's uniform number for (seed, step), for the numpy twin's tests.");
}
