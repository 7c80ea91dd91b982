// Bindings of the pre-tokenizer: a str split into a list of str, or bytes into piece end offsets,
// the GIL released while splitting. Not where custom patterns are handled (pyllm/pretokenize.py).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "tokenizer/pretokenize.h"

namespace py = pybind11;
using pyllm::tok::CharClass;
using pyllm::tok::Pattern;

namespace {

std::vector<int64_t> split_released(const char* data, size_t size, Pattern pattern) {
  py::gil_scoped_release release;
  return pyllm::tok::pretokenize(std::string_view(data, size), pattern);
}

// A numpy array over the vector's own buffer: a capsule owns the vector, so nothing is copied
// (the copy, and first touching a fresh buffer, cost as much as splitting the text).
py::array_t<int64_t> adopt(std::vector<int64_t>&& values) {
  auto owned = std::make_unique<std::vector<int64_t>>(std::move(values));
  py::capsule owner(owned.get(), [](void* v) { delete static_cast<std::vector<int64_t>*>(v); });
  const std::vector<int64_t>* v = owned.release();
  return py::array_t<int64_t>(static_cast<py::ssize_t>(v->size()), v->data(), owner);
}

// The pieces as str objects. Real text repeats its pieces (" ", "\n", "self", " the"), so each
// distinct piece is made once per call and shared, as CPython shares one-character strings.
py::list pieces_as_str(const char* data, const std::vector<int64_t>& ends) {
  py::list pieces(ends.size());
  std::unordered_map<std::string_view, PyObject*> made;  // borrowed: `pieces` holds a reference
  int64_t start = 0;
  for (size_t i = 0; i < ends.size(); ++i) {
    const std::string_view bytes(data + start, size_t(ends[i] - start));
    auto [it, added] = made.try_emplace(bytes, nullptr);
    if (added) {
      it->second = PyUnicode_DecodeUTF8(bytes.data(), Py_ssize_t(bytes.size()), "strict");
      if (it->second == nullptr) throw py::error_already_set();
    } else {
      Py_INCREF(it->second);
    }
    PyList_SET_ITEM(pieces.ptr(), Py_ssize_t(i), it->second);  // steals the reference
    start = ends[i];
  }
  return pieces;
}

}  // namespace

void bind_tokenizer(py::module_& m) {
  m.def("pretokenize", [](const py::str& text, const std::string& pattern) {
    const Pattern p = pyllm::tok::pattern_from_name(pattern);
    Py_ssize_t size = 0;
    const char* data = PyUnicode_AsUTF8AndSize(text.ptr(), &size);  // lone surrogates: UnicodeEncodeError
    if (data == nullptr) throw py::error_already_set();
    return pieces_as_str(data, split_released(data, size_t(size), p));
  }, py::arg("text"), py::arg("pattern"),
     "The pieces of text under a built-in pattern (gpt2, gpt4, gpt2_digits).");

  m.def("pretokenize_offsets", [](const py::bytes& data, const std::string& pattern) {
    const Pattern p = pyllm::tok::pattern_from_name(pattern);
    char* bytes = nullptr;
    Py_ssize_t size = 0;
    if (PyBytes_AsStringAndSize(data.ptr(), &bytes, &size) != 0) throw py::error_already_set();
    return adopt(split_released(bytes, size_t(size), p));
  }, py::arg("data"), py::arg("pattern"),
     "End byte offsets (int64 array) of the pieces of UTF-8 data under a built-in pattern; "
     "a byte that is not UTF-8 counts as a character of its own.");

  m.def("_unicode_classes", [] {
    py::array_t<uint8_t> out(0x110000);
    uint8_t* classes = out.mutable_data();
    for (uint32_t cp = 0; cp < 0x110000; ++cp) classes[cp] = uint8_t(pyllm::tok::char_class(cp));
    return out;
  }, "Test hook: the pre-tokenizer's class of every code point (0 other, 1 \\p{L}, 2 \\p{N}, 3 \\s).");
}
