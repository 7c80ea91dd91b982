"""Ctrl-C (SIGINT) or SIGTERM (a job scheduler, `kill`, a container stopping) during a long loop
(training, fine-tuning): the first asks the loop to stop after the current step, so it can save
first; a second interrupts at once.

Not the saving itself (each loop writes its own checkpoint, pyllm.io.checkpoint).
"""

from __future__ import annotations

import signal
import sys
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}


class StopRequest:
    """The first Ctrl-C or SIGTERM asks the loop to stop after the current step (then it saves); a
    second one interrupts at once, leaving the last checkpoint as it was."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict = {}
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{_NAMES.get(signum, 'signal')}: finishing this step, then saving a checkpoint "
              f"(Ctrl-C again to quit now)", file=sys.stderr, flush=True)

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}
