"""A stop signal while a pre-training run is being set up, before its training starts.

From then on resilience.Preemption takes SIGTERM and SIGUSR1 (a checkpoint at the next step).
Before, their default action killed the process at once, silently, while it loaded the data,
built the model or drew the augmentation picture: exit 143 without a word, and a new run folder
left holding only its lock. Here they raise instead, so the folder is removed as for any
failure before training, and the command says what happened.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

from massrl.data.loading import STOP_SIGNALS


class StoppedWhileStarting(SystemExit):
    """SystemExit(143): what a stopped run exits with (a Python caller's script too)."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(143)
        self.signal_name = signal_name


@contextlib.contextmanager
def stop_signals_raise() -> Iterator[None]:
    """SIGTERM and SIGUSR1 raise StoppedWhileStarting inside the block, where they would kill
    the process (a handler the caller installed stays theirs)."""
    if threading.current_thread() is not threading.main_thread():  # (signals: main thread only)
        yield
        return
    pid = os.getpid()

    def stop(signum: int, frame: Any) -> None:
        if os.getpid() != pid:  # a process forked inside the block: the default action
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise StoppedWhileStarting(signal.Signals(signum).name)

    taken = [sig for sig in STOP_SIGNALS if signal.getsignal(sig) == signal.SIG_DFL]
    for sig in taken:
        signal.signal(sig, stop)
    try:
        yield
    finally:
        for sig in taken:
            if signal.getsignal(sig) is stop:
                signal.signal(sig, signal.SIG_DFL)
