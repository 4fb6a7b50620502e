"""How a pre-training run stops on a signal outside the steps resilience.Preemption handles.

- Before training (the run's setup: data, model, augmentation picture; then Lightning's: its
  setup, a checkpoint's restore): SIGTERM's and SIGUSR1's default action killed the process at
  once, silently (exit 143 without a word, a new run folder left behind, a DDP rank waiting
  forever). Here they raise, so the folder is removed as for any failure before training, and
  the command says so. run_summary.measure_final_model uses it for the validation after
  training too.
- Ctrl-C inside Lightning's fit or validate, where Preemption's handler is not (yet) installed:
  Lightning turns it into sys.exit(1) and leaves Ctrl-C ignored (SIG_IGN) for the rest of the
  process (an IPython session could no longer be interrupted). Here it is a KeyboardInterrupt
  again, and the process's own Ctrl-C handler comes back.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from massrl.data.loading import STOP_SIGNALS


class StoppedAtOnce(KeyboardInterrupt):
    """A second Ctrl-C: the run stopped mid-step; its last checkpoint is the one before."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__(str(run_dir))
        self.run_dir = run_dir


class StoppedWhileStarting(SystemExit):
    """SystemExit(143): what a stopped run exits with (a Python caller's script too)."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(143)
        self.signal_name = signal_name


@contextlib.contextmanager
def stop_signals_raise(handed_over: Callable[[], bool] = lambda: False) -> Iterator[None]:
    """SIGTERM and SIGUSR1 raise StoppedWhileStarting inside the block, where they would kill
    the process (a handler the caller installed stays theirs), until `handed_over()`: from then
    on another handler answers them (Lightning may still call this one after its own)."""
    if not _main_thread():  # (signals: main thread only)
        yield
        return
    pid = os.getpid()

    def stop(signum: int, frame: Any) -> None:
        if os.getpid() != pid:  # a process forked inside the block: the default action
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if not handed_over():
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


@contextlib.contextmanager
def ctrl_c_kept() -> Iterator[None]:
    """Puts back the process's Ctrl-C handler where Lightning left Ctrl-C ignored."""
    before = signal.getsignal(signal.SIGINT) if _main_thread() else None
    try:
        yield
    finally:
        if before is not None and signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
            signal.signal(signal.SIGINT, before)


def by_ctrl_c(exc: SystemExit) -> bool:
    """Whether a SystemExit is Lightning's answer to a KeyboardInterrupt (its sys.exit(1) in
    the `except KeyboardInterrupt` of its interrupt handling)."""
    return isinstance(exc.__context__, KeyboardInterrupt)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def name_the_stop(exc: SystemExit, run_dir: Path, preemption: Any) -> None:
    """Lightning's SIGTERMException of a run Preemption stopped, marked for the command (where,
    by which signal) and for a Python caller: it exits with the command's status, and says what
    happened (in IPython a Ctrl-C showed a bare 'SIGTERMException')."""
    exc.run_dir, exc.by_ctrl_c = run_dir, preemption.by_ctrl_c
    exc.signal_name = preemption.signal_name
    exc.code = 130 if exc.by_ctrl_c else 143
    from massrl.run_dir import last_checkpoint

    saved = last_checkpoint(run_dir).is_file()
    exc.args = (f"{'Ctrl-C' if exc.by_ctrl_c else exc.signal_name}: the run in {run_dir} "
                f"stopped{' with checkpoints/last.ckpt saved' if saved else ''}; continue it "
                f"with resume=auto output_dir={run_dir}",)


def fit(trainer: Any, method: Any, datamodule: Any, resume_from: Any, run_dir: Path,
        new_folder: Path | None, preemption: Any) -> None:
    """trainer.fit, each way it may stop said and marked (the module's doc): a signal before
    training, while Lightning sets up or restores a checkpoint, as during the run's setup."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from massrl.loggers import quiet_lightning

    with quiet_lightning(), ctrl_c_kept(), stop_signals_raise(lambda: preemption.started):
        try:
            trainer.fit(method, datamodule=datamodule, ckpt_path=resume_from)
        except SIGTERMException as exc:  # Preemption's stop: the command says how to go on
            name_the_stop(exc, run_dir, preemption)
            raise
        except StoppedWhileStarting as exc:
            exc.run_dir = run_dir
            _stopped_before_training(trainer, run_dir, new_folder)
            raise
        except SystemExit as exc:  # Lightning's exit on a Ctrl-C
            if preemption.by_ctrl_c:  # the second: nothing saved since the first
                raise StoppedAtOnce(run_dir) from None
            if not by_ctrl_c(exc):
                raise
            _stopped_before_training(trainer, run_dir, new_folder)
            raise KeyboardInterrupt from None


def _stopped_before_training(trainer: Any, run_dir: Path, new_folder: Path | None) -> None:
    """Ends the processes Lightning started (they waited for this one forever) and removes the
    run's new folder, where nothing was saved yet."""
    from massrl.run_dir import last_checkpoint, remove_new_run_dir

    end_launched_processes(trainer)
    if not last_checkpoint(run_dir).is_file():
        remove_new_run_dir(run_dir.resolve(), new_folder)


def end_launched_processes(trainer: Any) -> None:
    """SIGTERM to the processes Lightning started for the run (a signal this one alone got left
    them waiting in a collective until its connection broke)."""
    launcher = getattr(trainer.strategy, "launcher", None)
    if launcher is not None and hasattr(launcher, "kill"):
        launcher.kill(signal.SIGTERM)

