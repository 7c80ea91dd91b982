"""`pyllm.LLM`: a model, its tokenizer and its chat template, speaking text instead of ids.

generate() continues a prompt; chat() formats a conversation with the model's chat template
(Jinja, as Hugging Face and GGUF files carry it; a plain fallback otherwise) and answers it.
Streaming yields text pieces that are always whole characters: bytes of a character split across
tokens are held back until it is complete, and text that may begin a stop string is held back
until it is known not to.
"""

from __future__ import annotations

import codecs
import datetime
import warnings
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import jinja2
import numpy as np
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from pyllm.evaluate import Perplexity, perplexity
from pyllm.explain import Explanation, explain, top_of
from pyllm.generate import SamplingConfig, generate_stream
from pyllm.hub import DEFAULT_MODEL, resolve_model
from pyllm.io.gguf import GGUFFile
from pyllm.io.hf import TOKENIZER
from pyllm.io.tokenizer_files import (END_OF_TEXT_NAMES, ChatFormat, gguf_chat, gguf_tokenizer, read_hf_chat,
                                      write_hf_chat)
from pyllm.model import Model, release
from pyllm.tokenizer import Tokenizer

# Used for models that carry no template (e.g. those `pyllm train` makes): readable turns.
PLAIN_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n"
    "{% else %}Assistant: {{ m['content'] }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
PLAIN_STOPS = ("\nUser:",)
# What chat() and `pyllm chat` penalise repeats by: SmolLM2 at temperature 0 without it answered "What
# is the capital of France?" with one French phrase 40 times over; 1.1 (llama.cpp's long-time default)
# gives "The capital of France is Paris." to the same question asked for one sentence.
CHAT_REPETITION_PENALTY = 1.1

Message = dict


class ContextWindowFull(UserWarning):
    """Generation met the end of the model's context window before max_new_tokens."""


