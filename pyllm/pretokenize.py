"""pyllm.pretokenize: splits text into the pieces that BPE encodes one by one.

The built-in patterns run in C++ (csrc/tokenizer/pretokenize.cpp), piece for piece what the `regex`
package gives; a pattern of your own runs in `regex`. Not BPE itself (pyllm.tokenizer).
"""

from __future__ import annotations

import regex

from pyllm import kernels

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# cl100k_base's pat_str as tiktoken (0.12 and later) ships it.
GPT4_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
                r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
PATTERNS = {"gpt2": GPT2_PATTERN, "gpt4": GPT4_PATTERN}
# "gpt2_digits": every digit is a piece of its own, and the GPT-2 pattern splits the text between
# digits (SmolLM2's Digits + ByteLevel pre-tokenizer; llama.cpp's "smollm"). Not one regex:
# "x  1" gives ['x', '  ', '1'] here, while a single pattern would split the spaces.
PIPELINES = {"gpt2_digits": "gpt2"}
BUILTIN = ("gpt2", "gpt4", "gpt2_digits")


def split(text: str, pattern: str = "gpt4") -> list[str]:
    """The pieces of text: a built-in pattern name (see BUILTIN) or a regex of your own.

    >>> split("Hello world 12345")
    ['Hello', ' world', ' ', '123', '45']
    >>> split("Hello world 12345", "gpt2")
    ['Hello', ' world', ' 12345']
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if pattern in BUILTIN:
        return kernels.pretokenize(text, pattern)
    return split_reference(text, pattern)


def check_pattern(pattern) -> None:
    """A split pattern: a built-in name (BUILTIN, or "spm"), or a regex of your own that compiles
    and has no capturing group (findall would then return the groups, not the pieces)."""
    if not isinstance(pattern, str):
        raise TypeError(f"a split pattern is a str (a built-in name or a regex), got {type(pattern).__name__}")
    if pattern in BUILTIN or pattern in PATTERNS or pattern == "spm":
        return
    try:
        compiled = regex.compile(pattern)
    except regex.error as exc:
        raise ValueError(f"the split pattern {pattern!r} is not a valid regex: {exc}") from None
    if compiled.groups:
        raise ValueError(f"the split pattern {pattern!r} has capturing groups: write them (?:...)")


def _findall(pattern: str, text: str) -> list[str]:
    """regex.findall with a time limit (a second plus a microsecond a character): a pattern of
    your own that backtracks without end on some text is refused, not waited for."""
    try:
        return regex.findall(pattern, text, timeout=1.0 + 1e-6 * len(text))
    except TimeoutError:
        raise ValueError(f"the split pattern {pattern!r} took too long on a text of {len(text)} characters "
                         f"(it backtracks without bound: make its repetitions possessive or atomic)") from None


def split_reference(text: str, pattern: str) -> list[str]:
    """What split() gives, computed by the `regex` package alone: the spec the C++ is tested against.

    >>> split_reference("x  1", "gpt2_digits")
    ['x', '  ', '1']
    """
    if pattern in PIPELINES:
        inner = PATTERNS[PIPELINES[pattern]]
        return [piece for segment in regex.findall(r"\p{N}|\P{N}+", text)
                for piece in ([segment] if regex.fullmatch(r"\p{N}", segment) else _findall(inner, segment))]
    return _findall(PATTERNS.get(pattern, pattern), text)
