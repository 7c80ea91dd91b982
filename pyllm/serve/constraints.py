"""Constrained sampling for response_format (JSON): placeholder until the C++ mask lands."""

from __future__ import annotations

from pyllm.serve.protocol import ApiError


def json_constraint(tokenizer, response_format, stop_token_ids):
    raise ApiError(400, "response_format: JSON output is not available yet", "response_format", "unsupported")
