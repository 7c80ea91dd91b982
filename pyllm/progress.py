"""Progress bars for the long jobs (training, tokenizing, writing files): tqdm's, drawn only where
someone watches them, a terminal or a notebook. Written to a log file or a pipe, a bar's redraws
would fill it, so there it stays quiet (the loops still log their own records).

Not a progress library: one rule in one place, over tqdm.
"""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def watched() -> bool:
    """Whether stderr is a terminal or this runs in a Jupyter kernel (where tqdm draws a widget)."""
    try:
        return sys.stderr.isatty() or "ipykernel" in sys.modules
    except (AttributeError, ValueError):   # a replaced or closed stderr
        return False


def bar(iterable=None, *, enabled: bool = True, **options) -> tqdm:
    """tqdm(iterable, **options), disabled unless `enabled` and someone watches (see watched)."""
    return tqdm(iterable, disable=not (enabled and watched()), **options)
