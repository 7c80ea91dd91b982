// The JSON matcher of json_grammar.h: a pushdown automaton over bytes, one frame per open object or
// array, the innermost lexeme (string, number, literal) in the state beside them. Whitespace is
// allowed between tokens, at most kMaxWhitespace bytes in a row, so a constrained model cannot
// stall on blanks; nesting deeper than kMaxDepth is refused.
#include "sampling/json_grammar.h"

#include <algorithm>
#include <limits>
#include <stdexcept>

namespace pyllm {
namespace sampling {
namespace {

enum Lex : uint8_t { kValue = 1, kString, kNumber, kLiteral, kStructure, kDone };   // kDone is 6 in ended()
enum Phase : uint8_t { kKeyOrEnd, kKey, kColon, kObjectValue, kCommaOrObjectEnd,   // objects
                       kValueOrEnd, kArrayValue, kCommaOrArrayEnd };                  // arrays

const std::vector<std::string>& builtin_literals() {
  static const std::vector<std::string> words = {"true", "false", "null"};
  return words;
}

inline bool is_space(unsigned char c) { return c == ' ' || c == '\n' || c == '\r' || c == '\t'; }
inline bool is_digit(unsigned char c) { return c >= '0' && c <= '9'; }
inline bool is_hex(unsigned char c) { return is_digit(c) || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F'); }
inline bool terminal_number(uint8_t num) { return num == 1 || num == 2 || num == 4 || num == 7; }
constexpr int64_t kNever = std::numeric_limits<int64_t>::max() / 4;

}  // namespace

JsonGrammar::JsonGrammar(std::vector<SchemaNode> nodes, int root) : nodes_(std::move(nodes)), root_(root) {
  const int n = int(nodes_.size());
  if (n == 0) {
    root_ = -1;
    return;
  }
  if (root < 0 || root >= n) throw std::invalid_argument("the schema's root is not one of its nodes");
  for (const SchemaNode& node : nodes_) {
    if (node.kind < SchemaNode::kAny || node.kind > SchemaNode::kLiterals)
      throw std::invalid_argument("a schema node of an unknown kind");
    for (int child : node.children)
      if (child < -1 || child >= n) throw std::invalid_argument("a schema node's child is not a node");
    if (node.kind == SchemaNode::kObject) {
      if (int(node.keys.size()) > kMaxKeys) throw std::invalid_argument("a schema object with more than 64 keys");
      if (node.children.size() != node.keys.size() || node.required.size() != node.keys.size())
        throw std::invalid_argument("a schema object needs a node and a required flag per key");
      for (const std::string& k : node.keys)
        if (k.size() > 255) throw std::invalid_argument("a schema key longer than 255 bytes");
    }
    if (node.kind == SchemaNode::kArray && node.children.size() != 1)
      throw std::invalid_argument("a schema array needs the node of its items");
    if (node.kind == SchemaNode::kLiterals) {
      if (node.literals.empty() || int(node.literals.size()) > kMaxLiterals)
        throw std::invalid_argument("an enum needs between 1 and 64 values");
      for (const std::string& l : node.literals)
        if (l.empty() || l.size() > 4096) throw std::invalid_argument("an enum value of 0 or more than 4096 bytes");
    }
  }
  // Shortest documents of each node, children first (the schema is a tree: a node refers to later ones
  // or earlier ones, so iterate until nothing changes).
  min_len_.assign(size_t(n), kNever);
  for (int pass = 0; pass <= n; ++pass) {
    bool changed = false;
    for (int i = n - 1; i >= 0; --i) {
      const SchemaNode& node = nodes_[size_t(i)];
      int64_t len = kNever;
      switch (node.kind) {
        case SchemaNode::kAny: case SchemaNode::kNumber: case SchemaNode::kInteger: len = 1; break;
        case SchemaNode::kString: case SchemaNode::kArray: len = 2; break;
        case SchemaNode::kBoolean: case SchemaNode::kNull: len = 4; break;
        case SchemaNode::kLiterals:
          for (const std::string& l : node.literals) len = std::min<int64_t>(len, int64_t(l.size()));
          break;
        case SchemaNode::kObject: {
          len = 2;
          int required = 0;
          for (size_t k = 0; k < node.keys.size(); ++k)
            if (node.required[k]) {
              const int64_t child = node.children[k] < 0 ? 1 : min_len_[size_t(node.children[k])];
              len = child >= kNever ? kNever : len + int64_t(node.keys[k].size()) + 3 + child;
              ++required;
            }
          if (len < kNever && required > 1) len += required - 1;
          break;
        }
      }
      if (len != min_len_[size_t(i)]) min_len_[size_t(i)] = len, changed = true;
    }
    if (!changed) break;
  }
  if (min_len_[size_t(root_)] >= kNever) throw std::invalid_argument("the schema admits no finite document");
}

JsonGrammar::State JsonGrammar::start() const {
  State s;
  s.lex = kValue;
  s.expect = root_;
  return s;
}

// In a key string: the key so far is one the object already has, so it may not end here.
bool JsonGrammar::exact_repeat(const State& s) const {
  if (s.esc || !s.repeats) return false;
  const SchemaNode& n = nodes_[size_t(s.stack[s.depth - 1].node)];
  for (size_t k = 0; k < n.keys.size(); ++k)
    if ((s.repeats >> k & 1) && n.keys[k].size() == s.key_len) return true;
  return false;
}

int64_t JsonGrammar::min_length(int node) const { return node < 0 ? 1 : min_len_[size_t(node)]; }

int64_t JsonGrammar::pair_length(int node, int key) const {
  const SchemaNode& n = nodes_[size_t(node)];
  return int64_t(n.keys[size_t(key)].size()) + 3 + min_length(n.children[size_t(key)]);
}

// The bytes from "between pairs" (f.phase says which: before the first pair, after ',' or after a
// value) to the closing brace: every required key not given yet, then '}'.
int64_t JsonGrammar::rest_of_object(const Frame& f) const {
  int64_t pairs = 0, missing = 0;
  if (f.node >= 0) {
    const SchemaNode& n = nodes_[size_t(f.node)];
    for (size_t k = 0; k < n.keys.size(); ++k)
      if (n.required[k] && !(f.seen >> k & 1)) pairs += pair_length(f.node, int(k)), ++missing;
  }
  if (f.phase == kKey) {   // after ',': a pair must come, without a comma of its own
    if (missing) return pairs + (missing - 1) + 1;
    int64_t best = (f.node < 0 || nodes_[size_t(f.node)].additional) ? 4 : kNever;   // "":0
    if (f.node >= 0) {
      const SchemaNode& n = nodes_[size_t(f.node)];
      for (size_t k = 0; k < n.keys.size(); ++k)
        if (!(f.seen >> k & 1)) best = std::min(best, pair_length(f.node, int(k)));
    }
    return best + 1;
  }
  const int64_t commas = f.phase == kKeyOrEnd ? std::max<int64_t>(0, missing - 1) : missing;
  return pairs + commas + 1;
}

// Closing every frame below depth `from` (frames [0, from)), each waiting for its value in progress.
int64_t JsonGrammar::close_frames(const State& s, int from) const {
  int64_t total = 0;
  for (int i = from - 1; i >= 0; --i) {
    Frame f = s.stack[i];
    if (f.object) {
      if (f.key >= 0) f.seen |= uint64_t(1) << f.key;
      f.phase = kCommaOrObjectEnd;
      total += rest_of_object(f);
    } else {
      total += 1;
    }
  }
  return total;
}

int64_t JsonGrammar::closing_length(const State& s) const {
  const int d = s.depth;
  switch (s.lex) {
    case kDone: return 0;
    case kValue: return min_length(s.expect) + close_frames(s, d);
    case kNumber: return (terminal_number(s.num) ? 0 : 1) + close_frames(s, d);
    case kLiteral: {
      const std::vector<std::string>& lits =
          s.expect >= 0 && nodes_[size_t(s.expect)].kind == SchemaNode::kLiterals ? nodes_[size_t(s.expect)].literals
                                                                                  : builtin_literals();
      int64_t best = kNever;
      for (size_t i = 0; i < lits.size(); ++i)
        if (s.candidates >> i & 1) best = std::min<int64_t>(best, int64_t(lits[i].size()) - s.lit_pos);
      return best + close_frames(s, d);
    }
    case kString: {
      const int64_t escape = s.esc == 1 ? 1 : s.esc >= 2 ? s.esc - 1 : 0;
      if (!s.key_string) return escape + 1 + close_frames(s, d);
      const Frame& f = s.stack[d - 1];
      int64_t best = kNever;
      auto after_key = [&](int key, int64_t key_rest) {
        Frame g = f;
        if (key >= 0) g.seen |= uint64_t(1) << key;
        g.phase = kCommaOrObjectEnd;
        const int child = key >= 0 ? nodes_[size_t(f.node)].children[size_t(key)] : -1;
        return key_rest + 1 + min_length(child) + rest_of_object(g);
      };
      if (f.node < 0) {
        best = escape + 1 + 1 + 1 + 1;   // close the key, ':', a value, '}'
      } else {
        const SchemaNode& n = nodes_[size_t(f.node)];
        for (size_t k = 0; k < n.keys.size(); ++k)
          if (s.candidates >> k & 1) best = std::min(best, after_key(int(k), int64_t(n.keys[k].size()) - s.key_len + 1));
        if (n.additional) best = std::min(best, after_key(-1, escape + 1 + (exact_repeat(s) ? 1 : 0)));
      }
      return best + close_frames(s, d - 1);
    }
    case kStructure: {
      const Frame& f = s.stack[d - 1];
      int64_t here = 1;
      if (f.object) {
        if (f.phase == kColon) {
          Frame g = f;
          if (f.key >= 0) g.seen |= uint64_t(1) << f.key;
          g.phase = kCommaOrObjectEnd;
          const int child = f.key >= 0 ? nodes_[size_t(f.node)].children[size_t(f.key)] : -1;
          here = 1 + min_length(child) + rest_of_object(g);
        } else {
          here = rest_of_object(f);
        }
      }
      return here + close_frames(s, d - 1);
    }
  }
  return kNever;
}

bool JsonGrammar::complete(const State& s) const {
  if (s.depth != 0) return false;
  if (s.lex == kDone) return true;
  if (s.lex == kNumber) return terminal_number(s.num);
  if (s.lex == kLiteral) {
    const std::vector<std::string>& lits =
        s.expect >= 0 && nodes_[size_t(s.expect)].kind == SchemaNode::kLiterals ? nodes_[size_t(s.expect)].literals
                                                                                : builtin_literals();
    for (size_t i = 0; i < lits.size(); ++i)
      if ((s.candidates >> i & 1) && lits[i].size() == s.lit_pos) return true;
  }
  return false;
}

void JsonGrammar::value_done(State& s) const {
  s.key_string = false;
  if (s.depth == 0) {
    s.lex = kDone;
    return;
  }
  Frame& f = s.stack[s.depth - 1];
  if (f.object) {
    if (f.key >= 0) f.seen |= uint64_t(1) << f.key;
    f.phase = kCommaOrObjectEnd;
  } else {
    f.phase = kCommaOrArrayEnd;
  }
  s.lex = kStructure;
}

bool JsonGrammar::begin_value(State& s, unsigned char c) const {
  const int kind = s.expect < 0 ? SchemaNode::kAny : nodes_[size_t(s.expect)].kind;
  s.ws = 0;
  if (kind == SchemaNode::kLiterals) {
    const std::vector<std::string>& lits = nodes_[size_t(s.expect)].literals;
    s.candidates = 0;
    for (size_t i = 0; i < lits.size(); ++i)
      if (static_cast<unsigned char>(lits[i][0]) == c) s.candidates |= uint64_t(1) << i;
    if (!s.candidates) return false;
    s.lex = kLiteral;
    s.lit_pos = 1;
    return true;
  }
  const bool any = kind == SchemaNode::kAny;
  if (c == '{' && (any || kind == SchemaNode::kObject)) {
    if (s.depth == kMaxDepth) return false;
    s.stack[s.depth++] = Frame{s.expect, 1, kKeyOrEnd, -1, 0};
    s.lex = kStructure;
    return true;
  }
  if (c == '[' && (any || kind == SchemaNode::kArray)) {
    if (s.depth == kMaxDepth) return false;
    s.stack[s.depth++] = Frame{s.expect, 0, kValueOrEnd, -1, 0};
    s.lex = kStructure;
    return true;
  }
  if (c == '"' && (any || kind == SchemaNode::kString)) {
    s.lex = kString;
    s.key_string = false;
    s.esc = 0;
    return true;
  }
  if ((c == '-' || is_digit(c)) && (any || kind == SchemaNode::kNumber || kind == SchemaNode::kInteger)) {
    s.lex = kNumber;
    s.num = c == '-' ? 0 : c == '0' ? 1 : 2;
    return true;
  }
  if (any || kind == SchemaNode::kBoolean || kind == SchemaNode::kNull) {
    const std::vector<std::string>& words = builtin_literals();
    s.candidates = 0;
    for (size_t i = 0; i < words.size(); ++i) {
      const bool fits = any || (kind == SchemaNode::kBoolean ? i < 2 : i == 2);
      if (fits && static_cast<unsigned char>(words[i][0]) == c) s.candidates |= uint64_t(1) << i;
    }
    if (!s.candidates) return false;
    s.lex = kLiteral;
    s.lit_pos = 1;
    return true;
  }
  return false;
}

// A byte between tokens, after a value or a structural character.
bool JsonGrammar::after_value(State& s, unsigned char c) const {
  if (is_space(c)) return ++s.ws <= kMaxWhitespace;
  s.ws = 0;
  if (s.lex == kDone) return false;
  Frame& f = s.stack[s.depth - 1];
  const SchemaNode* node = f.node >= 0 ? &nodes_[size_t(f.node)] : nullptr;
  auto required_given = [&] {
    if (!node) return true;
    for (size_t k = 0; k < node->keys.size(); ++k)
      if (node->required[k] && !(f.seen >> k & 1)) return false;
    return true;
  };
  auto key_possible = [&] {
    if (!node || node->additional) return true;
    return f.seen != (node->keys.size() == 64 ? ~uint64_t(0) : (uint64_t(1) << node->keys.size()) - 1);
  };
  auto close = [&] {
    --s.depth;
    value_done(s);
    return true;
  };
  if (f.object) {
    switch (f.phase) {
      case kKeyOrEnd: case kKey:
        if (c == '}' && f.phase == kKeyOrEnd && required_given()) return close();
        if (c != '"' || !key_possible()) return false;
        s.lex = kString;
        s.key_string = true;
        s.esc = 0;
        s.key_len = 0;
        s.candidates = 0;
        s.repeats = node && node->additional ? f.seen : 0;
        if (node)
          for (size_t k = 0; k < node->keys.size(); ++k)
            if (!(f.seen >> k & 1)) s.candidates |= uint64_t(1) << k;
        return true;
      case kColon:
        if (c != ':') return false;
        f.phase = kObjectValue;
        s.lex = kValue;
        s.expect = f.key >= 0 ? node->children[size_t(f.key)] : -1;
        return true;
      case kCommaOrObjectEnd:
        if (c == '}' && required_given()) return close();
        if (c == ',' && key_possible()) {
          f.phase = kKey;
          return true;
        }
        return false;
      default:
        return false;
    }
  }
  const int items = node ? node->children[0] : -1;
  switch (f.phase) {
    case kValueOrEnd:
      if (c == ']') return close();
      f.phase = kArrayValue;
      s.expect = items;
      return begin_value(s, c);
    case kCommaOrArrayEnd:
      if (c == ']') return close();
      if (c != ',') return false;
      f.phase = kArrayValue;
      s.lex = kValue;
      s.expect = items;
      return true;
    default:
      return false;
  }
}

bool JsonGrammar::step(State& s, unsigned char c) const {
  switch (s.lex) {
    case kValue:
      if (is_space(c)) return ++s.ws <= kMaxWhitespace;
      return begin_value(s, c);
    case kStructure: case kDone:
      return after_value(s, c);
    case kString: {
      if (c < 0x20) return false;
      if (s.esc == 1) {
        if (c == 'u') {
          s.esc = 5;
        } else if (c == '"' || c == '\\' || c == '/' || c == 'b' || c == 'f' || c == 'n' || c == 'r' || c == 't') {
          s.esc = 0;
        } else {
          return false;
        }
      } else if (s.esc >= 2) {
        if (!is_hex(c)) return false;
        if (--s.esc == 1) s.esc = 0;
      } else if (c == '\\') {
        s.esc = 1;
      } else if (c == '"') {   // the string ends
        if (!s.key_string) {
          value_done(s);
          return true;
        }
        Frame& f = s.stack[s.depth - 1];
        f.key = -1;
        if (f.node >= 0) {
          const SchemaNode& n = nodes_[size_t(f.node)];
          for (size_t k = 0; k < n.keys.size(); ++k)
            if ((s.candidates >> k & 1) && n.keys[k].size() == s.key_len) f.key = int16_t(k);
          if (f.key < 0 && !n.additional) return false;
          if (f.key < 0 && exact_repeat(s)) return false;   // a key given twice: its last value would win
        }
        f.phase = kColon;
        s.lex = kStructure;
        s.key_string = false;
        return true;
      }
      if (s.key_string && s.stack[s.depth - 1].node >= 0) {   // the key so far must start a key still possible
        const SchemaNode& n = nodes_[size_t(s.stack[s.depth - 1].node)];
        uint64_t next = 0;
        for (size_t k = 0; k < n.keys.size(); ++k)
          if ((s.candidates >> k & 1) && n.keys[k].size() > s.key_len &&
              static_cast<unsigned char>(n.keys[k][s.key_len]) == c)
            next |= uint64_t(1) << k;
        if (!next && !n.additional) return false;
        s.candidates = next;
        uint64_t repeats = 0;
        for (size_t k = 0; k < n.keys.size(); ++k)
          if ((s.repeats >> k & 1) && n.keys[k].size() > s.key_len &&
              static_cast<unsigned char>(n.keys[k][s.key_len]) == c)
            repeats |= uint64_t(1) << k;
        s.repeats = repeats;
        if (s.key_len < 255) ++s.key_len;
      }
      return true;
    }
    case kNumber: {
      const bool integer = s.expect >= 0 && nodes_[size_t(s.expect)].kind == SchemaNode::kInteger;
      uint8_t next = 255;
      switch (s.num) {
        case 0: next = c == '0' ? 1 : (is_digit(c) ? 2 : 255); break;
        case 1: next = c == '.' ? 3 : (c == 'e' || c == 'E') ? 5 : 255; break;
        case 2: next = is_digit(c) ? 2 : c == '.' ? 3 : (c == 'e' || c == 'E') ? 5 : 255; break;
        case 3: next = is_digit(c) ? 4 : 255; break;
        case 4: next = is_digit(c) ? 4 : (c == 'e' || c == 'E') ? 5 : 255; break;
        case 5: next = (c == '+' || c == '-') ? 6 : is_digit(c) ? 7 : 255; break;
        case 6: case 7: next = is_digit(c) ? 7 : 255; break;
      }
      if (integer && (next == 3 || next == 5)) next = 255;
      if (next != 255) {
        s.num = next;
        return true;
      }
      if (!terminal_number(s.num)) return false;
      value_done(s);   // the number ended: this byte is the next token's
      return after_value(s, c);
    }
    case kLiteral: {
      const std::vector<std::string>& lits =
          s.expect >= 0 && nodes_[size_t(s.expect)].kind == SchemaNode::kLiterals ? nodes_[size_t(s.expect)].literals
                                                                                  : builtin_literals();
      uint64_t next = 0;
      bool done = false;
      for (size_t i = 0; i < lits.size(); ++i) {
        if (!(s.candidates >> i & 1)) continue;
        if (lits[i].size() == s.lit_pos) done = true;
        else if (static_cast<unsigned char>(lits[i][s.lit_pos]) == c) next |= uint64_t(1) << i;
      }
      if (next) {
        s.candidates = next;
        ++s.lit_pos;
        return true;
      }
      if (!done) return false;
      value_done(s);
      return after_value(s, c);
    }
  }
  return false;
}

bool JsonGrammar::feed(State& s, const char* bytes, int64_t n) const {
  for (int64_t i = 0; i < n; ++i)
    if (!step(s, static_cast<unsigned char>(bytes[i]))) return false;
  return true;
}

TokenBytes::TokenBytes(std::vector<std::string> t) : tokens(std::move(t)), plain(tokens.size(), 0) {
  for (size_t i = 0; i < tokens.size(); ++i) {
    bool ok = !tokens[i].empty();
    for (unsigned char c : tokens[i]) ok = ok && c >= 0x20 && c != '"' && c != '\\';
    plain[i] = ok;
  }
}

void JsonGrammar::mask(const State& s, const TokenBytes& vocabulary, uint8_t* allowed, int64_t budget) const {
  const std::vector<std::string>& vocab = vocabulary.tokens;
  // In a value string (not a key, not mid-escape) plain tokens change nothing but the text: all of
  // them fit or none does.
  const bool in_string = s.lex == kString && !s.key_string && s.esc == 0;
  const bool plain_fits = in_string && (budget < 0 || closing_length(s) <= budget);
  bool first[256];
  for (int c = 0; c < 256; ++c) {   // most tokens fail on their first byte: checked once per byte
    State t = s;
    first[c] = step(t, static_cast<unsigned char>(c));
  }
  for (size_t i = 0; i < vocab.size(); ++i) {
    const std::string& bytes = vocab[i];
    allowed[i] = 0;
    if (in_string && vocabulary.plain[i]) {
      allowed[i] = plain_fits;
      continue;
    }
    if (bytes.empty() || !first[static_cast<unsigned char>(bytes[0])]) continue;
    State t = s;
    if (!feed(t, bytes.data(), int64_t(bytes.size()))) continue;
    if (budget >= 0 && closing_length(t) > budget) continue;
    allowed[i] = 1;
  }
}

}  // namespace sampling
}  // namespace pyllm
