// SentencePiece-style tokenization as llama.cpp does it for `tokenizer.ggml.model = "llama"`
// vocabularies (Llama 2, Mistral, Gemma): pieces with scores; the text, spaces already written as
// U+2581, starts as its UTF-8 characters, and the adjacent pair whose concatenation is the
// highest-scoring piece merges first (the leftmost on ties), until no pair is a piece. A character
// that is no piece falls back to its bytes' <0xNN> tokens (or the unknown token).
// Not normalization or special tokens (pyllm/tokenizer.py), and not decoding (a piece's bytes are
// the Python side's table).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace pyllm {
namespace tok {

class SpmModel {
 public:
  // pieces[id]: the piece's UTF-8 text (empty: never matched, e.g. control tokens); byte_ids[b]:
  // the id of <0xNN> for byte b or -1; unk_id: for a byte with none (-1: an error).
  SpmModel(std::vector<std::string> pieces, std::vector<float> scores, std::vector<int64_t> byte_ids,
           int64_t unk_id);
  void encode(std::string_view text, std::vector<uint32_t>& out) const;
  // Text is cut before every run of U+2581 that follows another character when no piece holds
  // U+2581 after another character: no merge can cross such a cut, so the runs merge apart.
  bool splits_at_spaces() const { return splits_at_spaces_; }
  size_t size() const { return pieces_.size(); }

 private:
  struct Match { int64_t id = -1; float score = 0.f; };
  Match find(std::string_view text) const;
  void encode_run(std::string_view text, std::vector<uint32_t>& out) const;

  std::vector<std::string> pieces_;
  std::vector<float> scores_;
  std::vector<int64_t> byte_ids_;
  int64_t unk_id_;
  std::unordered_map<std::string_view, uint32_t> index_;   // views into pieces_
  // (left piece, right piece) -> the piece of both together: merging without hashing text.
  std::unordered_map<uint64_t, uint32_t> pairs_;
  bool splits_at_spaces_ = true;
};

}  // namespace tok
}  // namespace pyllm
