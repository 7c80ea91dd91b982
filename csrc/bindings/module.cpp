// The pyllm._C extension module: thread and ISA controls here, kernels in bind_kernels.cpp.
// Not where arguments are shaped or converted: pyllm/kernels.py does that before calling in.
#include <pybind11/pybind11.h>

#include <string>

#include "kernels/kernels.h"
#include "threads.h"

namespace py = pybind11;

void bind_kernels(py::module_& m);
void bind_bpe(py::module_& m);
void bind_sampling(py::module_& m);
void bind_tokenizer(py::module_& m);
void bind_model(py::module_& m);

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyllm's C++ kernels (use them through pyllm.kernels, which checks arguments)";
  m.def("num_threads", &pyllm::num_threads, "Threads the kernels run on.");
  m.def("set_num_threads", &pyllm::set_num_threads, py::arg("n"),
        "Sets the number of threads the kernels run on (>= 1).");
  m.def("isa", [] { return std::string(pyllm::kernels().isa); }, "The SIMD level in use.");
  m.def("available_isas", [] {
    int count = 0;
    const char* const* names = pyllm::available_isas(&count);
    py::list out;
    for (int i = 0; i < count; ++i) out.append(names[i]);
    return out;
  }, "SIMD levels compiled in and supported by this CPU, worst to best.");
  m.def("select_isa", [](const std::string& name) { pyllm::select_isa(name.c_str()); },
        py::arg("name"), "Switches the SIMD level in use.");
  m.def("kernel_names", [] {
    int count = 0;
    const char* const* names = pyllm::kernel_names(&count);
    py::list out;
    for (int i = 0; i < count; ++i) out.append(names[i]);
    return out;
  }, "The kernels of the table (csrc/kernels/kernel_list.h), in order.");
  m.def("ggml_types", [] {
    py::list out;
    for (const pyllm::GgmlType& t : pyllm::kGgmlTypes)
      out.append(py::make_tuple(t.name, t.id, t.block_values, t.block_bytes, t.quantized, t.packed));
    return out;
  }, "(name, ggml id, values per block, bytes per block, quantized, packed) of every type pyllm reads.");
  m.attr("packed_rows") = pyllm::kPackedRows;   // pack_quant's groups of rows
  bind_kernels(m);
  bind_bpe(m);
  bind_sampling(m);
  bind_tokenizer(m);
  bind_model(m);
}
