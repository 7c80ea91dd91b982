"""The JSON matcher behind constrained decoding (kernels.JsonGrammar, pyllm.constrain) against
Python's json module and jsonschema: what it accepts parses and validates, what parses it accepts,
its closing length is reachable and minimal, and its vocabulary mask is what feeding each token
alone says."""

import json
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyllm import kernels
from pyllm.constrain import SchemaError, compile_schema, json_mask

jsonschema = pytest.importorskip("jsonschema")

ANY_JSON = kernels.JsonGrammar([], 0)
BYTES = kernels.TokenBytes([bytes([b]) for b in range(256)])

PERSON = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}},
    "colour": {"enum": ["red", "green", 3, None]}, "home": {"type": "object", "properties": {
        "city": {"type": "string"}, "zip": {"type": "number"}}, "required": ["city"], "additionalProperties": False},
    "ok": {"type": "boolean"}}, "required": ["name", "age"], "additionalProperties": False}
OPEN = {"type": "object", "properties": {"a": {"type": "integer"}, "ab": {"type": "null"}},
        "required": ["a"], "additionalProperties": True}
SCHEMAS = [PERSON, OPEN, {"type": "array", "items": {"type": "integer"}}, {"const": {"x": [1, 2]}},
           {"type": "string"}, {"type": "object"}]


def accepts(grammar, data: bytes) -> bool:
    state = grammar.start()
    return grammar.feed(state, data) and grammar.complete(state)


def strict_loads(text: str):
    def refuse(name):
        raise ValueError(name)
    return json.loads(text, parse_constant=refuse)


def depth(value) -> int:
    if isinstance(value, dict):
        return 1 + max((depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((depth(v) for v in value), default=0)
    return 0


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=12)


def dumps(value, style: int) -> str:
    if style == 0:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    if style == 1:
        return json.dumps(value, indent=1)
    return json.dumps(value)


@settings(max_examples=300, deadline=None)
@given(json_values, st.integers(0, 2))
def test_every_document_and_every_prefix_is_accepted(value, style):
    data = dumps(value, style).encode()
    if depth(value) > 16:   # the matcher's nesting limit
        return
    state = ANY_JSON.start()
    for i, byte in enumerate(data):
        closing = ANY_JSON.closing_length(state)
        assert closing <= len(data) - i, (data, i)   # the real rest is one completion: the fewest is no longer
        assert ANY_JSON.feed(state, bytes([byte])), (data, i)
    assert ANY_JSON.complete(state)
    assert ANY_JSON.closing_length(state) == 0


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(alphabet='{}[]":,. -+0123456789eE\\untrfalsbx\t\n\u00e9', max_size=24))
def test_accepting_means_parsing_and_parsing_means_accepting(text):
    try:
        value = strict_loads(text)
        parses = True
    except ValueError:
        parses = False
    accepted = accepts(ANY_JSON, text.encode())
    if accepted:
        assert parses, text
    elif parses and not re.search(r"\s{9}", text) and depth(value) <= 16:
        pytest.fail(f"{text!r} parses but was refused")


def close_greedily(grammar, state, pick):
    """Feeds, byte after byte, one the forced mask allows (pick chooses which); returns the bytes."""
    out = bytearray()
    flags = np.zeros(256, np.uint8)
    for _ in range(10_000):
        if grammar.complete(state) and grammar.closing_length(state) == 0:
            return bytes(out)
        before = grammar.closing_length(state)
        grammar.mask(state, BYTES, flags, before - 1)
        choices = np.flatnonzero(flags)
        assert choices.size, (bytes(out), before)
        byte = bytes([int(pick(choices))])
        assert grammar.feed(state, byte)
        assert grammar.closing_length(state) == before - 1   # each forced byte is one nearer the end
        out += byte
    raise AssertionError("no end")


