"""Stopping on SIGINT and SIGTERM: a training run finishes the step it is in, saves a checkpoint
and ends with the exact command that resumes it.
"""
from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any

from .checkpoint import CHECKPOINT
from .errors import Interrupted

# For tests only: CIFAR_ONECYCLE_TEST_SIGNALS="SIGTERM@6,SIGINT@eval2,SIGTERM@load" makes a run send
# itself each signal as that point begins, as if it arrived from outside just then: a number is a
# training step (from 0, over the whole run), ``evalN`` the evaluation after epoch N, ``load`` the
# reading of the data set. A stop at an exact point, with no sleeps and no patched internals.
TEST_SIGNALS = "CIFAR_ONECYCLE_TEST_SIGNALS"
TestSignals = dict[int | str, list[signal.Signals]]  # the signals to send, by point


def signals_for_tests() -> TestSignals:
    """The test hook's signals by point; empty unless the environment asks for them."""
    plan: TestSignals = {}
    for item in filter(None, os.environ.get(TEST_SIGNALS, "").split(",")):
        name, _, point = item.partition("@")
        point = point.strip()
        plan.setdefault(int(point) if point.isdigit() else point, []).append(signal.Signals[name.strip()])
    return plan


def send_test_signals(plan: TestSignals, point: int | str) -> None:
    for sig in plan.get(point, ()):
        os.kill(os.getpid(), sig)


class StopSignals:
    """While active, SIGINT and SIGTERM set ``received`` instead of killing the run, so the loop can
    finish its step and checkpoint. A second signal of either kind stops at once (KeyboardInterrupt).
    Only in the main thread (Python delivers signals nowhere else); elsewhere, or with ``active``
    false (nothing to save), it leaves the handlers alone and ``received`` stays None."""

    def __init__(self, active: bool = True) -> None:
        self.active = active
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if self.active and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __call__(self) -> bool:
        """Whether a stop signal has arrived (for loops that ask between pieces of work)."""
        return self.received is not None

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def interrupted(received: str | None, where: str, folder: str | Path | None) -> Interrupted:
    """The one-line stop message: what stopped the run, where, and the exact resume command."""
    why = f"stopped by {received or 'a signal to another rank'} {where}"
    if folder is None:
        return Interrupted(f"{why}; no run folder or checkpoints off, so nothing was saved")
    return Interrupted(f"{why}; checkpoint saved in {Path(folder) / CHECKPOINT}; resume with: "
                       f"cifar-onecycle train --resume {folder}")
