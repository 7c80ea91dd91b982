"""Seeing inside: how a model decided its next token. After "Dogs are" the model gives every token of
its vocabulary a probability, the sampler removes some (temperature, top-k, top-p, min-p) and draws
one; this module keeps every step of that where a notebook or a page can show it: the prompt's
tokens and how surprising each was, the next-token distribution, each layer's attention weights
(from the C++ attention kernel), the logit lens (each layer's residual stream read through the final
norm and the head), and for a generation a trace of each draw and what each filter removed.

Not the model's arithmetic (pyllm.models: Transformer.inspect, lens_logits) nor sampling itself
(pyllm.kernels.sample, which the trace calls as generation does); the HTML is pyllm.report's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from pyllm import kernels, report
from pyllm.generate import SamplingConfig, generate_stream

MAX_TOKENS = 512        # prompt + generation: the attention maps alone are n_layer * n_head * T * T floats
LENS_POSITIONS = 16     # the logit-lens grid covers the last this many positions

Candidate = tuple        # (id, piece, probability)


def piece(tokenizer, token_id: int) -> str:
    """A token's text as it reads alone (bytes that are not whole UTF-8 shown as \\xNN escapes)."""
    return tokenizer.token_to_bytes(int(token_id)).decode("utf-8", errors="backslashreplace")


def top_of(probs: np.ndarray, tokenizer, k: int) -> list[Candidate]:
    """The k likeliest tokens of a distribution as (id, piece, probability), likeliest first (ties by
    id); tokens of probability 0 are left out."""
    order = np.argsort(-probs, kind="stable")[:k]
    return [(int(t), piece(tokenizer, t), float(probs[t])) for t in order if probs[t] > 0]


def softmax(logits: np.ndarray) -> np.ndarray:
    """The model's own distribution: softmax of the logits at temperature 1, nothing removed."""
    return kernels.softmax(np.ascontiguousarray(logits, np.float32))


@dataclass
class TraceStep:
    """One draw of a generation: the token, how likely the model and the sampler found it, the
    alternatives, and what each of the sampler's filters took away."""

    token: int
    piece: str
    prob: float                 # in the distribution it was drawn from (after every filter)
    model_prob: float           # in the model's softmax (temperature 1, no filter)
    rank: int                   # 1 for the model's likeliest token
    kept: int                   # how many tokens the draw could have picked
    alternatives: list[tuple[int, str, float, float]]   # (id, piece, model prob, sampled prob)
    removed: list[tuple[str, int, float]]                # (filter, tokens it removed, their model prob)
    probs: np.ndarray = field(repr=False, default=None)  # the whole sampled distribution (vocab,)


@dataclass
class Explanation:
    """What `explain` saw; every array is numpy, for notebooks, and `to_html` draws it all."""

    prompt: str
    tokens: list[tuple[int, str]]          # the prompt's (id, piece)
    logits: np.ndarray                     # (vocab,) after the last prompt token
    probs: np.ndarray                      # (vocab,) what the next token is drawn from (sampling applied)
    model_probs: np.ndarray                # (vocab,) softmax of logits (temperature 1, nothing removed)
    top: list[Candidate]                   # likeliest of probs first
    attention: list[np.ndarray]            # per layer (n_head, T, T), each row a causal distribution
    lens: list[list[Candidate]]            # per layer, the logit lens's likeliest at the last position
    lens_grid: list[list[Candidate]]       # per layer, the lens's top token at each of lens_positions
    lens_positions: list[int]
    surprisal: np.ndarray                  # (T,) bits: -log2 p(token | what came before); NaN for the first
    sampling: SamplingConfig
    trace: list[TraceStep] = field(default_factory=list)
    generated: str = ""
    model_name: str = ""
    # The model's top_k likeliest as (id, piece, model prob, sampled prob): the tables' rows (with
    # greedy or filters, `top` alone would hide what they removed).
    candidates: list[tuple[int, str, float, float]] = field(default_factory=list)

    def table(self, width: int = 28) -> str:
        """The terminal view: the tokens with ids, the next-token table with bars, the logit lens's
        guess per layer and the generation trace."""
        lines = [f"prompt: {self.prompt!r} ({len(self.tokens)} tokens" +
                 (f", {self.model_name})" if self.model_name else ")"),
                 "tokens: " + "  ".join(f"{p!r}:{i}" for i, p in self.tokens), ""]
        filtered = _is_filtered(self.sampling)
        lines.append("next token:" + (f"  model p, then sampled p ({_settings(self.sampling)})" if filtered else ""))
        top = max((p for *_, p in self.candidates), default=1.0) or 1.0
        for rank, (tid, text, p, sampled) in enumerate(self.candidates, 1):
            shown = sampled if filtered else p
            bar = "\u2588" * max(1, round(width * shown / top)) if shown > 0 else ""
            also = f"{sampled:7.4f}  " if filtered else ""
            lines.append(f"{rank:3d}  {text!r:>16} {tid:>7}  {p:7.4f}  {also}{bar}")
        if self.lens:
            lines += ["", "logit lens (each layer's guess for the next token):"]
            for layer, guesses in enumerate(self.lens):
                lines.append(f"  layer {layer:2d}: " + "  ".join(f"{t!r} {p:.3f}" for _, t, p in guesses[:3]))
        if self.trace:
            lines += ["", f"generation ({_settings(self.sampling)}):"]
            for n, s in enumerate(self.trace, 1):
                cut = ", ".join(f"{name} -{count}" for name, count, _ in s.removed if count)
                lines.append(f"{n:4d}  {s.piece!r:>16}  p={s.prob:.4f}  model p={s.model_prob:.4f}  rank {s.rank:<4d}"
                             f" of {s.kept} kept" + (f"  ({cut})" if cut else ""))
            lines += ["", "text: " + repr(self.prompt + self.generated)]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def to_html(self, path) -> Path:
        """One self-contained HTML file (works offline): the token strip coloured by surprisal, the
        probability table, every layer's and head's attention map, the logit lens, the trace."""
        return report.write(path, html_page(self))