@settings(max_examples=200, deadline=None)
@given(json_values, st.integers(0, 2), st.data())
def test_a_cut_document_closes_in_exactly_its_closing_length(value, style, data):
    text = dumps(value, style).encode()
    cut = data.draw(st.integers(0, len(text)))
    state = ANY_JSON.start()
    assert ANY_JSON.feed(state, text[:cut])
    closing = ANY_JSON.closing_length(state)
    rest = close_greedily(ANY_JSON, state, lambda c: c[data.draw(st.integers(0, c.size - 1))])
    assert len(rest) == closing
    strict_loads((text[:cut] + rest).decode("utf-8", "replace"))


def test_closing_lengths_of_small_prefixes_are_the_fewest_bytes():
    """Breadth-first search over a small alphabet finds no completion shorter than closing_length."""
    alphabet = [bytes([c]) for c in b'{}[]":,0a-1.eru']
    prefixes = [b"", b"{", b'{"', b'{"a":', b"[", b"[1", b"[1,", b"-", b"1.", b"1e", b'{"a":[', b"[[", b'"ab', b"t",
                b'{"a":1', b'[{"', b"[-0.5e"]
    for prefix in prefixes:
        state = ANY_JSON.start()
        assert ANY_JSON.feed(state, prefix), prefix
        frontier, found = [state], None
        for length in range(8):
            if any(ANY_JSON.complete(s) for s in frontier):
                found = length
                break
            nxt = []
            for s in frontier:
                for b in alphabet:
                    t = s.copy()
                    if ANY_JSON.feed(t, b):
                        nxt.append(t)
            frontier = nxt
        assert found == ANY_JSON.closing_length(state), prefix


@pytest.mark.parametrize("schema", SCHEMAS, ids=lambda s: json.dumps(s)[:30])
def test_schema_documents_accepted_validate(schema):
    grammar = kernels.JsonGrammar(compile_schema(schema), 0)
    rng = np.random.default_rng(0)
    flags = np.zeros(256, np.uint8)
    for trial in range(60):   # random walks through the byte mask, closed when long enough
        state, out = grammar.start(), bytearray()
        for _ in range(int(rng.integers(0, 60))):
            grammar.mask(state, BYTES, flags)
            choices = np.flatnonzero(flags)
            if choices.size == 0:
                break
            byte = bytes([int(rng.choice(choices))])
            assert grammar.feed(state, byte)
            out += byte
        out += close_greedily(grammar, state, lambda c: c[int(rng.integers(0, c.size))])
        value = strict_loads(out.decode("utf-8", "replace"))
        jsonschema.validate(value, schema)


@settings(max_examples=200, deadline=None)
@given(st.fixed_dictionaries({"name": st.text(max_size=5), "age": st.integers(-999, 999)}, optional={
    "tags": st.lists(st.text(max_size=3), max_size=3), "colour": st.sampled_from(["red", "green", 3, None]),
    "home": st.fixed_dictionaries({"city": st.text(max_size=3)}, optional={"zip": st.floats(-9, 9)}),
    "ok": st.booleans()}), st.integers(0, 2))
def test_valid_documents_are_accepted(value, style):
    grammar = kernels.JsonGrammar(compile_schema(PERSON), 0)
    assert accepts(grammar, dumps(value, style).encode()), value


@pytest.mark.parametrize("text", [
    b'{"name":"x"}', b'{"age":1}', b'{"name":"x","age":1.5}', b'{"name":"x","age":1,"extra":1}',
    b'{"name":1,"age":1}', b'{"name":"x","age":1,"colour":"blue"}', b'{"name":"x","age":1,"home":{}}',
    b'{"name":"x","age":1,"name":"y"}', b'{"name":"x","age":1,"tags":[1]}', b'[]'])
def test_invalid_documents_are_refused(text):
    assert not accepts(kernels.JsonGrammar(compile_schema(PERSON), 0), text)


def test_extra_keys_are_allowed_but_never_a_given_key_again():
    grammar = kernels.JsonGrammar(compile_schema(OPEN), 0)
    assert accepts(grammar, b'{"a":1,"abc":"x","ab":null}')
    assert accepts(grammar, b'{"b":[1],"a":2}')
    assert not accepts(grammar, b'{"a":1,"a":2}')
    assert not accepts(grammar, b'{"a":1,"ab":null,"ab":1}')
    state = grammar.start()
    assert grammar.feed(state, b'{"a":1,"a')
    assert grammar.closing_length(state) == len(b'x":0}')   # "a" is taken: one more byte, then the rest


