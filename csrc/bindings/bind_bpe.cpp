// Bindings of the BPE model, trainer and piece counter: bytes and numpy arrays in and out,
// the GIL released around the C++ work. Not where text is checked or split (pyllm/tokenizer.py).
#include <pybind11/functional.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "common.h"
#include "tokenizer/bpe.h"
#include "tokenizer/spm.h"

namespace py = pybind11;
using pyllm::tok::BpeModel;
using pyllm::tok::SpmModel;
using pyllm::tok::Merge;
using pyllm::tok::TokenId;

namespace {

// Piece -> count over every text added so far (training input).
struct PieceCounts {
  std::unordered_map<std::string, uint64_t> counts;
};

std::string_view view(const py::bytes& b) {
  char* data = nullptr;
  Py_ssize_t size = 0;
  if (PyBytes_AsStringAndSize(b.ptr(), &data, &size) != 0) throw py::error_already_set();
  return std::string_view(data, size_t(size));
}

// Piece end offsets as a uint32 vector, checked to rise and to stay within the text.
std::vector<uint32_t> piece_ends(const py::array_t<uint32_t, py::array::c_style | py::array::forcecast>& ends,
                                 size_t text_size) {
  std::vector<uint32_t> out(ends.data(), ends.data() + ends.size());
  uint32_t previous = 0;
  for (uint32_t e : out) {
    pyllm::check(e >= previous && e <= text_size, "piece ends must rise within the text");
    previous = e;
  }
  pyllm::check(out.empty() || out.back() == text_size, "piece ends must cover the whole text");
  return out;
}

py::array_t<uint32_t> to_array(const std::vector<TokenId>& ids) {
  py::array_t<uint32_t> arr(static_cast<py::ssize_t>(ids.size()));
  std::copy(ids.begin(), ids.end(), arr.mutable_data());
  return arr;
}

}  // namespace

