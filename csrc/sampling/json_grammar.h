// Constrained decoding for JSON output: a byte-level matcher that knows whether a text can still
// become a JSON document (optionally one that a schema, reduced to the subset below, accepts), and
// from it the mask of the vocabulary's tokens that may come next.
// Not a JSON parser that builds values, nor a schema validator of whole documents: it only says,
// byte by byte, whether continuing is possible and how many bytes finishing needs at least.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace pyllm {
namespace sampling {

// A JSON schema as the matcher enforces it. Object keys are compared as their JSON-escaped bytes.
struct SchemaNode {
  enum Kind : int { kAny = 0, kObject, kArray, kString, kNumber, kInteger, kBoolean, kNull, kLiterals };
  int kind = kAny;
  std::vector<std::string> keys;      // kObject: property names (escaped, without quotes)
  std::vector<int> children;          // kObject: the node of each key; kArray: {the items' node}
  std::vector<bool> required;         // kObject: per key
  bool additional = false;            // kObject: other keys (with any value) allowed
  std::vector<std::string> literals;  // kLiterals: the JSON texts allowed (enum, const), e.g. "\"red\""
};

// A vocabulary's token bytes, held once (a mask reads every one of them per step), and which tokens
// are plain string content (no quote, backslash or control byte): inside a string those need no feeding.
struct TokenBytes {
  explicit TokenBytes(std::vector<std::string> tokens);
  std::vector<std::string> tokens;
  std::vector<uint8_t> plain;
};

class JsonGrammar {
 public:
  static constexpr int kMaxDepth = 16, kMaxKeys = 64, kMaxLiterals = 64, kMaxWhitespace = 8;

  // nodes empty: any JSON document; else nodes[root] is the document's schema (checked: indices,
  // sizes within the limits above; std::invalid_argument otherwise).
  JsonGrammar(std::vector<SchemaNode> nodes, int root);

  struct Frame {
    int32_t node;     // -1: any JSON
    uint8_t object;   // 1 object, 0 array
    uint8_t phase;
    int16_t key;      // object: the key being given its value (-1: an extra key)
    uint64_t seen;    // object: keys given so far (bit per key)
  };
  struct State {
    Frame stack[kMaxDepth];
    int depth = 0;
    uint8_t lex = 0;        // see json_grammar.cpp
    int32_t expect = -1;    // the node of the value being started or lexed
    uint8_t esc = 0;        // in a string: 0, 1 after a backslash, 2..5 hex digits to come
    uint8_t num = 0;        // in a number: its sub-state
    uint8_t ws = 0;         // whitespace bytes in a row outside strings
    bool key_string = false;
    uint8_t key_len = 0;    // bytes of the key so far (object keys of a schema node)
    uint64_t candidates = 0;  // keys (in a key string) or literals still possible
  uint64_t repeats = 0;     // in an extra key's string: keys already given that it still spells
    uint16_t lit_pos = 0;
  };

  State start() const;
  // Feeds bytes; false (state unspecified) when they cannot continue a document.
  bool feed(State& s, const char* bytes, int64_t n) const;
  bool complete(const State& s) const;
  // Complete, and nothing but whitespace may follow (a number at the top, say, may still grow).
  bool ended(const State& s) const { return s.depth == 0 && s.lex == 6; }
  // The fewest bytes that complete the document from s.
  int64_t closing_length(const State& s) const;
  // allowed[t] = 1 when token t's bytes (vocab[t]; empty: never) can follow s and leave a document
  // that budget bytes more can close (closing_length <= budget; negative: no limit).
  void mask(const State& s, const TokenBytes& vocab, uint8_t* allowed, int64_t budget) const;

 private:
  bool step(State& s, unsigned char c) const;
  bool begin_value(State& s, unsigned char c) const;
  bool after_value(State& s, unsigned char c) const;
  void value_done(State& s) const;
  bool exact_repeat(const State& s) const;
  int64_t min_length(int node) const;
  int64_t pair_length(int node, int key) const;
  int64_t rest_of_object(const Frame& f) const;   // from "a value just ended" to the closing brace
  int64_t close_frames(const State& s, int from_depth) const;

  std::vector<SchemaNode> nodes_;
  int root_;
  std::vector<int64_t> min_len_;
};

}  // namespace sampling
}  // namespace pyllm