class LLM:
    """Text in, text out: `LLM.load(folder)`, then `generate(prompt)` or `chat(messages)`."""

    def __init__(self, model, tokenizer, chat_template: Optional[str] = None,
                 stop_token_ids: Optional[Sequence[int]] = None, bos_token: str = "") -> None:
        self.model, self.tokenizer = model, tokenizer
        self.chat_template = chat_template
        self.bos_token = bos_token    # what the template writes for {{ bos_token }}
        self.source: Optional[Path] = None   # the folder or file it was loaded from (LLM.load)
        if stop_token_ids is None:
            stop_token_ids = [tokenizer.special_tokens[n] for n in END_OF_TEXT_NAMES if n in tokenizer.special_tokens]
        V = model.config.vocab_size
        if isinstance(stop_token_ids, (int, str)) or \
                any(isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < V for t in stop_token_ids):
            raise ValueError(f"stop_token_ids must be token ids in [0, {V}), got {stop_token_ids!r}")
        self.stop_token_ids = [int(t) for t in stop_token_ids]
        self._template = None

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(cls, source: Union[str, Path] = DEFAULT_MODEL, dequantize: bool = False) -> "LLM":
        """A model with its tokenizer and chat template: a Hugging Face folder (config.json,
        model.safetensors, tokenizer.json, and tokenizer_config.json for the template), such as
        `pyllm train` writes; a .gguf file (dequantize=True: every weight float32, trainable); or the
        alias "smollm2-135m-instruct" (the default)."""
        folder = resolve_model(source)
        if folder.suffix == ".gguf":
            model, tokenizer, chat = _read_gguf(folder, dequantize)
            llm = cls(model, tokenizer, chat.template, _stop_ids(tokenizer, chat.eos_id), chat.bos_token)
            llm.source = folder.resolve()
            return llm
        if folder.is_file():
            raise ValueError(f"{folder}: give a model folder (config.json, model.safetensors, tokenizer.json) "
                             f"or a .gguf file")
        model = Model.from_pretrained(folder)
        if not (folder / TOKENIZER).is_file():
            raise FileNotFoundError(f"{folder}: no {TOKENIZER} beside the model")
        tokenizer = Tokenizer.load(folder / TOKENIZER)
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(f"{folder}: the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                             f"{model.config.vocab_size}")
        chat = read_hf_chat(folder)
        bos = chat.bos_token if chat.bos_token in tokenizer.special_tokens else ""
        eos = tokenizer.special_tokens.get(chat.eos_token) if chat.eos_token else None
        llm = cls(model, tokenizer, chat.template, _stop_ids(tokenizer, eos), bos)
        llm.source = folder.resolve()
        return llm

    # ------------------------------------------------------------------ generation

    def generate(self, prompt: Union[str, Sequence[str]], max_new_tokens: int = 128, temperature: float = 0.8,
                 top_k: Optional[int] = 50, top_p: Optional[float] = None, seed: Optional[int] = None, *,
                 min_p: Optional[float] = None, repetition_penalty: float = 1.0, presence_penalty: float = 0.0,
                 frequency_penalty: float = 0.0, stop: Sequence[str] = (), stream: bool = False,
                 context_shift: bool = False) -> Union[str, list[str], Iterator[str]]:
        """The continuation of prompt (without the prompt); with stream=True, an iterator of pieces; a
        list of prompts gives a list of continuations (each as its own generation, same settings).
        stop: a string or strings that end the text (not shown). At the context window generation
        stops with a ContextWindowFull warning, or with context_shift=True drops the older half of
        the text after the prompt's first tokens and goes on, as llama.cpp's context shift does."""
        if isinstance(prompt, (list, tuple)) and not stream:
            return [self.generate(p, max_new_tokens, temperature, top_k, top_p, seed, min_p=min_p,
                                  repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                                  frequency_penalty=frequency_penalty, stop=stop, context_shift=context_shift)
                    for p in prompt]
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str (or, without stream, a list of them), got {type(prompt).__name__}")
        return self._generate_ids(self.encode_prompt(prompt), max_new_tokens, temperature, top_k, top_p, seed,
                                  min_p=min_p, repetition_penalty=repetition_penalty,
                                  presence_penalty=presence_penalty, frequency_penalty=frequency_penalty, stop=stop,
                                  stream=stream, context_shift=context_shift)

    def _generate_ids(self, ids: list[int], max_new_tokens: int = 128, temperature: float = 0.8,
                      top_k: Optional[int] = 50, top_p: Optional[float] = None, seed: Optional[int] = None, *,
                      min_p: Optional[float] = None, repetition_penalty: float = 1.0, presence_penalty: float = 0.0,
                      frequency_penalty: float = 0.0, stop: Union[str, Sequence[str]] = (), stream: bool = False,
                      context_shift: bool = False) -> Union[str, Iterator[str]]:
        if not ids:
            raise ValueError("the prompt is empty: give some text to continue")
        sampling = SamplingConfig(temperature, top_k, top_p, min_p, repetition_penalty, presence_penalty,
                                  frequency_penalty)
        pieces = self._stream(ids, max_new_tokens, sampling, seed, _stop_strings(stop), context_shift)
        return pieces if stream else "".join(pieces)

    def encode_prompt(self, text: str) -> list[int]:
        """The ids a prompt is fed as: special tokens spelled in it as theirs, and the begin token
        first when the model's files ask for one (as llama.cpp adds it) and the text lacks it."""
        return self._with_bos(self.tokenizer.encode(text, allowed_special="all"))

    def _with_bos(self, ids: list[int]) -> list[int]:
        bos = self.tokenizer.special_tokens.get(self.bos_token) if self.bos_token else None
        if bos is not None and ids and ids[0] != bos:
            ids.insert(0, bos)
        return ids

    def encode_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[int]:
        """The ids of a conversation in the chat template: the template's own special tokens as
        theirs, and text in a message that spells one as plain text, so no message can close its
        turn or open another. Which is which: the template rendered again with each message's
        special tokens masked by same-length filler; a token there in both renderings is the
        template's."""
        text = self.apply_chat_template(messages, add_generation_prompt)
        tok = self.tokenizer
        spans = tok.special_spans(text)
        if not spans:
            return self._with_bos(tok.encode_ordinary(text))
        masked = [{k: _mask_specials(tok, v) if isinstance(v, str) and k != "role" else v for k, v in m.items()}
                  for m in messages]
        shadow = self.apply_chat_template(masked, add_generation_prompt)
        if len(shadow) != len(text):   # the template changed a message's length: keep them apart by refusing
            spelled = sorted({name for m in messages for k, v in m.items() if k != "role" and isinstance(v, str)
                              for _, _, name in tok.special_spans(v)})
            if spelled:
                raise ValueError(f"a message spells the special token(s) {spelled}, which this chat template "
                                 f"cannot keep apart from its own")
            shadow = text
        ids: list[int] = []
        at = 0
        for start, end, name in spans:
            if shadow[start:end] != name:
                continue   # a message's text: encoded as text with what surrounds it
            ids += tok.encode_ordinary(text[at:start]) if start > at else []
            ids.append(tok.special_tokens[name])
            at = end
        ids += tok.encode_ordinary(text[at:]) if at < len(text) else []
        return self._with_bos(ids)

    def _stream(self, ids: list[int], max_new_tokens: int, sampling: SamplingConfig, seed: Optional[int],
                stop: list[str], context_shift: bool = False) -> Iterator[str]:
        text = TextStream(self.tokenizer, stop)
        window, made, shifts = self.context_window, 0, 0
        context = list(ids)
        while True:
            ended = False
            for tokens in generate_stream(self.model, context, max_new_tokens - made, sampling, self.stop_token_ids,
                                          None if seed is None else seed + shifts):
                token = int(tokens[0])
                made += 1
                if token in self.stop_token_ids:
                    ended = True
                    break
                context.append(token)
                piece = text.push(token)
                if piece:
                    yield piece
                if text.stopped:
                    return
            if ended or made >= max_new_tokens or len(context) < window - 1:
                break
            if not context_shift:   # the window is full: say so rather than stop without a word
                warnings.warn(ContextWindowFull(f"generation reached the {window}-token context window after "
                                                f"{made} of {max_new_tokens} new tokens and stopped (pass "
                                                f"context_shift=True, or --context-shift, to drop the oldest text "
                                                f"and go on)"), stacklevel=3)
                break
            keep = min(len(ids), window // 4)                # the prompt's start (a system prompt, a BOS)
            drop = (len(context) - keep) // 2
            context = context[:keep] + context[keep + drop:]
            shifts += 1
        piece = text.finish()
        if piece:
            yield piece

    # ------------------------------------------------------------------ chat

    def apply_chat_template(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """The conversation as the text the model was trained to continue."""
        _check_messages(messages)
        if self._template is None:
            def raise_exception(message):
                raise ValueError(f"chat template: {message}")

            def strftime_now(fmt):
                return datetime.datetime.now().strftime(fmt)

            # As Hugging Face renders templates: a sandbox, loop controls, missing names undefined.
            env = _BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
            env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
            try:
                self._template = env.from_string(self.chat_template or PLAIN_TEMPLATE)
            except jinja2.TemplateError as exc:
                raise ValueError(f"the model's chat template does not parse: {exc}") from None
        names = {v: k for k, v in self.tokenizer.special_tokens.items()}
        eos = names.get(self.stop_token_ids[0], "") if self.stop_token_ids else ""
        try:
            return self._template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token, eos_token=eos, tools=None, documents=None)
        except (jinja2.TemplateError, OverflowError, MemoryError, RecursionError) as exc:
            raise ValueError(f"the model's chat template failed: {type(exc).__name__}: {exc}") from None

    def chat(self, messages: Sequence[Message], max_new_tokens: int = 256, stream: bool = False, **options
             ) -> Union[str, Iterator[str]]:
        """The assistant's answer to a conversation (a list of {"role", "content"} dicts): it ends at
        the model's end-of-turn token, or after max_new_tokens. Options as generate's; the repetition
        penalty defaults to CHAT_REPETITION_PENALTY (small models otherwise loop on a phrase)."""
        options.setdefault("repetition_penalty", CHAT_REPETITION_PENALTY)
        ids = self.encode_chat(messages)
        stop = _stop_strings(options.pop("stop", ())) + (list(PLAIN_STOPS) if self.chat_template is None else [])
        reply = self._generate_ids(ids, max_new_tokens, stop=stop, stream=True, **options)
        if stream:
            return reply
        return "".join(reply).strip()

    def explain(self, prompt: str, top_k: int = 10, temperature: float = 1.0, *, generate: int = 0,
                sample_top_k: Optional[int] = None, top_p: Optional[float] = None, min_p: Optional[float] = None,
                repetition_penalty: float = 1.0, seed: Optional[int] = None, lens_k: int = 5,
                attention: bool = True) -> Explanation:
        """How the model decides what follows `prompt`: its tokens, the next-token distribution
        (the `top_k` likeliest listed), every layer's attention weights, the logit lens and, with
        generate=N, a trace of N sampled tokens (temperature, sample_top_k, top_p, min_p, penalties
        and seed as in generate). `.table()` prints it, `.to_html(path)` draws it."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        sampling = SamplingConfig(temperature, sample_top_k, top_p, min_p, repetition_penalty)
        name = self.source.name if self.source is not None else repr(self.model)
        return explain(self.model, self.tokenizer, self.encode_prompt(prompt), prompt, top_k, sampling, generate, seed,
                       self.stop_token_ids, lens_k, attention, name)

    def perplexity(self, text: str, context: Optional[int] = None, progress: bool = False) -> Perplexity:
        """The model's perplexity on a text (pyllm.evaluate: llama-perplexity's windows of `context`
        tokens, default the model's window up to 1024); the begin token first when the files ask for it."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = self._with_bos(self.tokenizer.encode(text, disallowed_special=()))   # a special token spelled: text
        return perplexity(self.model, ids, context, progress=progress)

    def count_tokens(self, messages: Sequence[Message]) -> int:
        return len(self.encode_chat(messages))

    @property
    def context_window(self) -> int:
        return self.model.config.block_size

    def save(self, folder: Union[str, Path]) -> None:
        """The model folder, plus tokenizer_config.json with the chat template and end token."""
        self.model.save_pretrained(folder, tokenizer=self.tokenizer)
        names = {v: k for k, v in self.tokenizer.special_tokens.items()}
        write_hf_chat(folder, ChatFormat(self.chat_template,
                                         names.get(self.stop_token_ids[0]) if self.stop_token_ids else None,
                                         self.bos_token))

    def save_gguf(self, path: Union[str, Path], type: str = "f16", progress: bool = True) -> None:
        """A GGUF file llama.cpp and Ollama load: the model (matrices as `type`: f32, f16, q8_0, q4_0,
        q4_1, q4_k), its tokenizer, chat template, end-of-turn and begin tokens. An attached LoRA adapter
        is merged into the written weights."""
        bos = self.tokenizer.special_tokens.get(self.bos_token) if self.bos_token else None
        model = self.model
        if model.lora is not None:   # a float copy with the adapters added in; the live model unchanged
            merged = model.__class__(model.config, seed=None)
            merged.load_state_dict(model.state_dict())
            model.lora.merge_into(merged)
            model = merged
        model.save_gguf(path, type, self.tokenizer, self.chat_template,
                        self.stop_token_ids[0] if self.stop_token_ids else None, bos, progress)


def load_gguf(path, dequantize: bool = False) -> tuple:
    """(Model, Tokenizer, chat template or None, end-of-turn token id or None) from a GGUF file.

    Quantized matrices (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q6_K) stay quantized (inference only, a
    fraction of the memory) unless dequantize=True, which gives a float32 model that can be trained.
    """
    model, tokenizer, chat = _read_gguf(path, dequantize)
    return model, tokenizer, chat.template, chat.eos_id


def _read_gguf(path, dequantize: bool) -> tuple:
    """The model, tokenizer and chat format of a GGUF file, its header parsed once."""
    f = GGUFFile(path)
    model = None
    try:
        model = Model.from_gguf(f, dequantize)
        data = gguf_tokenizer(f)
        return model, Tokenizer(**vars(data)), gguf_chat(f, data)
    except BaseException:
        model = None     # nothing the caller keeps: the file is closed
        raise
    finally:
        release(f, model)


def _stop_ids(tokenizer: Tokenizer, eos: Optional[int]) -> Optional[list[int]]:
    """What ends generation: the file's end token, then the end-of-text and end-of-turn tokens the
    vocabulary has (Gemma's files name <eos>, its turns end with <end_of_turn>); None for none."""
    ids = [] if eos is None else [int(eos)]
    ids += [tokenizer.special_tokens[n] for n in END_OF_TEXT_NAMES if n in tokenizer.special_tokens]
    return list(dict.fromkeys(ids)) or None


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """Hugging Face's template sandbox, with its arithmetic bounded: no string or list a product or
    a sum makes grows past MAX_ITEMS, no power past MAX_BITS (a template from a file cannot hang or
    exhaust memory; Jinja's documented way, intercepted_binops)."""

    MAX_ITEMS, MAX_BITS = 1 << 22, 1 << 16
    intercepted_binops = frozenset({"*", "**", "+"})

    def call_binop(self, context, operator, left, right):
        if operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0 and \
                max(1, abs(left).bit_length()) * right > self.MAX_BITS:
            raise SecurityError(f"the power {left} ** {right} is too large")
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > self.MAX_ITEMS:
                    raise SecurityError(f"repeating {len(seq)} items {n} times is too large")
        if operator == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)) and \
                len(left) + len(right) > self.MAX_ITEMS:
            raise SecurityError("a concatenation grows too large")
        return super().call_binop(context, operator, left, right)


