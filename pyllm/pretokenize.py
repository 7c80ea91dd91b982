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


def split_reference(text: str, pattern: str) -> list[str]:
    """What split() gives, computed by the `regex` package alone: the spec the C++ is tested against.

    >>> split_reference("x  1", "gpt2_digits")
    ['x', '  ', '1']
    """
    if pattern in PIPELINES:
        inner = regex.compile(PATTERNS[PIPELINES[pattern]])
        return [piece for segment in regex.findall(r"\p{N}|\P{N}+", text)
                for piece in ([segment] if regex.fullmatch(r"\p{N}", segment) else inner.findall(segment))]
    return regex.findall(PATTERNS.get(pattern, pattern), text)
