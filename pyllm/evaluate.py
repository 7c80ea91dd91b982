"""Perplexity of a model on a text, as llama.cpp's llama-perplexity measures it: the text's tokens in
windows of `context` tokens, each window scored from its own start (no memory of the one before),
every token but a window's first predicted from the ones before it in that window; the perplexity
is exp of the mean negative log-likelihood over all the predicted tokens.

Not training's validation loss (pyllm.train.evaluate: random windows of the held-out split) and not
a benchmark harness: one number for one text, comparable with transformers on the same windows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pyllm.models import IGNORE
from pyllm.progress import bar as progress_bar


@dataclass
class Perplexity:
    perplexity: float
    nll: float          # mean negative log-likelihood per predicted token (nats)
    tokens: int         # predicted tokens
    windows: int
    context: int

    def __str__(self) -> str:
        return (f"perplexity {self.perplexity:.4f} (mean NLL {self.nll:.4f} nats/token over {self.tokens:,} tokens "
                f"in {self.windows} windows of {self.context})")


def windows_of(ids: np.ndarray, context: int) -> list[np.ndarray]:
    """The token ids cut into consecutive windows of `context` (the last one shorter, if 2 or more
    tokens are left; a lone last token has nothing to be predicted from and is dropped)."""
    return [ids[i:i + context] for i in range(0, len(ids), context) if len(ids[i:i + context]) >= 2]


def perplexity(model, ids, context: int | None = None, batch: int = 4, progress: bool = True) -> Perplexity:
    """The model's perplexity on the token ids, in windows of `context` (default: the model's
    context window, at most 1024), `batch` windows per forward pass."""
    ids = np.asarray(ids, np.int64).reshape(-1)
    block = model.config.block_size
    context = min(block, 1024) if context is None else context
    if isinstance(context, bool) or not isinstance(context, (int, np.integer)) or not 2 <= context <= block:
        raise ValueError(f"context must be an integer in [2, {block}] (the model's window), got {context!r}")
    if not isinstance(batch, (int, np.integer)) or isinstance(batch, bool) or batch < 1:
        raise ValueError(f"batch must be an integer >= 1, got {batch!r}")
    windows = windows_of(ids, int(context))
    if not windows:
        raise ValueError(f"the text has {ids.size} token(s): perplexity needs at least 2")
    total, count = 0.0, 0
    with progress_bar(total=len(windows), desc="perplexity", unit="window", enabled=progress) as bar:
        for start in range(0, len(windows), batch):
            group = windows[start:start + batch]
            width = max(len(w) for w in group) - 1
            x = np.zeros((len(group), width), np.int64)
            y = np.full((len(group), width), IGNORE, np.int64)   # padding is not scored
            for row, w in enumerate(group):
                x[row, :len(w) - 1], y[row, :len(w) - 1] = w[:-1], w[1:]
            scored = int((y != IGNORE).sum())
            total += model.loss(x, y) * scored   # loss: the mean over scored tokens
            count += scored
            bar.update(len(group))
    nll = total / count
    return Perplexity(math.exp(nll), nll, count, len(windows), int(context))
