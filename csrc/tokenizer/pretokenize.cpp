// The GPT-2 and GPT-4 split patterns as hand-written matchers over UTF-8, one function per pattern,
// each trying the pattern's alternatives in order at the current position as `regex` does.
// Not general: a change to a pattern is a change here, checked against `regex` by the tests.
#include "tokenizer/pretokenize.h"

#include <array>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include "tokenizer/unicode_tables.h"

namespace pyllm {
namespace tok {
namespace {

constexpr uint32_t kMaxCodePoint = 0x10FFFF;
constexpr uint32_t kNotUtf8 = 0xFFFFFFFF;  // the code point of a byte that starts no valid sequence

// Class of every code point, in two levels: blocks_[block_of_[cp >> 8]][cp & 255]. Most of the
// code space repeats a few blocks (all letters, all unassigned), each stored once: ~40 KB in all.
class ClassTable {
 public:
  ClassTable() {
    std::vector<uint8_t> flat(kMaxCodePoint + 1, uint8_t(CharClass::kOther));
    mark(flat, kLetterRanges, CharClass::kLetter);
    mark(flat, kNumberRanges, CharClass::kNumber);
    mark(flat, kSpaceRanges, CharClass::kSpace);
    std::map<std::string, uint16_t> index_of_block;
    for (uint32_t b = 0; b < kNumBlocks; ++b) {
      const auto first = flat.begin() + b * kBlockSize;
      auto [it, added] = index_of_block.emplace(std::string(first, first + kBlockSize),
                                                uint16_t(index_of_block.size()));
      if (added) blocks_.insert(blocks_.end(), first, first + kBlockSize);
      block_of_[b] = it->second;
    }
    byte_class_.fill(kMultibyte);
    for (uint32_t c = 0; c < 0x80; ++c) byte_class_[c] = flat[c];
  }

  // The class of an ASCII byte, or kMultibyte for a byte >= 0x80.
  static constexpr uint8_t kMultibyte = 0xFF;
  const uint8_t* byte_classes() const { return byte_class_.data(); }
  CharClass operator()(uint32_t cp) const {
    return CharClass(blocks_[size_t(block_of_[cp >> kBlockBits]) * kBlockSize + (cp & (kBlockSize - 1))]);
  }

 private:
  static constexpr uint32_t kBlockBits = 8;
  static constexpr uint32_t kBlockSize = 1u << kBlockBits;
  static constexpr uint32_t kNumBlocks = (kMaxCodePoint + 1) >> kBlockBits;

  static void mark(std::vector<uint8_t>& flat, const RangeTable& table, CharClass cls) {
    for (size_t i = 0; i < table.size; ++i)
      for (uint32_t cp = table.ranges[i].lo; cp <= table.ranges[i].hi; ++cp) flat[cp] = uint8_t(cls);
  }

  std::array<uint16_t, kNumBlocks> block_of_{};
  std::vector<uint8_t> blocks_;
  std::array<uint8_t, 256> byte_class_{};
};

const ClassTable& class_table() {
  static const ClassTable table;
  return table;
}

struct Char {  // 8 bytes: returned in one register
  uint32_t code_point;  // kNotUtf8 for a stray byte
  uint8_t size;         // in bytes
  CharClass cls;
};

bool is_newline(uint32_t cp) { return cp == '\r' || cp == '\n'; }

// The lowercase ASCII letter that (?i) matches cp to, or 0 (only for the contraction letters
// beyond ASCII: see kContractionFolds).
char fold_to_ascii(uint32_t cp) {
  if (cp >= 'a' && cp <= 'z') return char(cp);
  if (cp >= 'A' && cp <= 'Z') return char(cp - 'A' + 'a');
  for (size_t i = 0; i < kContractionFolds.size; ++i)
    if (kContractionFolds.folds[i].code_point == cp) return kContractionFolds.folds[i].ascii;
  return 0;
}

// A UTF-8 text read character by character.
class Text {
 public:
  explicit Text(std::string_view text)
      : begin_(reinterpret_cast<const uint8_t*>(text.data())), end_(begin_ + text.size()),
        classes_(class_table()), byte_class_(classes_.byte_classes()) {}

  const uint8_t* begin() const { return begin_; }
  const uint8_t* end() const { return end_; }

  // The character starting at p (p < end()). Inlined into every matcher: as a call, it is a
  // third of the splitting time.
  [[gnu::always_inline]] Char at(const uint8_t* p) const {
    const uint8_t cls = byte_class_[*p];
    if (cls != ClassTable::kMultibyte) return {*p, 1, CharClass(cls)};
    return decode(p);
  }

