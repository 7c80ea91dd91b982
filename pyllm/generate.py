"""Text generation: the model gives a probability for every next token, one is sampled, appended,
and the step repeats.

One prefill pass fills the KV cache for every prompt at once (prompts of different lengths
right-padded, each row's logits taken at its own last token); each later step computes only the
new position of every row. Sampling (penalties, temperature, top-k, top-p, min-p, a seeded draw)
runs in C++ (`pyllm.kernels.sample`, twin `pyllm.reference.sample`); the history the penalties
read is one padded array, appended in place. Not the model (pyllm.models) nor text (pyllm.llm).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence, Union

import numpy as np

from pyllm import kernels
from pyllm.models import KVCache


@dataclass
class SamplingConfig:
    """How the next token is chosen; the defaults sample from the plain softmax."""

    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    min_p: Optional[float] = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def __post_init__(self) -> None:
        # The same checks the kernel applies, at construction, so a bad flag fails before any work.
        kernels._sampling_args(np.zeros(1, np.float32), self.temperature, self.top_k, self.top_p, self.min_p,
                               self.repetition_penalty, None, 0)

    @property
    def uses_history(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def sample(self, logits: np.ndarray, history, seeds: np.ndarray, step: int, return_probs: bool = False):
        history = history if self.uses_history else None   # converting it costs time every step
        return kernels.sample(logits, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                              min_p=self.min_p, repetition_penalty=self.repetition_penalty,
                              presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                              history=history, seed=seeds, step=step, return_probs=return_probs)


Prompt = Union[Sequence[int], np.ndarray]


def _prompts(model, ids) -> tuple[list[np.ndarray], bool]:
    """The prompts as 1-D int64 arrays, and whether a single prompt was given."""
    if isinstance(ids, (str, bytes)) or not isinstance(ids, (Sequence, np.ndarray)):
        raise TypeError(f"ids must be a sequence of token ids, a list of them, or a (B, T) array; "
                        f"got {type(ids).__name__}")
    if isinstance(ids, np.ndarray) and ids.ndim == 2:
        prompts, single = [row for row in ids], False
    elif isinstance(ids, np.ndarray) and ids.ndim != 1:
        raise ValueError(f"ids must be (T,) or (B, T), got an array shaped {ids.shape}")
    elif len(ids) and not np.isscalar(ids[0]):
        prompts, single = [np.asarray(p) for p in ids], False
        if any(p.ndim != 1 for p in prompts):
            raise ValueError("each prompt must be a flat sequence of token ids")
    else:
        prompts, single = [np.asarray(ids)], True
    V, block = model.config.vocab_size, model.config.block_size
    out = []
    for i, p in enumerate(prompts):
        if p.size == 0:
            raise ValueError("the prompt is empty: generation needs at least one token to continue")
        if p.dtype.kind not in "iu":
            raise ValueError(f"prompt ids must be integers, got {p.dtype}")
        if p.min() < 0 or p.max() >= V:
            raise ValueError(f"prompt {i} holds ids outside [0, {V})")
        if p.size >= block:
            raise ValueError(f"prompt {i} has {p.size} tokens; the context window is {block} "
                             f"(the prompt must leave room for at least one new token)")
        out.append(p.astype(np.int64))
    return out, single


def _token_ids(ids, vocab_size: int, what: str) -> list[int]:
    """A sequence of ids in [0, vocab_size) as ints (one int is refused: pass [id])."""
    if isinstance(ids, (int, np.integer, str, bytes)) or not isinstance(ids, (Sequence, np.ndarray, set, frozenset)):
        raise TypeError(f"{what} must be a sequence of token ids, got {ids!r}")
    out = []
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < vocab_size:
            raise ValueError(f"{what} must hold token ids in [0, {vocab_size}), got {t!r}")
        out.append(int(t))
    return out


def seeds_for(seed: Optional[int], batch: int) -> np.ndarray:
    """One 64-bit seed per sequence, derived from `seed` (fresh entropy when None)."""
    return np.random.SeedSequence(seed).generate_state(batch, np.uint64)


def prefill(model, prompts: list[np.ndarray], cache: KVCache) -> np.ndarray:
    """Every prompt into its row of the cache in one pass (right-padded to the longest); the logits
    of each prompt's last token, (B, vocab)."""
    counts = np.array([p.size for p in prompts], np.int64)
    padded = np.zeros((len(prompts), int(counts.max())), np.int64)
    for b, p in enumerate(prompts):
        padded[b, :p.size] = p
    return model.forward_step(padded, cache, counts=None if (counts == counts[0]).all() else counts)


