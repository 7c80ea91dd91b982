"""The OpenAI request bodies, checked field by field: every wrong name, type or range becomes an
ApiError naming the field (a 400 in OpenAI's error shape), never a stack trace.

Not the routes (app.py) nor generation (pyllm.engine): this turns JSON into settings and back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             413: "invalid_request_error", 429: "rate_limit_error", 503: "server_error"}

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


def _bad(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}", param, "invalid_value")


class Fields:
    """Typed reads of a request body (a dict), each checked, the unread names refused at the end."""

    def __init__(self, body: Any, known_extra: tuple = ()) -> None:
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object", None, "invalid_json")
        self.body, self.read = body, set(known_extra)

    def _get(self, name: str):
        self.read.add(name)
        return self.body.get(name)

    def number(self, name: str, default, low: float, high: float, integer: bool = False):
        value = self._get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
            raise _bad(name, f"must be {'an integer' if integer else 'a number'}, got {value!r}")
        if not (math.isfinite(value) and low <= value <= high):
            raise _bad(name, f"must lie in [{low}, {high}], got {value!r}")
        return value

    def boolean(self, name: str, default: bool) -> bool:
        value = self._get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise _bad(name, f"must be true or false, got {value!r}")
        return value

    def string(self, name: str, default: Optional[str] = None, required: bool = False) -> Optional[str]:
        value = self._get(name)
        if value is None:
            if required:
                raise ApiError(400, f"{name}: is required", name, "missing")
            return default
        if not isinstance(value, str):
            raise _bad(name, f"must be a string, got {type(value).__name__}")
        return value

    def stop(self) -> list:
        value = self._get("stop")
        if value is None:
            return []
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list) or len(values) > 4 or not all(isinstance(s, str) and s for s in values):
            raise _bad("stop", "must be a non-empty string or a list of at most 4 of them")
        return values

    def raw(self, name: str):
        return self._get(name)

    def done(self) -> None:
        unknown = sorted(set(self.body) - self.read)
        if unknown:
            raise ApiError(400, f"unknown field{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)}",
                           unknown[0], "unknown_field")


# Fields OpenAI's clients send that change nothing here (accepted, ignored).
IGNORED = ("user", "metadata", "store", "parallel_tool_calls", "service_tier", "logit_bias_ignored")


@dataclass
class Generation:
    """What a completion request asks for, checked."""

    max_tokens: Optional[int]
    temperature: float
    top_p: Optional[float]
    top_k: Optional[int]
    min_p: Optional[float]
    seed: Optional[int]
    stop: list
    presence_penalty: float
    frequency_penalty: float
    repetition_penalty: float
    stream: bool
    include_usage: bool
    logprobs: Optional[int]         # None: off; k: the chosen token's and k alternatives
    response_format: Optional[dict] = None
    extra: dict = field(default_factory=dict)


def generation(f: Fields, chat: bool) -> Generation:
    """The sampling and streaming fields shared by /v1/chat/completions and /v1/completions."""
    n = f.number("n", 1, 1, 1, integer=True)   # one choice per request
    del n
    max_tokens = f.number("max_tokens", None, 1, 1 << 20, integer=True)
    if chat:
        max_tokens = f.number("max_completion_tokens", max_tokens, 1, 1 << 20, integer=True)
    elif max_tokens is None:
        max_tokens = 16   # OpenAI's default for completions
    temperature = f.number("temperature", 1.0, 0.0, 2.0)
    top_p = f.number("top_p", None, 0.0, 1.0)
    if top_p is not None and top_p <= 0.0:
        raise _bad("top_p", "must be above 0")
    top_k = f.number("top_k", None, 0, 1 << 20, integer=True) or None
    min_p = f.number("min_p", None, 0.0, 1.0) or None
    seed = f.number("seed", None, -(1 << 63), (1 << 64) - 1, integer=True)
    stop = f.stop()
    presence = f.number("presence_penalty", 0.0, -2.0, 2.0)
    frequency = f.number("frequency_penalty", 0.0, -2.0, 2.0)
    repetition = f.number("repetition_penalty", 1.0, 0.01, 10.0)
    stream = f.boolean("stream", False)
    options = f.raw("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise _bad("stream_options", "is only allowed with stream: true")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise _bad("stream_options", "must be an object with include_usage")
        include_usage = bool(options.get("include_usage", False))
    if chat:
        wanted = f.boolean("logprobs", False)
        top = f.number("top_logprobs", None, 0, 20, integer=True)
        if top is not None and not wanted:
            raise _bad("top_logprobs", "needs logprobs: true")
        logprobs = (top or 0) if wanted else None
    else:
        logprobs = f.number("logprobs", None, 0, 5, integer=True)
    response_format = f.raw("response_format")
    if response_format is not None:
        if not isinstance(response_format, dict) or response_format.get("type") not in ("text", "json_object",
                                                                                          "json_schema"):
            raise _bad("response_format", "must be {\"type\": \"text\" | \"json_object\" | \"json_schema\", ...}")
        if response_format["type"] == "text":
            response_format = None
        elif response_format["type"] == "json_schema":
            spec = response_format.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
                raise _bad("response_format", "json_schema needs {\"name\": ..., \"schema\": {...}}")
    for name in IGNORED:
        f.raw(name)
    return Generation(max_tokens, temperature, top_p, top_k, min_p, seed, stop, presence, frequency, repetition,
                      stream, include_usage, logprobs, response_format)


def messages(value) -> list:
    """The chat messages, as the chat template takes them: role and text content."""
    if not isinstance(value, list) or not value:
        raise _bad("messages", "must be a non-empty list of {\"role\", \"content\"} objects")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise _bad(f"messages[{i}]", "must be an object with role system, developer, user or assistant")
        content = m.get("content")
        if isinstance(content, list):   # content parts: the text ones, joined
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise _bad(f"messages[{i}].content", "only text parts are supported")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise _bad(f"messages[{i}].content", "must be a string or a list of text parts")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    return out
