// SentencePiece-style merging by score (spm.h): symbols in a linked list, candidate pairs in a
// max-heap by (score, leftmost), a popped pair used only if both sides are still as it saw them.
#include "tokenizer/spm.h"

#include <algorithm>
#include <stdexcept>

namespace pyllm {
namespace tok {
namespace {

// Bytes of the UTF-8 character starting with byte c (1 for a stray continuation byte).
inline size_t char_length(unsigned char c) {
  if (c < 0x80) return 1;
  if ((c >> 5) == 0x6) return 2;
  if ((c >> 4) == 0xE) return 3;
  if ((c >> 3) == 0x1E) return 4;
  return 1;
}

struct Symbol {
  int64_t prev, next;
  size_t start, length;   // length 0: merged into its left neighbour
  int64_t id;             // its piece, or -1 (a character with none)
};

inline uint64_t pair_key(uint32_t a, uint32_t b) { return (uint64_t(a) << 32) | b; }

constexpr std::string_view kSpace = "\xE2\x96\x81";   // U+2581, SentencePiece's space

struct Bigram {
  float score;
  int64_t left;
  size_t length;   // of the two together, to tell a stale entry
  int64_t id;      // the piece they make
  bool operator<(const Bigram& o) const { return score < o.score || (score == o.score && left > o.left); }
};

}  // namespace

SpmModel::SpmModel(std::vector<std::string> pieces, std::vector<float> scores, std::vector<int64_t> byte_ids,
                   int64_t unk_id)
    : pieces_(std::move(pieces)), scores_(std::move(scores)), byte_ids_(std::move(byte_ids)), unk_id_(unk_id) {
  if (scores_.size() != pieces_.size()) throw std::invalid_argument("a score per piece is needed");
  if (byte_ids_.size() != 256) throw std::invalid_argument("byte_ids needs 256 entries");
  const int64_t n = int64_t(pieces_.size());
  for (int64_t b : byte_ids_)
    if (b < -1 || b >= n) throw std::invalid_argument("a byte token id is outside the vocabulary");
  if (unk_id_ < -1 || unk_id_ >= n) throw std::invalid_argument("unk_id is outside the vocabulary");
  index_.reserve(pieces_.size());
  for (size_t i = 0; i < pieces_.size(); ++i)
    if (!pieces_[i].empty()) index_.emplace(std::string_view(pieces_[i]), uint32_t(i));   // the first id wins
  for (const auto& [text, id] : index_) {   // a space after another character: no cutting at spaces
    size_t at = 0;
    while (at < text.size() && text.substr(at, 3) == kSpace) at += 3;
    if (text.find(kSpace, at) != std::string_view::npos) splits_at_spaces_ = false;
  }
  for (const auto& [text, id] : index_) {   // every split of a piece into two pieces
    for (size_t k = char_length(static_cast<unsigned char>(text[0])); k < text.size();
         k += char_length(static_cast<unsigned char>(text[k]))) {
      const auto a = index_.find(text.substr(0, k)), b = index_.find(text.substr(k));
      if (a != index_.end() && b != index_.end()) pairs_.emplace(pair_key(a->second, b->second), id);
    }
  }
}

SpmModel::Match SpmModel::find(std::string_view text) const {
  const auto it = index_.find(text);
  if (it == index_.end()) return {};
  return {int64_t(it->second), scores_[it->second]};
}

void SpmModel::encode(std::string_view text, std::vector<uint32_t>& out) const {
  if (!splits_at_spaces_) return encode_run(text, out);
  size_t start = 0;
  for (size_t at = text.find(kSpace, 1); at != std::string_view::npos; at = text.find(kSpace, at + 3)) {
    if (at >= 3 && text.substr(at - 3, 3) == kSpace) continue;   // inside a run of spaces: no cut
    encode_run(text.substr(start, at - start), out);
    start = at;
  }
  encode_run(text.substr(start), out);
}

void SpmModel::encode_run(std::string_view text, std::vector<uint32_t>& out) const {
  thread_local std::vector<Symbol> symbols;   // reused from run to run
  symbols.clear();
  for (size_t at = 0; at < text.size();) {
    const size_t len = std::min(char_length(static_cast<unsigned char>(text[at])), text.size() - at);
    symbols.push_back({int64_t(symbols.size()) - 1, int64_t(symbols.size()) + 1, at, len,
                       find(text.substr(at, len)).id});
    at += len;
  }
  if (symbols.empty()) return;
  symbols.back().next = -1;
  thread_local std::vector<Bigram> heap;   // a max-heap (std::push_heap / pop_heap), reused
  heap.clear();
  auto try_pair = [&](int64_t left, int64_t right) {
    if (left < 0 || right < 0) return;
    const Symbol &a = symbols[size_t(left)], &b = symbols[size_t(right)];
    if (a.id >= 0 && b.id >= 0) {
      const auto it = pairs_.find(pair_key(uint32_t(a.id), uint32_t(b.id)));
      if (it != pairs_.end()) {
        heap.push_back({scores_[it->second], left, a.length + b.length, int64_t(it->second)});
        std::push_heap(heap.begin(), heap.end());
      }
      return;
    }
    const Match m = find(text.substr(a.start, a.length + b.length));   // a character with no piece
    if (m.id >= 0) {
      heap.push_back({m.score, left, a.length + b.length, m.id});
      std::push_heap(heap.begin(), heap.end());
    }
  };
  for (int64_t i = 1; i < int64_t(symbols.size()); ++i) try_pair(i - 1, i);
  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end());
    const Bigram top = heap.back();
    heap.pop_back();
    Symbol& left = symbols[size_t(top.left)];
    if (left.length == 0 || left.next < 0) continue;
    Symbol& right = symbols[size_t(left.next)];
    if (left.length + right.length != top.length) continue;   // one side changed since it was pushed
    left.length += right.length;
    left.id = top.id;
    right.length = 0;
    left.next = right.next;
    if (right.next >= 0) symbols[size_t(right.next)].prev = top.left;
    try_pair(left.prev, top.left);
    try_pair(top.left, left.next);
  }
  for (int64_t i = 0; i >= 0; i = symbols[size_t(i)].next) {
    const Symbol& s = symbols[size_t(i)];
    if (s.id >= 0) {
      out.push_back(uint32_t(s.id));
      continue;
    }
    for (size_t k = 0; k < s.length; ++k) {   // byte fallback
      const int64_t id = byte_ids_[static_cast<unsigned char>(text[s.start + k])];
      if (id >= 0) {
        out.push_back(uint32_t(id));
      } else if (unk_id_ >= 0) {
        if (out.empty() || int64_t(out.back()) != unk_id_ || k == 0) out.push_back(uint32_t(unk_id_));
      } else {
        throw std::invalid_argument("a character with no piece and no byte token, and no unknown token");
      }
    }
  }
}

}  // namespace tok
}  // namespace pyllm
