"""Constrained decoding: generated text that always parses as JSON, and fits a JSON schema when one
is given, by masking at each step the tokens that could not continue a valid document.

The matcher and the mask are C++ (kernels.JsonGrammar, over the vocabulary's bytes); this module
compiles a schema into the matcher's nodes and keeps one request's state. A token is allowed only
when the tokens left after it could still close the document, one byte each (byte-level vocabularies
have a token for every byte), so a reply cut by max_tokens still parses. When max_tokens is below the
shortest document counted that way, each token must bring the end nearer (multi-byte tokens may
still make it fit).

The schema subset: type (object, array, string, number, integer, boolean, null), properties,
required, additionalProperties (true or false; without properties any key), items, enum, const,
and annotations (title, description, default, examples, ...). Keywords that constrain values in
other ways (pattern, minimum, minItems, anyOf, $ref, ...) are refused with SchemaError rather than
silently not enforced. Not a validator of whole documents: use jsonschema for that.
"""

from __future__ import annotations

import json
from typing import Optional, Sequence

import numpy as np

from pyllm import kernels

ANY, OBJECT, ARRAY, STRING, NUMBER, INTEGER, BOOLEAN, NULL, LITERALS = range(9)   # json_grammar.h's kinds
KINDS = {"object": OBJECT, "array": ARRAY, "string": STRING, "number": NUMBER, "integer": INTEGER,
         "boolean": BOOLEAN, "null": NULL}
ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$id", "$comment", "readOnly",
               "writeOnly", "deprecated", "strict"}
ENFORCED = {"type", "properties", "required", "additionalProperties", "items", "enum", "const"}


class SchemaError(ValueError):
    """A schema outside the subset this module enforces (the message says where)."""


def compile_schema(schema) -> list:
    """The matcher's nodes for a schema (node 0 is the document); [] for any JSON."""
    nodes: list = []

    def literal(value) -> bytes:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()

    def visit(s, where: str) -> int:
        index = len(nodes)
        nodes.append(None)
        if s is True or s == {}:
            nodes[index] = (ANY, [], [], [], False, [])
            return index
        if not isinstance(s, dict):
            raise SchemaError(f"{where}: a schema must be an object, got {s!r}")
        unknown = sorted(set(s) - ENFORCED - ANNOTATIONS)
        if unknown:
            raise SchemaError(f"{where}: {', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not supported "
                              f"(supported: {', '.join(sorted(ENFORCED))})")
        if "enum" in s or "const" in s:
            values = s["enum"] if "enum" in s else [s["const"]]
            if not isinstance(values, list) or not values:
                raise SchemaError(f"{where}: enum must be a non-empty list")
            nodes[index] = (LITERALS, [], [], [], False, list(dict.fromkeys(literal(v) for v in values)))
            return index
        kind = s.get("type")
        if isinstance(kind, list):
            if len(kind) != 1:
                raise SchemaError(f"{where}: a list of types is not supported")
            kind = kind[0]
        if kind is None:
            kind = "object" if "properties" in s else "array" if "items" in s else None
        if kind is None:
            nodes[index] = (ANY, [], [], [], False, [])
            return index
        if kind not in KINDS:
            raise SchemaError(f"{where}: unknown type {kind!r}")
        if kind == "object":
            properties = s.get("properties", {})
            required = s.get("required", [])
            extra = s.get("additionalProperties", not properties)
            if not isinstance(properties, dict) or not isinstance(required, list):
                raise SchemaError(f"{where}: properties must be an object and required a list")
            missing = [k for k in required if k not in properties]
            if missing:
                raise SchemaError(f"{where}: required names {missing[0]!r}, which is not among the properties")
            if extra == {}:
                extra = True
            if not isinstance(extra, bool):
                raise SchemaError(f"{where}: additionalProperties must be true or false")
            keys = list(properties)
            children = [visit(properties[k], f"{where}.properties.{k}") for k in keys]
            nodes[index] = (OBJECT, [json.dumps(k, ensure_ascii=False)[1:-1].encode() for k in keys], children,
                            [k in required for k in keys], extra, [])
        elif kind == "array":
            nodes[index] = (ARRAY, [], [visit(s.get("items", {}), f"{where}.items")], [], False, [])
        else:
            nodes[index] = (KINDS[kind], [], [], [], False, [])
        return index

    if schema is None or schema is True or schema == {}:
        return []
    visit(schema, "schema")
    return nodes


def vocabulary_bytes(tokenizer) -> "kernels.TokenBytes":
    """Each token's bytes (special tokens: none, so never allowed inside a document)."""
    special = set(tokenizer.special_tokens.values())
    return kernels.TokenBytes([b"" if t in special else tokenizer.decode_bytes([t])
                               for t in range(tokenizer.vocab_size)])


class JsonConstraint:
    """The engine's TokenMask for one request: called with the tokens generated so far, it returns
    the tokens allowed next (the end tokens only once the document is complete)."""

    def __init__(self, grammar: "kernels.JsonGrammar", vocab: "kernels.TokenBytes", vocab_size: int,
                 end_ids: Sequence[int], max_new_tokens: int) -> None:
        self.grammar, self.vocab, self.vocab_size = grammar, vocab, vocab_size
        self.end_ids = [int(t) for t in end_ids if 0 <= int(t) < vocab_size]
        self.max_new_tokens = int(max_new_tokens)
        self.state = grammar.start()
        self.fed = 0
        self._flags = np.zeros(len(vocab), np.uint8)

    def __call__(self, generated: Sequence[int]) -> Optional[np.ndarray]:
        for token in generated[self.fed:]:
            if int(token) not in self.end_ids and int(token) < len(self.vocab):   # ids past it: padding
                self.grammar.feed(self.state, self.vocab[int(token)])
        self.fed = len(generated)
        complete = self.grammar.complete(self.state)
        allowed = np.zeros(self.vocab_size, bool)
        if self.grammar.ended(self.state) and self.end_ids:   # the document is whole: end it
            allowed[self.end_ids] = True
            return allowed
        left = self.max_new_tokens - len(generated)
        closing = self.grammar.closing_length(self.state)
        # Tokens after which the rest can still close; failing those (max_tokens below the shortest
        # document, counted a byte a token), tokens that bring the end nearer; failing those, any.
        for budget in (max(left - 1, 0), closing - 1, -1):
            self.grammar.mask(self.state, self.vocab, self._flags, budget)
            if self._flags.any():
                break
        allowed[:len(self._flags)] = self._flags.view(bool)
        if complete:
            allowed[self.end_ids] = True
        if not allowed.any():   # nothing can continue (a schema the budget cannot fit): stop
            allowed[self.end_ids or [0]] = True
        return allowed


def json_mask(vocab: "kernels.TokenBytes", schema, vocab_size: int, end_ids: Sequence[int],
              max_new_tokens: int) -> JsonConstraint:
    """The mask for one request whose output must be JSON (schema None: any JSON document), over the
    vocabulary's bytes (vocabulary_bytes)."""
    return JsonConstraint(kernels.JsonGrammar(compile_schema(schema), 0), vocab, vocab_size, end_ids, max_new_tokens)