def test_the_mask_is_what_feeding_each_token_alone_says():
    vocab = [b"{", b"}", b'{"', b'":', b'"a', b" ", b"  \n", b"1", b"12.", b"e5", b"true", b"tr", b"]", b"[", b",",
             b'"}', b"\\u00", b"\\", b"\xc3\xa9", b"", b"null]", b'{"name":"', b'"age":', b"-"]
    table = kernels.TokenBytes(vocab)
    flags = np.zeros(len(vocab), np.uint8)
    for schema in [None, PERSON, OPEN]:
        grammar = kernels.JsonGrammar(compile_schema(schema), 0)
        for prefix in [b"", b"{", b'{"', b'{"name":"x', b'{"name":"x\\', b'{"name":"x",', b"[1", b'{"a":[', b'{"a":1']:
            state = grammar.start()
            if not grammar.feed(state, prefix):
                continue
            for budget in (-1, 0, 2, grammar.closing_length(state) - 1, 6):
                grammar.mask(state, table, flags, budget)
                for i, token in enumerate(vocab):
                    t = state.copy()
                    ok = bool(token) and grammar.feed(t, token)
                    if budget >= 0 and ok:
                        ok = grammar.closing_length(t) <= budget
                    assert flags[i] == ok, (schema and "schema", prefix, token, budget)


def test_unsupported_schemas_are_refused_by_name():
    for schema, words in [({"type": "string", "pattern": "a+"}, "pattern"), ({"anyOf": [{}]}, "anyOf"),
                          ({"type": "object", "properties": {"a": {"minimum": 1}}}, "properties.a: minimum"),
                          ({"type": "object", "properties": {}, "required": ["x"]}, "'x'"),
                          ({"type": "date"}, "date"), ("string", "must be an object")]:
        with pytest.raises(SchemaError, match=re.escape(words)):
            compile_schema(schema)
    with pytest.raises(ValueError, match="no finite document"):
        kernels.JsonGrammar([(1, [b"a"], [0], [True], False, [])], 0)   # an object that must hold itself


def test_limits_of_the_matcher():
    deep = b"[" * 16 + b"]" * 16
    assert accepts(ANY_JSON, deep)
    assert not accepts(ANY_JSON, b"[" * 17 + b"]" * 17)
    assert accepts(ANY_JSON, b"{" + b" " * 8 + b"}")
    assert not accepts(ANY_JSON, b"{" + b" " * 9 + b"}")   # a model may not stall on blanks
    assert not accepts(ANY_JSON, b'"a\x01"')
    state = ANY_JSON.start()
    assert not ANY_JSON.feed(state, b"[1,]")
    assert ANY_JSON.feed(state, b"[1,")   # a refused feed leaves the state as it was
    with pytest.raises(ValueError):
        kernels.JsonGrammar([(0, [], [5], [], False, [])], 0)
    with pytest.raises(ValueError):
        ANY_JSON.mask(ANY_JSON.start(), BYTES, np.zeros(10, np.uint8))


def test_json_mask_ends_only_a_whole_document_and_closes_before_the_budget():
    """The request-level mask: end tokens only once the document is whole, and a reply with few tokens
    left is steered to its end (here over a byte vocabulary plus an end token)."""

    end = 256
    vocab = kernels.TokenBytes([bytes([b]) for b in range(256)])
    rng = np.random.default_rng(1)
    for trial in range(30):
        budget = int(rng.integers(2, 40))
        mask = json_mask(vocab, {"type": "object"}, 257, [end], budget)
        generated = []
        while len(generated) < budget:
            allowed = mask(generated)
            choices = np.flatnonzero(allowed)
            token = int(rng.choice(choices))
            if token == end:
                break
            generated.append(token)
        value = strict_loads(bytes(generated).decode("utf-8", "replace"))
        assert isinstance(value, dict)