void bind_bpe(py::module_& m) {
  py::class_<BpeModel>(m, "BpeModel")
      .def(py::init([](const py::list& vocab, const py::array_t<uint32_t, py::array::c_style | py::array::forcecast>& merges,
                       int64_t unk_id) {
             std::vector<std::string> tokens;
             tokens.reserve(vocab.size());
             for (const auto& t : vocab) tokens.emplace_back(view(t.cast<py::bytes>()));
             pyllm::check(merges.ndim() == 2 && (merges.shape(1) == 2 || merges.size() == 0),
                          "merges must be an (n, 2) array of token ids");
             std::vector<Merge> pairs(size_t(merges.size() / 2));
             for (size_t i = 0; i < pairs.size(); ++i) pairs[i] = {merges.data()[2 * i], merges.data()[2 * i + 1]};
             return std::make_unique<BpeModel>(std::move(tokens), pairs, unk_id);
           }),
           py::arg("vocab"), py::arg("merges"), py::arg("unk_id") = -1)
      .def_property_readonly("vocab_size", &BpeModel::vocab_size)
      .def("encode_pieces", [](const BpeModel& self, const py::bytes& text,
                               const py::array_t<uint32_t, py::array::c_style | py::array::forcecast>& ends) {
        const std::string_view t = view(text);
        const std::vector<uint32_t> e = piece_ends(ends, t.size());
        std::vector<TokenId> ids;
        {
          py::gil_scoped_release release;
          ids.reserve(t.size() / 3);
          self.encode_pieces(t, e, ids);
        }
        return to_array(ids);
      }, py::arg("text"), py::arg("ends"), "Token ids (uint32 array) of utf-8 text split at ends.")
      .def("decode", [](const BpeModel& self, const py::array_t<uint32_t, py::array::c_style | py::array::forcecast>& ids) {
        std::string bytes;
        {
          py::gil_scoped_release release;
          bytes = self.decode(ids.data(), size_t(ids.size()));
        }
        return py::bytes(bytes);
      }, py::arg("ids"), "The bytes of the given token ids.");

  py::class_<SpmModel>(m, "SpmModel")
      .def(py::init([](const py::list& pieces, const std::vector<float>& scores, const std::vector<int64_t>& byte_ids,
                       int64_t unk_id) {
             std::vector<std::string> texts;
             texts.reserve(pieces.size());
             for (const auto& t : pieces) texts.emplace_back(view(t.cast<py::bytes>()));
             try {
               return std::make_unique<SpmModel>(std::move(texts), scores, byte_ids, unk_id);
             } catch (const std::invalid_argument& e) {
               throw py::value_error(e.what());
             }
           }),
           py::arg("pieces"), py::arg("scores"), py::arg("byte_ids"), py::arg("unk_id") = -1)
      .def("__len__", &SpmModel::size)
      .def("splits_at_spaces", &SpmModel::splits_at_spaces)
      .def("encode", [](const SpmModel& self, const py::bytes& text) {
        const std::string_view t = view(text);
        std::vector<TokenId> ids;
        {
          py::gil_scoped_release release;
          ids.reserve(t.size() / 3);
          try {
            self.encode(t, ids);
          } catch (const std::invalid_argument& e) {
            py::gil_scoped_acquire acquire;
            throw py::value_error(e.what());
          }
        }
        return to_array(ids);
      }, py::arg("text"), "Token ids (uint32 array) of normalized utf-8 text (spaces as U+2581).");

  py::class_<PieceCounts>(m, "PieceCounter")
      .def(py::init<>())
      .def("add", [](PieceCounts& self, const py::bytes& text,
                     const py::array_t<uint32_t, py::array::c_style | py::array::forcecast>& ends) {
        const std::string_view t = view(text);
        const std::vector<uint32_t> e = piece_ends(ends, t.size());
        py::gil_scoped_release release;
        pyllm::tok::count_pieces(t, e, self.counts);
      }, py::arg("text"), py::arg("ends"), "Counts the pieces of text ending at ends.")
      .def("__len__", [](const PieceCounts& self) { return self.counts.size(); })
      .def("items", [](const PieceCounts& self) {
        // Sorted by bytes, so training sees the same order whatever the hash map did.
        std::vector<const std::pair<const std::string, uint64_t>*> entries;
        entries.reserve(self.counts.size());
        for (const auto& e : self.counts) entries.push_back(&e);
        std::sort(entries.begin(), entries.end(), [](auto* x, auto* y) { return x->first < y->first; });
        py::list pieces;
        py::array_t<uint64_t> counts(static_cast<py::ssize_t>(entries.size()));
        for (size_t i = 0; i < entries.size(); ++i) {
          pieces.append(py::bytes(entries[i]->first));
          counts.mutable_data()[i] = entries[i]->second;
        }
        return py::make_tuple(pieces, counts);
      }, "(pieces as a list of bytes, counts as a uint64 array), sorted by bytes.");

  m.def("train_bpe", [](const py::list& pieces, const py::array_t<uint64_t, py::array::c_style | py::array::forcecast>& counts,
                        size_t num_merges, uint64_t min_count, size_t progress_every,
                        std::function<void(size_t)> on_progress) {
    std::vector<std::string> words;
    words.reserve(pieces.size());
    for (const auto& p : pieces) words.emplace_back(view(p.cast<py::bytes>()));
    pyllm::check(size_t(counts.size()) == words.size(), "pieces and counts differ in length");
    std::vector<uint64_t> c(counts.data(), counts.data() + counts.size());
    std::vector<Merge> merges;
    {
      py::gil_scoped_release release;
      // The callback is Python: it takes the GIL back for each call.
      std::function<void(size_t)> progress;
      if (on_progress)
        progress = [&on_progress](size_t done) {
          py::gil_scoped_acquire acquire;
          on_progress(done);
        };
      merges = pyllm::tok::train_bpe(words, c, num_merges, min_count, progress_every, progress);
    }
    py::array_t<uint32_t> out({static_cast<py::ssize_t>(merges.size()), py::ssize_t(2)});
    for (size_t i = 0; i < merges.size(); ++i) {
      out.mutable_data()[2 * i] = merges[i].first;
      out.mutable_data()[2 * i + 1] = merges[i].second;
    }
    return out;
  }, py::arg("pieces"), py::arg("counts"), py::arg("num_merges"), py::arg("min_count") = 0,
     py::arg("progress_every") = 0, py::arg("on_progress") = nullptr,
     "Learns up to num_merges merges from pieces and their counts; returns an (n, 2) uint32 array.");
}
