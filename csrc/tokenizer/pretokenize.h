// Pre-tokenization: splits UTF-8 text into the pieces BPE encodes one by one, exactly as the
// `regex` package's findall does with the GPT-2 and GPT-4 (cl100k, as tiktoken ships it) patterns.
// Not a regex engine: each pattern is a hand-written matcher; custom patterns stay in Python.
#pragma once

#include <cstdint>
#include <string_view>
#include <vector>

namespace pyllm {
namespace tok {

enum class Pattern {
  kGpt2,        // 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
  kGpt4,        // '(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+|
                //  ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s
  kGpt2Digits,  // every \p{N} code point a piece of its own; GPT-2 on the text between them
};

// The pattern called "gpt2", "gpt4" or "gpt2_digits"; throws std::invalid_argument for any other.
Pattern pattern_from_name(std::string_view name);

// The end byte offset of every piece of text, in order (the last is text.size(); none for "").
// A byte that starts no valid UTF-8 sequence is a one-byte character of its own, in no class.
std::vector<int64_t> pretokenize(std::string_view text, Pattern pattern);

// The classes the patterns use. Every code point is in at most one (in `regex`, as in Unicode).
enum class CharClass : uint8_t { kOther = 0, kLetter = 1, kNumber = 2, kSpace = 3 };
CharClass char_class(uint32_t code_point);  // kOther beyond U+10FFFF

}  // namespace tok
}  // namespace pyllm
