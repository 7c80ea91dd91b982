"""Ctrl-C during a long loop (training, fine-tuning): the first asks the loop to stop after the
current step, so it can save first; a second interrupts at once.

Not the saving itself (each loop writes its own checkpoint, pyllm.io.checkpoint).
"""

from __future__ import annotations

import signal
import sys
import threading


class StopRequest:
    """The first Ctrl-C asks the loop to stop after the current step (then it saves); a second one
    interrupts at once, leaving the last checkpoint as it was."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: finishing this step, then saving a checkpoint (Ctrl-C again to quit now)",
              file=sys.stderr, flush=True)

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