def generate_stream(model, ids, max_new_tokens: int, sampling: SamplingConfig = SamplingConfig(),
                    stop_tokens: Sequence[int] = (), seed: Optional[int] = None,
                    with_probs: bool = False, kv_dtype=None) -> Iterator[np.ndarray]:
    """Yields, per step, the new token of every sequence (B,), -1 for sequences already stopped
    (with_probs: a triple, the tokens, the (B, vocab) distributions they were drawn from and the
    (B, vocab) logits those came from).

    Stops after max_new_tokens, when every sequence has met a stop token, or when the context
    window is full. kv_dtype: the KV cache's (default the model's: float16 for quantized weights).
    """
    prompts, _ = _prompts(model, ids)
    if int(max_new_tokens) != max_new_tokens or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    B = len(prompts)
    longest = max(p.size for p in prompts)
    capacity = min(model.config.block_size, longest + int(max_new_tokens))
    cache = KVCache(model.config, B, capacity, kv_dtype or model.kv_dtype)
    logits = prefill(model, prompts, cache)
    seeds = seeds_for(seed, B)
    # What the penalties read: each row's prompt and tokens so far, padded with -1, grown in place.
    history = np.full((B, capacity), -1, np.int64)
    for b, p in enumerate(prompts):
        history[b, :p.size] = p
    filled = np.array([p.size for p in prompts], np.int64)
    done = np.zeros(B, bool)
    stops = np.array(sorted(set(_token_ids(stop_tokens, model.config.vocab_size, "stop_tokens"))), np.int64)
    rows = np.arange(B)
    for step in range(int(max_new_tokens)):
        drawn = sampling.sample(logits, history, seeds, step, return_probs=with_probs)
        tokens = np.asarray(drawn[0] if with_probs else drawn, np.int64).reshape(B)
        tokens[done] = -1
        yield (tokens, drawn[1], logits) if with_probs else tokens
        live = ~done
        history[rows[live], filled[live]] = tokens[live]
        filled[live] += 1
        done |= live & np.isin(tokens, stops)
        # The same rule as recomputing: stop once the longest sequence fills the context window.
        if done.all() or int(cache.lengths.max()) + 1 >= model.config.block_size or step + 1 == max_new_tokens:
            return
        logits = model.forward_step(np.where(done, 0, tokens)[:, None], cache)


def generate(model, ids, max_new_tokens: int, temperature: float = 1.0, top_k: Optional[int] = None,
             top_p: Optional[float] = None, seed: Optional[int] = None, *, min_p: Optional[float] = None,
             repetition_penalty: float = 1.0, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
             stop_tokens: Sequence[int] = (), use_cache: bool = True,
             on_token: Optional[Callable[[np.ndarray], None]] = None):
    """Each prompt followed by its new tokens: a 1-D array for one prompt, a list for a batch.

    Greedy when temperature is 0; the same seed gives the same tokens. A sequence ends at a stop
    token (kept), after max_new_tokens, or when the context window is full. use_cache=False
    recomputes the whole forward pass at every step (the check that the cache changes nothing).
    """
    sampling = SamplingConfig(temperature, top_k, top_p, min_p, repetition_penalty, presence_penalty,
                              frequency_penalty)
    prompts, single = _prompts(model, ids)
    steps = generate_stream(model, prompts, max_new_tokens, sampling, stop_tokens, seed) if use_cache \
        else _generate_uncached(model, prompts, max_new_tokens, sampling, stop_tokens, seed)
    outputs = [list(p) for p in prompts]
    for tokens in steps:
        if on_token is not None:
            on_token(tokens)
        for b, t in enumerate(tokens):
            if t >= 0:
                outputs[b].append(int(t))
    arrays = [np.asarray(o, np.int64) for o in outputs]
    return arrays[0] if single else arrays


def _generate_uncached(model, prompts, max_new_tokens, sampling, stop_tokens, seed):
    """generate_stream without a cache: the full forward over each sequence at every step."""
    B, block = len(prompts), model.config.block_size
    seeds = seeds_for(seed, B)
    history = [list(p) for p in prompts]
    done = np.zeros(B, bool)
    stops = set(int(t) for t in stop_tokens)
    for step in range(int(max_new_tokens)):
        logits = np.stack([model(np.asarray(h, np.int64)[None, :])[0, -1] for h in history])
        tokens = np.asarray(sampling.sample(logits, history, seeds, step), np.int64).reshape(B)
        tokens[done] = -1
        yield tokens
        for b in np.flatnonzero(~done):
            history[b].append(int(tokens[b]))
            done[b] |= int(tokens[b]) in stops
        if done.all() or max(len(h) for h in history) >= block:
            return


def next_token_probs(model, ids, sampling: SamplingConfig = SamplingConfig()) -> np.ndarray:
    """The distribution the next token would be sampled from, after the prompt ids: (vocab,)."""
    prompts, _ = _prompts(model, ids)
    logits = model(prompts[0][None, :])[0, -1]
    _, probs = kernels.sample(logits, temperature=sampling.temperature, top_k=sampling.top_k,
                              top_p=sampling.top_p, min_p=sampling.min_p,
                              repetition_penalty=sampling.repetition_penalty,
                              presence_penalty=sampling.presence_penalty,
                              frequency_penalty=sampling.frequency_penalty, history=prompts[0],
                              return_probs=True)
    return probs