def _is_filtered(s: SamplingConfig) -> bool:
    return (s.temperature != 1.0 or s.top_k is not None or s.top_p is not None or s.min_p is not None
            or s.uses_history)


def _settings(s: SamplingConfig) -> str:
    parts = ["greedy" if s.temperature == 0 else f"temperature {s.temperature:g}"]
    parts += [f"{name} {value:g}" for name, value in (("top-k", s.top_k), ("top-p", s.top_p), ("min-p", s.min_p))
              if value is not None]
    if s.repetition_penalty != 1.0:
        parts.append(f"repetition penalty {s.repetition_penalty:g}")
    return ", ".join(parts)


def _sampled(logits: np.ndarray, history: np.ndarray, **options) -> np.ndarray:
    return kernels.sample(logits, history=history, return_probs=True, **options)[1]


def filter_stages(logits: np.ndarray, sampling: SamplingConfig, history: Sequence[int]) -> list[tuple[str, np.ndarray]]:
    """The distribution after each of the sampler's steps, in its order: penalties, temperature (or
    greedy), top-k, top-p, min-p; each (name, probs), the last what the sampler draws from. Each stage
    is kernels.sample's own distribution with the options up to it, so nothing here re-implements it."""
    s = sampling
    history = np.asarray(history, np.int64)
    options = dict(repetition_penalty=s.repetition_penalty, presence_penalty=s.presence_penalty,
                   frequency_penalty=s.frequency_penalty)
    stages = [("penalties", _sampled(logits, history, **options))] if s.uses_history else []
    options["temperature"] = s.temperature
    stages.append(("greedy" if s.temperature == 0 else "temperature", _sampled(logits, history, **options)))
    for name, key, value in (("top-k", "top_k", s.top_k), ("top-p", "top_p", s.top_p), ("min-p", "min_p", s.min_p)):
        if value is not None:
            options[key] = value
            stages.append((name, _sampled(logits, history, **options)))
    return stages


def _removed(model_probs: np.ndarray, stages: list[tuple[str, np.ndarray]]) -> list[tuple[str, int, float]]:
    """Per stage, the tokens it took to probability 0 that the stage before left, and their model prob."""
    out, before = [], model_probs > 0
    for name, probs in stages:
        now = probs > 0
        gone = before & ~now
        out.append((name, int(gone.sum()), float(model_probs[gone].sum(dtype=np.float64))))
        before = now
    return out


