"""Continuous batching: many requests generating on one model at once, as a server needs.

One thread owns the model. Each step it admits waiting requests into free rows of one KV cache,
feeds one chunk of one request's prompt (so the requests already decoding keep flowing), then
decodes every running request in one batched step and samples each row with its own settings,
seed and step. Rows need not be consecutive: a step names the cache rows it uses. A finished
request's row keeps its keys and values (the prefix cache): a later prompt that starts with the
same tokens — the next turn of a chat — continues from them instead of recomputing them. The
kernels are batch-invariant, so a request gets the same tokens whatever else runs beside it.

What the prefix cache changes: a re-sent prompt gets the same tokens as the first time (at least two
of its tokens are fed again, so its last positions take the prompt path, whose rows do not depend
on the chunking for quantized models). The positions of a previous reply, generated one at a time,
hold keys and values of the decode path, which differ from a prompt pass's in the last bits; so a
continued chat's reply equals a fresh computation's up to that rounding, and at temperature 0 may
differ where two tokens nearly tie. prefix_rows=0 turns reuse off.

Requests carry token ids; text (templates, stop strings, detokenizing) is the caller's: see
pyllm/serve. Not the HTTP server, and not the single-call generation of pyllm.generate.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from pyllm.generate import SamplingConfig, seeds_for
from pyllm.models import KVCache

# A constraint on what may come next: given the tokens generated so far, a boolean mask over the
# vocabulary of the tokens allowed next (None: any).
TokenMask = Callable[[Sequence[int]], Optional[np.ndarray]]


class QueueFull(RuntimeError):
    """More requests wait than the engine queues (a server answers 429)."""


@dataclass
class EngineConfig:
    """How many requests run and wait, and how the cache is shared among them."""

    max_batch: int = 8          # requests decoding at once (rows of the cache in use)
    max_queue: int = 64         # requests waiting beyond those; one more raises QueueFull
    context: Optional[int] = None   # positions a row holds (default: the model's, at most 4096)
    prefix_rows: int = 4        # extra rows that keep finished requests' keys and values; 0: no reuse
    prefill_chunk: int = 256    # prompt tokens fed per step while other requests decode

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_queue", "prefill_chunk"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"EngineConfig.{name} must be an integer >= 1, got {value!r}")
        if isinstance(self.prefix_rows, bool) or not isinstance(self.prefix_rows, int) or self.prefix_rows < 0:
            raise ValueError(f"EngineConfig.prefix_rows must be an integer >= 0, got {self.prefix_rows!r}")
        if self.context is not None and (isinstance(self.context, bool) or not isinstance(self.context, int)
                                         or self.context < 2):
            raise ValueError(f"EngineConfig.context must be an integer >= 2, got {self.context!r}")


@dataclass
class Request:
    """What to generate: prompt ids, how many tokens at most, how to sample them."""

    prompt: Sequence[int]
    max_new_tokens: int
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    seed: Optional[int] = None
    stop_tokens: Sequence[int] = ()
    logprobs: Optional[int] = None     # None: none; k >= 0: the chosen token's and the k likeliest
    mask: Optional[TokenMask] = None


@dataclass
class Event:
    """One generated token (token >= 0) or the end of a request (finish set, token -1)."""

    token: int
    logprob: Optional[float] = None
    top: Optional[list] = None          # [(id, logprob)] likeliest first, when asked for
    finish: Optional[str] = None        # "stop" (a stop token), "length", "cancelled", "error: ..."


class Handle:
    """A submitted request: iterate over its events (blocking), or give submit() a listener that
    the engine's thread calls with each event (an asyncio server hands them to its loop);
    cancel() ends the request at the next step."""

    def __init__(self, request: Request, prompt: np.ndarray, listener: Optional[Callable[[Event], None]]) -> None:
        self.request, self.prompt = request, prompt
        self.events: "queue.Queue[Event]" = queue.Queue()
        self.listener = listener
        self.cancelled = threading.Event()
        self.submitted = time.perf_counter()
        self.first_token_at: Optional[float] = None
        self.cached_tokens = 0          # prompt tokens whose keys and values came from the prefix cache

    def cancel(self) -> None:
        self.cancelled.set()

    def _put(self, event: Event) -> None:
        if self.listener is not None:
            self.listener(event)
        else:
            self.events.put(event)

    def __iter__(self) -> Iterator[Event]:
        while True:
            event = self.events.get()
            yield event
            if event.finish is not None:
                return

    def tokens(self) -> list[int]:
        """Every generated token, once the request has ended (blocks until then)."""
        return [e.token for e in self if e.token >= 0]


@dataclass
class _Row:
    """A cache row: the tokens whose keys and values it holds, and who uses it."""

    index: int
    tokens: list = field(default_factory=list)
    owner: Optional["_Running"] = None
    last_used: float = 0.0


@dataclass
class _Running:
    handle: Handle
    row: _Row
    pending: list                 # prompt tokens not yet fed
    history: list                 # prompt and generated tokens (what penalties read)
    seed: int
    generated: int = 0
    feed: Optional[int] = None    # the token to feed at the next decode step
    logits: Optional[np.ndarray] = None   # to sample from now (after the prompt's last chunk)


@dataclass
class EngineStats:
    """Counters for /metrics (read without a lock: each is one Python object, written by the loop)."""

    requests: int = 0
    finished: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    generated_tokens: int = 0
    steps: int = 0
    batch_rows: int = 0           # sum over decode steps of the rows decoded (mean batch = / steps)
    first_token_seconds: float = 0.0
    first_tokens: int = 0
    running: int = 0
    queued: int = 0


class Engine:
    """A model serving many requests at once: submit(Request) -> Handle; close() when done."""

    def __init__(self, model, config: Optional[EngineConfig] = None) -> None:
        self.model, self.config = model, config or EngineConfig()
        cfg = self.config
        self.context = min(model.config.block_size, cfg.context or 4096)
        self.cache = KVCache(model.config, cfg.max_batch + cfg.prefix_rows, self.context, model.kv_dtype)
        self.rows = [_Row(i) for i in range(self.cache.batch)]
        self.stats = EngineStats()
        self._waiting: "queue.Queue[Handle]" = queue.Queue()
        self._jobs: "queue.Queue[tuple]" = queue.Queue()
        self._running: list[_Running] = []
        self._wake = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="pyllm-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ the caller's side

    def submit(self, request: Request, listener: Optional[Callable[[Event], None]] = None) -> Handle:
        """Queues a request (ValueError for a bad one, QueueFull when too many wait)."""
        if self._closed:
            raise RuntimeError("the engine is closed")
        prompt = np.asarray(request.prompt)
        V = self.model.config.vocab_size
        if prompt.ndim != 1 or prompt.size == 0 or prompt.dtype.kind not in "iu":
            raise ValueError("the prompt must be a non-empty sequence of token ids")
        if prompt.min() < 0 or prompt.max() >= V:
            raise ValueError(f"the prompt holds ids outside [0, {V})")
        if prompt.size >= self.context:
            raise ValueError(f"the prompt has {prompt.size} tokens; a request holds at most {self.context} "
                             f"(prompt and reply), so at most {self.context - 1} for the prompt")
        n = request.max_new_tokens
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {n!r}")
        if request.logprobs is not None and not (0 <= request.logprobs <= 20):
            raise ValueError(f"logprobs must lie in [0, 20], got {request.logprobs!r}")
        if self._waiting.qsize() >= self.config.max_queue:
            raise QueueFull(f"{self._waiting.qsize()} requests are waiting already")
        handle = Handle(request, prompt.astype(np.int64), listener)
        self.stats.requests += 1
        self._waiting.put(handle)
        self.stats.queued = self._waiting.qsize()
        self._wake.set()
        return handle

    def call(self, fn: Callable, *args):
        """fn(*args) on the engine's thread, between steps (the model is not thread-safe); its result."""
        done: "queue.Queue[tuple]" = queue.Queue()
        self._jobs.put((fn, args, done))
        self._wake.set()
        ok, value = done.get()
        if not ok:
            raise value
        return value

    def close(self) -> None:
        """Ends every request (finish "cancelled") and stops the loop."""
        self._closed = True
        self._wake.set()
        self._thread.join(timeout=30)

    # ------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        while not self._closed:
            self._run_jobs()
            self._admit()
            if not self._running:
                self._wake.wait(timeout=0.05)
                self._wake.clear()
                continue
            try:
                self._step()
            except Exception as exc:   # a bug, not bad input (requests are checked at submit)
                for r in list(self._running):
                    self._finish(r, f"error: {exc}")
        for r in list(self._running):
            self._finish(r, "cancelled")
        while not self._waiting.empty():
            self._waiting.get()._put(Event(-1, finish="cancelled"))

    def _run_jobs(self) -> None:
        while not self._jobs.empty():
            fn, args, done = self._jobs.get()
            try:
                done.put((True, fn(*args)))
            except Exception as exc:
                done.put((False, exc))

    def _admit(self) -> None:
        while len(self._running) < self.config.max_batch and not self._waiting.empty():
            handle = self._waiting.get()
            self.stats.queued = self._waiting.qsize()
            if handle.cancelled.is_set():
                handle._put(Event(-1, finish="cancelled"))
                continue
            row, reused = self._row_for(list(map(int, handle.prompt)))
            self.cache.truncate(row.index, reused)
            row.tokens = row.tokens[:reused]
            handle.cached_tokens = reused
            prompt = list(map(int, handle.prompt))
            seed = int(seeds_for(handle.request.seed, 1)[0])
            running = _Running(handle, row, prompt[reused:], list(prompt), seed)
            row.owner = running
            self._running.append(running)
            self.stats.prompt_tokens += len(prompt)
            self.stats.cached_prompt_tokens += reused
        self.stats.running = len(self._running)

    def _row_for(self, prompt: list) -> tuple:
        """A free row for a prompt, and how many of its first tokens that row already holds: the
        idle row sharing the longest prefix (at most all but the prompt's last two tokens: fed as one
        chunk, they give what a fresh prompt pass gives), else an empty one, else the one idle longest."""
        idle = [r for r in self.rows if r.owner is None]
        best, best_len = None, 0
        for r in idle if self.config.prefix_rows else ():
            n = _common_prefix(r.tokens, prompt, len(prompt) - 2)
            if n > best_len and self.cache.truncatable(r.index, n):   # a window buffer may have dropped them
                best, best_len = r, n
        if best is not None:
            return best, best_len
        empty = [r for r in idle if not r.tokens]
        return (empty[0] if empty else min(idle, key=lambda r: r.last_used)), 0

    def _step(self) -> None:
        model = self.model
        for r in [r for r in self._running if r.handle.cancelled.is_set()]:   # a dropped client
            self._finish(r, "cancelled")
        # One chunk of one prompt (the oldest still feeding its prompt).
        feeding = next((r for r in self._running if r.pending), None)
        if feeding is not None:
            chunk = feeding.pending[:self.config.prefill_chunk]
            logits = model.forward_step(np.array([chunk], np.int64), self.cache, rows=[feeding.row.index])
            feeding.row.tokens.extend(chunk)
            del feeding.pending[:len(chunk)]
            if not feeding.pending:
                feeding.logits = logits[0]
        # Every request with a token to feed, in one batched step.
        decoding = [r for r in self._running if r.feed is not None]
        if decoding:
            tokens = np.array([[r.feed] for r in decoding], np.int64)
            logits = model.forward_step(tokens, self.cache, rows=[r.row.index for r in decoding])
            for r, row_logits in zip(decoding, logits):
                r.row.tokens.append(r.feed)
                r.feed, r.logits = None, row_logits
            self.stats.steps += 1
            self.stats.batch_rows += len(decoding)
        ready = [r for r in self._running if r.logits is not None]
        if ready:
            self._sample(ready)

    def _sample(self, ready: list) -> None:
        # Rows with the same sampling settings are drawn in one call, each at its own seed and step.
        groups: dict = {}
        for r in ready:
            groups.setdefault(dataclasses.astuple(r.handle.request.sampling), []).append(r)
        for members in groups.values():
            sampling = members[0].handle.request.sampling
            logits = np.stack([r.logits for r in members])
            raw = logits
            for i, r in enumerate(members):
                if r.handle.request.mask is not None:
                    allowed = r.handle.request.mask(r.history[len(r.handle.prompt):])
                    if allowed is not None:
                        if raw is logits:
                            logits = logits.copy()
                        logits[i, ~allowed] = -np.inf
            history = None
            if sampling.uses_history:
                width = max(len(r.history) for r in members)
                history = np.full((len(members), width), -1, np.int64)
                for i, r in enumerate(members):
                    history[i, :len(r.history)] = r.history
            seeds = np.array([r.seed for r in members], np.uint64)
            steps = np.array([r.generated for r in members], np.int64)
            drawn = np.asarray(sampling.sample(logits, history, seeds, steps), np.int64).reshape(-1)
            want = [r for r in members if r.handle.request.logprobs is not None]
            logp = _log_softmax(raw[[members.index(r) for r in want]]) if want else None
            for i, (r, token) in enumerate(zip(members, drawn)):
                r.logits = None
                event = Event(int(token))
                if r.handle.request.logprobs is not None:
                    lp = logp[want.index(r)]
                    event.logprob = float(lp[token])
                    k = r.handle.request.logprobs
                    if k:
                        top = np.argsort(-lp, kind="stable")[:k]
                        event.top = [(int(t), float(lp[t])) for t in top]
                self._emit(r, event)

    def _emit(self, r: _Running, event: Event) -> None:
        handle = r.handle
        if handle.first_token_at is None:
            handle.first_token_at = time.perf_counter()
            self.stats.first_token_seconds += handle.first_token_at - handle.submitted
            self.stats.first_tokens += 1
        handle._put(event)
        r.generated += 1
        r.history.append(event.token)
        self.stats.generated_tokens += 1
        if handle.cancelled.is_set():
            self._finish(r, "cancelled")
        elif event.token in handle.request.stop_tokens:
            self._finish(r, "stop")
        elif r.generated >= handle.request.max_new_tokens or len(r.history) >= self.context:
            self._finish(r, "length")
        else:
            r.feed = event.token

    def _finish(self, r: _Running, reason: str) -> None:
        r.handle._put(Event(-1, finish=reason))
        r.row.owner = None   # its keys and values stay: the prefix of a later prompt, perhaps
        r.row.last_used = time.perf_counter()
        self._running.remove(r)
        self.stats.finished += 1
        self.stats.running = len(self._running)


def _common_prefix(a: list, b: list, limit: int) -> int:
    n = min(len(a), len(b), limit)
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True))