  // Past the run of characters of class cls that starts at p.
  const uint8_t* skip(const uint8_t* p, CharClass cls) const {
    for (;;) {
      while (p < end_ && byte_class_[*p] == uint8_t(cls)) ++p;  // the ASCII stretch
      if (p == end_ || *p < 0x80) return p;
      const Char c = decode(p);
      if (c.cls != cls) return p;
      p += c.size;
    }
  }

  // Past at most `most` characters of class cls from p.
  const uint8_t* skip_at_most(const uint8_t* p, CharClass cls, int most) const {
    for (; most > 0 && p < end_; --most) {
      const Char c = at(p);
      if (c.cls != cls) break;
      p += c.size;
    }
    return p;
  }

  // Past the run of \r and \n that starts at p.
  const uint8_t* skip_newlines(const uint8_t* p) const {
    while (p < end_ && is_newline(*p)) ++p;
    return p;
  }

 private:
  [[gnu::noinline]] Char decode(const uint8_t* p) const {
    const Char stray{kNotUtf8, 1, CharClass::kOther};
    const uint8_t lead = *p;
    uint32_t size, cp, smallest;
    if ((lead & 0xE0) == 0xC0) {
      size = 2, cp = lead & 0x1F, smallest = 0x80;
    } else if ((lead & 0xF0) == 0xE0) {
      size = 3, cp = lead & 0x0F, smallest = 0x800;
    } else if ((lead & 0xF8) == 0xF0) {
      size = 4, cp = lead & 0x07, smallest = 0x10000;
    } else {
      return stray;
    }
    if (size_t(end_ - p) < size) return stray;
    for (uint32_t i = 1; i < size; ++i) {
      if ((p[i] & 0xC0) != 0x80) return stray;
      cp = (cp << 6) | (p[i] & 0x3F);
    }
    // Overlong forms, surrogates and values past U+10FFFF are not UTF-8.
    if (cp < smallest || cp > kMaxCodePoint || (cp >= 0xD800 && cp <= 0xDFFF)) return stray;
    return {cp, uint8_t(size), classes_(cp)};
  }

