// Byte-level BPE: a vocabulary of byte strings, ranked merges, piece encoding and training.
// Not pre-tokenization (pretokenize.h splits text into pieces) and not special tokens or file
// formats (pyllm/tokenizer.py handles those before and after calling in here).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

namespace pyllm {
namespace tok {

using TokenId = uint32_t;
using Merge = std::pair<TokenId, TokenId>;  // (left, right), ranked by position in the list

// A trained byte-level BPE: vocab[id] is the bytes of token id; merges[r] = (left, right) is
// the merge of rank r (lower merges first), producing the token whose bytes are their concat.
class BpeModel {
 public:
  // A byte without a single-byte token encodes as unk_id (imported vocabularies may lack a few
  // control bytes), or, with unk_id < 0, makes encoding it an error. Throws std::invalid_argument
  // if a merge names an id out of range or makes a token that is not in the vocabulary.
  BpeModel(std::vector<std::string> vocab, const std::vector<Merge>& merges, int64_t unk_id = -1);

  // Appends the ids of one piece: start from its bytes, then repeatedly merge the adjacent pair
  // of lowest rank (the leftmost on ties) until no pair has a merge.
  void encode_piece(std::string_view piece, std::vector<TokenId>& out) const;
  // The same for consecutive pieces of text ending at piece_ends, through a cache of pieces.
  void encode_pieces(std::string_view text, const std::vector<uint32_t>& piece_ends,
                     std::vector<TokenId>& out) const;
  // Throws std::invalid_argument for an id out of range.
  std::string decode(const TokenId* ids, size_t n) const;

  size_t vocab_size() const { return vocab_.size(); }
  const std::string& token_bytes(TokenId id) const { return vocab_[id]; }

 private:
  static uint64_t key(TokenId a, TokenId b) { return (uint64_t(a) << 32) | b; }
  // (rank, merged id) of the pair, or rank = UINT32_MAX when the pair does not merge.
  std::pair<uint32_t, TokenId> lookup(TokenId a, TokenId b) const;
  void encode_short(std::string_view piece, std::vector<TokenId>& out) const;
  void encode_long(std::string_view piece, std::vector<TokenId>& out) const;

  static constexpr size_t kShortPiece = 64;  // longer pieces are merged through a heap
  static constexpr TokenId kMissingByte = UINT32_MAX;
  TokenId byte_id(uint8_t b) const;

  std::vector<std::string> vocab_;
  TokenId byte_token_[256];
  std::unordered_map<uint64_t, std::pair<uint32_t, TokenId>> merges_;  // pair -> (rank, result)
};

// Learns merges from pieces (unique byte strings) and how often each occurs. Token ids 0..255
// are the single bytes; merge i creates id 256 + i. Each step merges the adjacent pair with the
// highest count over all pieces; ties go to the pair whose (left id, right id) is smallest, so a
// given corpus always gives the same merges. Pair counts are kept incrementally: after a merge
// only the pieces that contained the pair are rescanned, and a max-heap with lazy deletion finds
// the next best pair. Stops early when no pair occurs at least min_count times.
// on_progress(merges_done) is called every `progress_every` merges (may be empty).
std::vector<Merge> train_bpe(const std::vector<std::string>& pieces,
                             const std::vector<uint64_t>& counts, size_t num_merges,
                             uint64_t min_count, size_t progress_every,
                             const std::function<void(size_t)>& on_progress);

// Counts the pieces of text (ending at piece_ends) into counts, keyed by their bytes.
void count_pieces(std::string_view text, const std::vector<uint32_t>& piece_ends,
                  std::unordered_map<std::string, uint64_t>& counts);

}  // namespace tok
}  // namespace pyllm
