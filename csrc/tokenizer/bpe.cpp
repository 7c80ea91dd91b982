// Byte-level BPE encoding (by merge rank) and training (incremental pair counts, lazy max-heap).
// Not thread-owning: callers run encode_pieces on many texts in parallel; the model is read-only.
#include "tokenizer/bpe.h"

#include <algorithm>
#include <cstring>
#include <queue>
#include <stdexcept>
#include <tuple>

namespace pyllm {
namespace tok {

constexpr uint32_t kNoMerge = UINT32_MAX;

BpeModel::BpeModel(std::vector<std::string> vocab, const std::vector<Merge>& merges, int64_t unk_id)
    : vocab_(std::move(vocab)) {
  const TokenId n = static_cast<TokenId>(vocab_.size());
  std::unordered_map<std::string_view, TokenId> token_of_bytes;  // views into vocab_
  token_of_bytes.reserve(vocab_.size());
  for (TokenId id = 0; id < n; ++id) token_of_bytes.emplace(vocab_[id], id);  // first id wins
  for (int b = 0; b < 256; ++b) {
    const char c = static_cast<char>(b);
    auto it = token_of_bytes.find(std::string_view(&c, 1));
    byte_token_[b] = it != token_of_bytes.end() ? it->second
                     : unk_id >= 0 && unk_id < int64_t(n) ? TokenId(unk_id) : kMissingByte;
  }
  merges_.reserve(merges.size());
  for (uint32_t rank = 0; rank < merges.size(); ++rank) {
    const auto [a, b] = merges[rank];
    if (a >= n || b >= n)
      throw std::invalid_argument("merge " + std::to_string(rank) + " names a token id outside the "
                                  "vocabulary of " + std::to_string(n));
    auto it = token_of_bytes.find(vocab_[a] + vocab_[b]);
    if (it == token_of_bytes.end())
      throw std::invalid_argument("merge " + std::to_string(rank) + " (" + std::to_string(a) + ", " +
                                  std::to_string(b) + ") makes a token that is not in the vocabulary");
    merges_.emplace(key(a, b), std::make_pair(rank, it->second));  // first (lowest rank) wins
  }
}

TokenId BpeModel::byte_id(uint8_t b) const {
  if (byte_token_[b] == kMissingByte)
    throw std::invalid_argument("the byte " + std::to_string(b) + " has no token in this vocabulary "
                                "and the tokenizer has no unknown token");
  return byte_token_[b];
}

std::pair<uint32_t, TokenId> BpeModel::lookup(TokenId a, TokenId b) const {
  auto it = merges_.find(key(a, b));
  return it == merges_.end() ? std::make_pair(kNoMerge, TokenId(0)) : it->second;
}

// Short pieces: keep the pair ranks in an array and scan it for the minimum at each step
// (quadratic, but on a few dozen bytes a scan beats any heap).
void BpeModel::encode_short(std::string_view piece, std::vector<TokenId>& out) const {
  const size_t n = piece.size();
  TokenId sym[kShortPiece];
  uint32_t rank[kShortPiece];
  TokenId merged[kShortPiece];
  for (size_t i = 0; i < n; ++i) sym[i] = byte_id(static_cast<uint8_t>(piece[i]));
  size_t len = n;
  for (size_t i = 0; i + 1 < len; ++i) std::tie(rank[i], merged[i]) = lookup(sym[i], sym[i + 1]);
  while (len > 1) {
    size_t best = 0;
    for (size_t i = 1; i + 1 < len; ++i)
      if (rank[i] < rank[best]) best = i;
    if (rank[best] == kNoMerge) break;
    sym[best] = merged[best];
    for (size_t i = best + 1; i + 1 < len; ++i) {  // drop symbol best + 1 and pair best + 1
      sym[i] = sym[i + 1];
      rank[i] = rank[i + 1];
      merged[i] = merged[i + 1];
    }
    --len;
    if (best > 0) std::tie(rank[best - 1], merged[best - 1]) = lookup(sym[best - 1], sym[best]);
    if (best + 1 < len) std::tie(rank[best], merged[best]) = lookup(sym[best], sym[best + 1]);
  }
  out.insert(out.end(), sym, sym + len);
}

// Long pieces (a 100 000-space run is one piece): symbols in a linked list and candidate merges
// in a min-heap ordered by (rank, position); entries made stale by earlier merges are skipped.
void BpeModel::encode_long(std::string_view piece, std::vector<TokenId>& out) const {
  const size_t n = piece.size();
  std::vector<TokenId> sym(n);
  std::vector<int64_t> prev(n), next(n);
  for (size_t i = 0; i < n; ++i) {
    sym[i] = byte_id(static_cast<uint8_t>(piece[i]));
    prev[i] = int64_t(i) - 1;
    next[i] = i + 1 < n ? int64_t(i) + 1 : -1;
  }
  struct Candidate {
    uint32_t rank;
    int64_t pos;
    TokenId left, right, merged;
    bool operator>(const Candidate& o) const { return std::tie(rank, pos) > std::tie(o.rank, o.pos); }
  };
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<Candidate>> heap;
  auto push = [&](int64_t pos) {
    if (pos < 0 || next[pos] < 0) return;
    const auto [r, m] = lookup(sym[pos], sym[next[pos]]);
    if (r != kNoMerge) heap.push({r, pos, sym[pos], sym[next[pos]], m});
  };
  for (size_t i = 0; i + 1 < n; ++i) push(int64_t(i));
  while (!heap.empty()) {
    const Candidate c = heap.top();
    heap.pop();
    const int64_t right = next[c.pos];
    if (sym[c.pos] != c.left || right < 0 || sym[right] != c.right) continue;  // stale
    sym[c.pos] = c.merged;
    sym[right] = TokenId(-1);  // dead
    next[c.pos] = next[right];
    if (next[right] >= 0) prev[next[right]] = c.pos;
    push(prev[c.pos]);
    push(c.pos);
  }
  for (int64_t i = 0; i >= 0; i = next[i]) out.push_back(sym[i]);
}

void BpeModel::encode_piece(std::string_view piece, std::vector<TokenId>& out) const {
  if (piece.empty()) return;
  piece.size() <= kShortPiece ? encode_short(piece, out) : encode_long(piece, out);
}

void BpeModel::encode_pieces(std::string_view text, const std::vector<uint32_t>& piece_ends,
                             std::vector<TokenId>& out) const {
  // Text repeats itself (code, prose): remember each piece's ids by where they first landed.
  constexpr size_t kMaxCached = 1 << 16;
  std::unordered_map<std::string_view, std::pair<size_t, size_t>> cache;
  size_t begin = 0;
  for (uint32_t end : piece_ends) {
    const std::string_view piece = text.substr(begin, end - begin);
    begin = end;
    if (piece.size() == 1) {
      out.push_back(byte_id(static_cast<uint8_t>(piece[0])));
      continue;
    }
    auto hit = cache.find(piece);
    if (hit != cache.end()) {
      const auto [at, count] = hit->second;
      for (size_t i = 0; i < count; ++i) out.push_back(out[at + i]);
      continue;
    }
    const size_t at = out.size();
    encode_piece(piece, out);
    if (cache.size() < kMaxCached) cache.emplace(piece, std::make_pair(at, out.size() - at));
  }
}

std::string BpeModel::decode(const TokenId* ids, size_t n) const {
  size_t bytes = 0;
  for (size_t i = 0; i < n; ++i) {
    if (ids[i] >= vocab_.size())
      throw std::invalid_argument("token id " + std::to_string(ids[i]) + " at position " +
                                  std::to_string(i) + " is outside the vocabulary of " +
                                  std::to_string(vocab_.size()));
    bytes += vocab_[ids[i]].size();
  }
  std::string text;
  text.reserve(bytes);
  for (size_t i = 0; i < n; ++i) text += vocab_[ids[i]];
  return text;
}

// ----------------------------------------------------------------------------- training

namespace {

uint64_t pair_key(TokenId a, TokenId b) { return (uint64_t(a) << 32) | b; }

struct HeapEntry {
  uint64_t count;
  uint64_t pair;
  // Max-heap on count; on equal counts the smaller pair key (left id, then right id) first.
  bool operator<(const HeapEntry& o) const {
    return count != o.count ? count < o.count : pair > o.pair;
  }
};

}  // namespace

std::vector<Merge> train_bpe(const std::vector<std::string>& pieces,
                             const std::vector<uint64_t>& counts, size_t num_merges,
                             uint64_t min_count, size_t progress_every,
                             const std::function<void(size_t)>& on_progress) {
  if (pieces.size() != counts.size()) throw std::invalid_argument("pieces and counts differ in length");
  std::vector<std::vector<TokenId>> words(pieces.size());
  std::unordered_map<uint64_t, uint64_t> pair_count;
  std::unordered_map<uint64_t, std::vector<uint32_t>> where;  // pair -> words (may repeat)
  for (size_t w = 0; w < pieces.size(); ++w) {
    words[w].assign(reinterpret_cast<const uint8_t*>(pieces[w].data()),
                    reinterpret_cast<const uint8_t*>(pieces[w].data()) + pieces[w].size());
    for (size_t i = 0; i + 1 < words[w].size(); ++i) {
      const uint64_t p = pair_key(words[w][i], words[w][i + 1]);
      pair_count[p] += counts[w];
      auto& list = where[p];
      if (list.empty() || list.back() != w) list.push_back(uint32_t(w));
    }
  }
  std::priority_queue<HeapEntry> heap;
  for (const auto& [p, c] : pair_count) heap.push({c, p});

  std::vector<Merge> merges;
  merges.reserve(num_merges);
  std::vector<uint32_t> last_visit(words.size(), UINT32_MAX);  // dedupe words per merge
  std::unordered_map<uint64_t, int64_t> delta;                 // pair count changes of one merge
  while (merges.size() < num_merges && !heap.empty()) {
    const HeapEntry top = heap.top();
    heap.pop();
    auto current = pair_count.find(top.pair);
    if (current == pair_count.end() || current->second != top.count) continue;  // stale entry
    if (top.count < min_count || top.count == 0) break;
    const TokenId a = TokenId(top.pair >> 32), b = TokenId(top.pair & 0xffffffffu);
    const TokenId made = TokenId(256 + merges.size());
    const uint32_t step = uint32_t(merges.size());
    merges.emplace_back(a, b);
    delta.clear();
    std::vector<uint32_t> affected = std::move(where[top.pair]);
    where.erase(top.pair);
    for (uint32_t w : affected) {
      if (last_visit[w] == step) continue;
      last_visit[w] = step;
      auto& sym = words[w];
      const int64_t c = int64_t(counts[w]);
      bool found = false;
      for (size_t i = 0; i + 1 < sym.size(); ++i)
        if (sym[i] == a && sym[i + 1] == b) { found = true; break; }
      if (!found) continue;
      // Take the word's pairs out, merge left to right, put its pairs back: simple and exact,
      // and pieces are short.
      for (size_t i = 0; i + 1 < sym.size(); ++i) delta[pair_key(sym[i], sym[i + 1])] -= c;
      size_t o = 0;
      for (size_t i = 0; i < sym.size(); ++i) {
        if (i + 1 < sym.size() && sym[i] == a && sym[i + 1] == b) {
          sym[o++] = made;
          ++i;
        } else {
          sym[o++] = sym[i];
        }
      }
      sym.resize(o);
      for (size_t i = 0; i + 1 < sym.size(); ++i) {
        const uint64_t p = pair_key(sym[i], sym[i + 1]);
        delta[p] += c;
        if (sym[i] == made || sym[i + 1] == made) {
          auto& list = where[p];
          if (list.empty() || list.back() != w) list.push_back(w);
        }
      }
    }
    for (const auto& [p, d] : delta) {
      if (d == 0) continue;
      uint64_t& count = pair_count[p];
      count = uint64_t(int64_t(count) + d);
      if (count == 0) {
        pair_count.erase(p);
      } else {
        heap.push({count, p});
      }
    }
    if (on_progress && progress_every && merges.size() % progress_every == 0) on_progress(merges.size());
  }
  if (on_progress) on_progress(merges.size());
  return merges;
}

void count_pieces(std::string_view text, const std::vector<uint32_t>& piece_ends,
                  std::unordered_map<std::string, uint64_t>& counts) {
  std::unordered_map<std::string_view, uint64_t> local;  // views into text: no copies per piece
  size_t begin = 0;
  for (uint32_t end : piece_ends) {
    ++local[text.substr(begin, end - begin)];
    begin = end;
  }
  for (const auto& [piece, c] : local) counts[std::string(piece)] += c;
}

}  // namespace tok
}  // namespace pyllm