  const uint8_t* begin_;
  const uint8_t* end_;
  const ClassTable& classes_;
  const uint8_t* byte_class_;
};

// ----------------------------------------------------------------------------- GPT-2

// Bytes of the contraction 's|'t|'re|'ve|'m|'ll|'d after the apostrophe at p - 1, or 0.
size_t gpt2_contraction(const Text& t, const uint8_t* p) {
  const size_t left = size_t(t.end() - p);
  if (left >= 1 && (*p == 's' || *p == 't' || *p == 'm' || *p == 'd')) return 1;
  if (left >= 2 && (((p[0] == 'r' || p[0] == 'v') && p[1] == 'e') || (p[0] == 'l' && p[1] == 'l')))
    return 2;
  return 0;
}

// \s+(?!\S)|\s+ at p (a space): a run of spaces that ends the text is one piece; otherwise the
// run but its last character, which is left to lead the next piece; at least one character.
// With kDigitsApart a number ends the text too (see gpt2_piece).
template <bool kDigitsApart>
const uint8_t* gpt2_spaces(const Text& t, const uint8_t* p) {
  const uint8_t* last = p;  // where the run's last character starts
  const uint8_t* q = p;
  while (q < t.end()) {
    const Char c = t.at(q);
    if (c.cls != CharClass::kSpace) {
      if (kDigitsApart && c.cls == CharClass::kNumber) return q;
      break;
    }
    last = q;
    q += c.size;
  }
  return q == t.end() || last == p ? q : last;
}

// One GPT-2 piece from p, where c starts. With kDigitsApart the text is cut before and after
// every number (the caller makes each number a piece), and each stretch between numbers splits
// as a text of its own.
template <bool kDigitsApart>
const uint8_t* gpt2_piece(const Text& t, const uint8_t* p, const Char c) {
  const uint8_t* next = p + c.size;
  if (c.code_point == '\'') {
    if (const size_t n = gpt2_contraction(t, next)) return next + n;
  }
  if (c.cls != CharClass::kSpace) return t.skip(next, c.cls);  // \p{L}+ | \p{N}+ | [^\s\p{L}\p{N}]+
  if (c.code_point == ' ' && next < t.end()) {                 // the same after an optional ' '
    const Char n = t.at(next);
    if (n.cls != CharClass::kSpace && !(kDigitsApart && n.cls == CharClass::kNumber))
      return t.skip(next + n.size, n.cls);
  }
  return gpt2_spaces<kDigitsApart>(t, p);
}

const uint8_t* gpt2_digits_piece(const Text& t, const uint8_t* p) {
  const Char c = t.at(p);
  return c.cls == CharClass::kNumber ? p + c.size : gpt2_piece<true>(t, p, c);
}

// ----------------------------------------------------------------------------- GPT-4

// Bytes of the contraction (?i:[sdmt]|ll|ve|re) after the apostrophe at p - 1, or 0.
size_t gpt4_contraction(const Text& t, const uint8_t* p) {
  if (p == t.end()) return 0;
  const Char first = t.at(p);
  const char a = fold_to_ascii(first.code_point);
  if (a == 's' || a == 'd' || a == 'm' || a == 't') return first.size;
  if ((a != 'l' && a != 'v' && a != 'r') || p + first.size == t.end()) return 0;
  const Char second = t.at(p + first.size);
  const char b = fold_to_ascii(second.code_point);
  return (a == 'l' ? b == 'l' : b == 'e') ? first.size + second.size : 0;
}

// \s++$|\s*[\r\n]|\s+(?!\S)|\s at p (a space): a run of spaces that ends the text is one piece;
// otherwise the run up to its last \r or \n; otherwise the run but its last character; otherwise
// one character.
const uint8_t* gpt4_spaces(const Text& t, const uint8_t* p) {
  const uint8_t* last = p;  // where the run's last character starts
  const uint8_t* after_newline = nullptr;
  const uint8_t* q = p;
  while (q < t.end()) {
    const Char c = t.at(q);
    if (c.cls != CharClass::kSpace) break;
    last = q;
    q += c.size;
    if (is_newline(c.code_point)) after_newline = q;
  }
  if (q == t.end()) return q;
  if (after_newline) return after_newline;
  return last == p ? q : last;
}

// One GPT-4 piece from p: the alternatives of the pattern, tried in its order.
const uint8_t* gpt4_piece(const Text& t, const uint8_t* p) {
  const Char c = t.at(p);
  const uint8_t* next = p + c.size;
  if (c.code_point == '\'') {
    if (const size_t n = gpt4_contraction(t, next)) return next + n;
  }
  if (c.cls == CharClass::kLetter) return t.skip(next, CharClass::kLetter);
  if (c.cls == CharClass::kNumber) return t.skip_at_most(next, CharClass::kNumber, 2);  // \p{N}{1,3}+
  if (!is_newline(c.code_point) && next < t.end()) {
    const Char n = t.at(next);
    // [^\r\n\p{L}\p{N}]?+\p{L}++ with the optional character present
    if (n.cls == CharClass::kLetter) return t.skip(next + n.size, CharClass::kLetter);
    // ' '[^\s\p{L}\p{N}]++[\r\n]*+
    if (c.code_point == ' ' && n.cls == CharClass::kOther)
      return t.skip_newlines(t.skip(next + n.size, CharClass::kOther));
  }
  if (c.cls == CharClass::kOther) return t.skip_newlines(t.skip(next, CharClass::kOther));  // no ' '
  return gpt4_spaces(t, p);
}

// ----------------------------------------------------------------------------- driver

template <class Piece>
std::vector<int64_t> split(std::string_view text, Piece piece) {
  const Text t(text);
  std::vector<int64_t> ends;
  // Pieces of real text average about 4 bytes; reserved pages that are never written cost nothing.
  ends.reserve(text.size() / 3 + 1);
  for (const uint8_t* p = t.begin(); p < t.end();) {
    p = piece(t, p);
    ends.push_back(p - t.begin());
  }
  return ends;
}

}  // namespace

Pattern pattern_from_name(std::string_view name) {
  if (name == "gpt2") return Pattern::kGpt2;
  if (name == "gpt4") return Pattern::kGpt4;
  if (name == "gpt2_digits") return Pattern::kGpt2Digits;
  throw std::invalid_argument("unknown pre-tokenizer pattern '" + std::string(name) +
                              "' (built in: gpt2, gpt4, gpt2_digits)");
}

std::vector<int64_t> pretokenize(std::string_view text, Pattern pattern) {
  switch (pattern) {
    // Lambdas rather than function pointers, so that each piece function is inlined into its loop.
    case Pattern::kGpt2:
      return split(text, [](const Text& t, const uint8_t* p) {
        return gpt2_piece<false>(t, p, t.at(p));
      });
    case Pattern::kGpt4:
      return split(text, [](const Text& t, const uint8_t* p) { return gpt4_piece(t, p); });
    case Pattern::kGpt2Digits:
      return split(text, [](const Text& t, const uint8_t* p) { return gpt2_digits_piece(t, p); });
  }
  throw std::invalid_argument("unknown pre-tokenizer pattern");
}

CharClass char_class(uint32_t code_point) {
  return code_point > kMaxCodePoint ? CharClass::kOther : class_table()(code_point);
}

}  // namespace tok
}  // namespace pyllm