def _surprisal(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Bits of surprise of each token given the ones before it (NaN for the first)."""
    out = np.full(ids.size, np.nan)
    if ids.size > 1:
        x = logits[:-1].astype(np.float64)
        top = x.max(axis=1, keepdims=True)
        log_z = top[:, 0] + np.log(np.exp(x - top).sum(axis=1))
        out[1:] = (log_z - x[np.arange(ids.size - 1), ids[1:]]) / math.log(2)
    return out


def explain(model, tokenizer, ids: Sequence[int], prompt: str = "", top_k: int = 10,
            sampling: SamplingConfig = SamplingConfig(), generate: int = 0, seed: Optional[int] = None,
            stop_tokens: Sequence[int] = (), lens_k: int = 5, attention: bool = True,
            model_name: str = "") -> Explanation:
    """Runs the prompt ids once with the model's insides kept (Transformer.inspect), and with
    generate > 0 generates that many tokens (as pyllm.generate does: the same cache, sampler and
    seed) keeping a trace of each draw. top_k: how many candidates the table lists (the sampler's
    own top-k is sampling.top_k)."""
    for name, value, low in (("top_k", top_k, 1), ("lens_k", lens_k, 1), ("generate", generate, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    ids = np.asarray(list(ids), np.int64)
    if not ids.size:
        raise ValueError("the prompt is empty: give some text to explain")
    if ids.size + generate > MAX_TOKENS:
        raise ValueError(f"explain keeps every layer's attention over the whole sequence: at most {MAX_TOKENS} "
                         f"tokens (prompt + generated); this asks for {ids.size} + {generate}")
    seen = model.inspect(ids, attention=attention)
    logits = seen.logits[-1]
    model_probs = softmax(logits)
    probs = filter_stages(logits, sampling, ids)[-1][1]
    positions = list(range(max(0, ids.size - LENS_POSITIONS), ids.size))
    lens, grid = [], []
    for residual in seen.residuals:
        layer_probs = softmax(model.lens_logits(residual[positions]))
        lens.append(top_of(layer_probs[-1], tokenizer, lens_k))
        grid.append([top_of(row, tokenizer, 1)[0] for row in layer_probs])
    result = Explanation(prompt, [(int(t), piece(tokenizer, t)) for t in ids], logits, probs, model_probs,
                         top_of(probs, tokenizer, top_k), seen.attention, lens, grid, positions,
                         _surprisal(seen.logits, ids), sampling, model_name=model_name,
                         candidates=[(tid, text, p, float(probs[tid])) for tid, text, p in
                                     top_of(model_probs, tokenizer, top_k)])
    if generate:
        result.trace, result.generated = trace(model, tokenizer, ids, generate, sampling, seed, stop_tokens, top_k)
    return result


def trace(model, tokenizer, ids: np.ndarray, steps: int, sampling: SamplingConfig, seed: Optional[int],
          stop_tokens: Sequence[int], top_k: int) -> tuple[list[TraceStep], str]:
    """A generation of up to `steps` tokens by generate_stream (its cache, sampler and seed), each
    draw's distribution and filters kept; the new text. The cache is float32 whatever the model's,
    so the first step's numbers are the explanation's table (a quantized model's float16 cache, which
    pyllm.generate uses, moves logits by up to about 1 and may then draw other tokens)."""
    out, history = [], list(int(t) for t in ids)
    for tokens, probs, logits in generate_stream(model, ids, steps, sampling, stop_tokens, seed, with_probs=True,
                                                 kv_dtype=np.float32):
        token, probs, logits = int(tokens[0]), probs[0], logits[0]
        model_probs = softmax(logits)
        stages = filter_stages(logits, sampling, history)
        alternatives = [(tid, text, p, float(probs[tid])) for tid, text, p in top_of(model_probs, tokenizer, top_k)]
        out.append(TraceStep(token, piece(tokenizer, token), float(probs[token]), float(model_probs[token]),
                             int((model_probs > model_probs[token]).sum()) + 1, int((probs > 0).sum()),
                             alternatives, _removed(model_probs, stages), probs))
        history.append(token)
    text = tokenizer.decode([s.token for s in out]) if out else ""
    return out, text


# ----------------------------------------------------------------------------- the page

def html_page(e: Explanation) -> str:
    """The Explanation as one HTML document (see Explanation.to_html)."""
    bits = e.surprisal
    finite = bits[np.isfinite(bits)]
    top_bits = max(float(finite.max()), 1.0) if finite.size else 1.0
    titles = [f"id {tid} · " + ("first token" if not np.isfinite(b) else f"{b:.2f} bits (p = {2 ** -b:.4f})")
              for (tid, _), b in zip(e.tokens, bits)]
    body = [f"<h1>How the model continues {report.escape(repr(e.prompt))}</h1>",
            f'<div class="meta">{report.escape(e.model_name)} · {len(e.tokens)} prompt tokens · '
            f"{report.escape(_settings(e.sampling))}</div>",
            "<h2>The prompt's tokens</h2>",
            '<div class="meta">Each token with its id; colour: how surprising it was after the ones before it '
            f"(darker = more bits, up to {top_bits:.1f}). Hover for the number.</div>",
            report.token_strip(e.tokens, bits / top_bits, titles),
            "<h2>The next token</h2>", _probability_table(e)]
    if e.attention:
        T = len(e.tokens)
        heads = e.attention[0].shape[0]
        body += ["<h2>Attention</h2>",
                 f'<div class="meta">{len(e.attention)} layers x {heads} heads; each map is {T} x {T}: row i is how '
                 f"token i spread its attention over tokens 0..i. Click a map to enlarge it.</div>"]
        future = np.triu(np.ones((T, T), bool), 1)   # what no query sees: grey, not "no weight"
        for layer, maps in enumerate(e.attention):
            images = [(report.heatmap_uri(np.where(future, np.nan, maps[h]), 1.0), f"head {h}",
                       f"layer {layer} head {h}") for h in range(heads)]
            body.append(report.thumbnails(f"layer {layer}", images))
        body.append(report.ZOOM_PANEL)
    if e.lens_grid:
        body += ["<h2>Logit lens</h2>",
                 '<div class="meta">What each layer would predict if the rest were skipped: its residual stream '
                 "through the final norm and the head. Columns: positions (the token there); cell: the top guess "
                 "for the token after it, shaded by its probability.</div>", _lens_table(e)]
    if e.trace:
        body += ["<h2>Generation, step by step</h2>", _trace_table(e),
                 f'<div class="meta">text: <span class="mono">{report.escape(e.prompt + e.generated)}</span></div>']
    return report.page(f"pyllm explain: {e.prompt[:60]}", "\n".join(body), report.ZOOM_SCRIPT if e.attention else "")


def _probability_table(e: Explanation) -> str:
    filtered = _is_filtered(e.sampling)
    top = max((p for *_, p in e.candidates), default=1.0) or 1.0
    top_model = max((p for _, _, p, _ in e.candidates), default=1.0) or 1.0
    rows = []
    for rank, (tid, text, p, sampled) in enumerate(e.candidates, 1):
        row = [report.num(rank, "{}"), f'<td class="mono">{report.escape(report.visible(text))}</td>',
               report.num(tid, "{}"), report.num(p), report.bar(p / top_model)]
        if filtered:
            row += [report.num(sampled), report.bar(sampled / top, sampled=True)]
        rows.append(row)
    header = ["#", "token", "id", "probability", ""] + (["sampled p", ""] if filtered else [])
    note = (f'<div class="meta">probability: the model\'s softmax; sampled p: what the sampler draws from after '
            f"{report.escape(_settings(e.sampling))}.</div>" if filtered else "")
    return report.table(header, rows) + note


def _lens_table(e: Explanation) -> str:
    header = ["layer"] + [f'<span class="mono">{report.escape(report.visible(e.tokens[p][1]))}</span>'
                          for p in e.lens_positions]
    rows = []
    for layer, guesses in enumerate(e.lens_grid):
        cells = [report.num(layer, "{}")]
        for _, text, p in guesses:
            cells.append(f'<td style="background:{report.css_colour(p)};color:{report.ink(p)}" '
                         f'title="p = {p:.4f}">{report.escape(report.visible(text))}</td>')
        rows.append(cells)
    return report.table(header, rows, "lens")


def _trace_table(e: Explanation) -> str:
    rows = []
    for n, s in enumerate(e.trace, 1):
        alternatives = ", ".join(f"{report.visible(text)} {mp:.3f}" for _, text, mp, _ in s.alternatives[:5])
        cut = "; ".join(f"{name}: {count} tokens ({mass:.3f} of the model's p)" for name, count, mass in s.removed
                        if count)
        rows.append([report.num(n, "{}"), f'<td class="mono">{report.escape(report.visible(s.piece))}</td>',
                     report.num(s.prob), report.bar(s.prob, 120, sampled=True), report.num(s.model_prob),
                     report.num(s.rank, "{}"), report.num(s.kept, "{}"), report.escape(alternatives),
                     report.escape(cut or "nothing")])
    return report.table(["step", "chosen", "sampled p", "", "model p", "rank", "kept", "the model's likeliest",
                         "removed by the filters"], rows)
