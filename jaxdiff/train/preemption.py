"""SIGTERM / SIGINT during training: every process stops after one agreed step.

A preempted TPU VM (or a user's Ctrl-C, or `scancel`) signals one process, or several at slightly
different moments, while each host's Python loop may be a few steps ahead of another's. The
training loop calls `StopRequest.reached(step)` after dispatching every step; it turns True at the
same step on every process, which then saves that step and returns normally (exit status 0).

* Several processes (`jax.distributed`): JAX's preemption sync manager catches SIGTERM, tells the
  other processes through the coordination service, and `reached_preemption_sync_point` picks the
  call after the latest call any process had made. It is given the number of steps this run has
  taken (1, 2, ...: the same on every process, since they start from one agreed step), so a
  signal that arrives before the first step (while compiling) stops after the first step.
  SIGINT is forwarded to it as SIGTERM (a Python SIGTERM handler would replace JAX's).
* One process: a Python handler for both signals sets a flag read at the next step.
A second SIGINT while a stop is pending raises KeyboardInterrupt (the usual hard stop).
"""

from __future__ import annotations

import logging
import os
import signal
import threading

import jax

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Context manager installing the handlers; `reached(step)` says when to save and stop."""

    def __init__(self):
        self.requested = False
        self._calls = 0
        self._previous: dict = {}
        self._multi = jax.process_count() > 1

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread
        if self._multi:
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._forward)
        else:
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("%s received: saving a checkpoint after the current step, then stopping",
                    signal.Signals(signum).name)

    def _forward(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        os.kill(os.getpid(), signal.SIGTERM)

    def reached(self, step: int) -> bool:
        """Whether to save `step` and stop (the same answer at the same step on every process).

        Call it once after every step."""
        self._calls += 1
        if self._multi:
            from jax.experimental import multihost_utils

            return bool(multihost_utils.reached_preemption_sync_point(self._calls))
        return self.requested