def _stop_strings(stop) -> list[str]:
    """stop as a list of non-empty strings (one string is one stop, not its characters)."""
    if stop is None:
        return []
    if not isinstance(stop, (str, list, tuple)):
        raise ValueError(f"stop must be a non-empty string or a list of them, got {stop!r}")
    stops = [stop] if isinstance(stop, str) else list(stop)
    for s in stops:
        if not isinstance(s, str) or not s:
            raise ValueError(f"stop must be a non-empty string or a list of them, got {stop!r}")
    return stops


def _mask_specials(tok: Tokenizer, text: str) -> str:
    """text with each special token it spells replaced by as many private-use characters."""
    for start, end, _ in reversed(tok.special_spans(text)):
        text = text[:start] + "\ue000" * (end - start) + text[end:]
    return text


def _check_messages(messages) -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) \
                or m.get("role") not in ("system", "user", "assistant"):
            raise ValueError(f"message {i} must be a dict with role system/user/assistant and str content, "
                             f"got {m!r}")


class TextStream:
    """Generated tokens in, text out in pieces that are always whole characters (the bytes of a
    character split across tokens wait for the rest) and never show a stop string, even in part
    (text that may begin one waits until it is known not to). After a stop string, `stopped` is
    set and nothing more comes out."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.stopped = False
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""    # decoded text not yet given out: it may be the start of a stop string

    def push(self, token: int) -> str:
        """The text that token makes safe to show (possibly empty)."""
        if self.stopped or token >= self.tokenizer.vocab_size:   # a padded embedding row: no text
            return ""
        self._pending += self._decoder.decode(self.tokenizer.decode_bytes([int(token)]))
        cut = _first_stop(self._pending, self.stop)
        if cut is not None:
            self.stopped = True
            out, self._pending = self._pending[:cut], ""
            return out
        keep = _stop_prefix_length(self._pending, self.stop)
        out = self._pending[:len(self._pending) - keep]
        self._pending = self._pending[len(self._pending) - keep:]
        return out

    def finish(self) -> str:
        """What is left once generation has ended (a held-back start of a stop string that never
        completed, an unfinished character as U+FFFD)."""
        if self.stopped:
            return ""
        text = self._pending + self._decoder.decode(b"", final=True)
        self._pending = ""
        cut = _first_stop(text, self.stop)
        if cut is not None:
            self.stopped = True
            return text[:cut]
        return text


def _first_stop(text: str, stops: Sequence[str]) -> Optional[int]:
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None


def _stop_prefix_length(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of text that is a proper beginning of a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


def top_probabilities(probs: np.ndarray, tokenizer, k: int = 5) -> list[tuple[str, float]]:
    """The k most likely next tokens as (readable piece, probability)."""
    return [(text, p) for _, text, p in top_of(probs, tokenizer, k)]
