"""What keeps a long run alive: atomic checkpoints, resume, preemption, non-finite losses.

- Checkpoints are written to a temporary file and renamed over the old one, so a crash or a full
  disk while saving never leaves a broken `last.ckpt`.
- `resume=auto` continues the run in `output_dir` from its last checkpoint, exactly: model, EMA
  target, optimizer, scheduler, tau, the sampler's position in the epoch and the RNG states
  (resume.py: which checkpoint, and the checks that refuse a resume that would not fit).
- SIGTERM (preemption) saves a checkpoint before the process exits; on SLURM the job is requeued.
  A first Ctrl-C does the same, in a single-process or a DDP run (a second one stops at once).
- A non-finite loss stops the run with a message naming the step (unless skip_nonfinite).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, Checkpoint, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from massrl.data.loading import STOP_SIGNALS
from massrl.files import atomic_write
from massrl.finite import nonfinite_rows


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the previous one is intact."""

    exit_status = 1  # (the command's exit status: cli._failure)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN/inf beyond what the run may skip."""

    exit_status = 1


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save through `files.atomic_write`: a temporary file, fsync, then a rename."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any,
                        storage_options: Any | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with atomic_write(path) as f:
                torch.save(checkpoint, f)
        except OSError as exc:
            kept = "The previous checkpoint there is intact. " if path.exists() else ""
            raise CheckpointWriteError(
                f"could not write the checkpoint {path}: {exc.strerror or exc}. {kept}"
                "Free some space (or set output_dir on a disk with room) and continue the run "
                "with resume=auto."
            ) from exc


def rng_state() -> dict[str, Any]:
    """RNG states as tensors and plain python values, so `torch.load(weights_only=True)` (what
    Lightning uses to resume) accepts them."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # (reading it initialises
        state["cuda"] = torch.cuda.get_rng_state()  # CUDA: not before a forked launch)
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        # the GPU this process trains on (each rank's own). Older checkpoints kept every
        # visible GPU's, and a resume with fewer GPUs visible failed on the missing ones
        if isinstance(cuda, (list, tuple)):
            index = torch.cuda.current_device()
            cuda = cuda[index] if index < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)


class EpochEndCheckpoint(Checkpoint):
    """last.ckpt at every epoch end, after the epoch's validation and, as a Checkpoint callback,
    after the module's own epoch-end hook, as ModelCheckpoint saves. (Lightning 2.6's
    ModelCheckpoint(save_last=True, save_top_k=0) writes `last` only in a step with a top-k
    save, so at no epoch end: a crash could lose up to checkpoint_every_n_steps steps.)"""

    def __init__(self, last_path: Path) -> None:
        self.last_path = last_path

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            trainer.save_checkpoint(self.last_path, weights_only=False)


class RunCheckpoint(ModelCheckpoint):
    """A ModelCheckpoint that follows its run's folder when it moves. Lightning reloads its best
    score and files only from the folder it saved them in: a run resumed after its folder was
    moved or copied lost its best-kNN record (a later, worse epoch was named best). Where the
    files it recorded are in this folder, they are taken as these; a branch into a new folder
    (where they are not) starts afresh, as Lightning does."""

    @property
    def state_key(self) -> str:
        # Lightning's own class name, under which checkpoints of earlier runs hold the state
        # (its key starts with the class's name: under ours, a resume found none)
        key = super().state_key
        return key.replace(type(self).__qualname__, "ModelCheckpoint", 1) \
            if type(self) is RunCheckpoint else key

    @property
    def _legacy_state_key(self) -> str:  # type: ignore[override]
        # the key under our own name, which checkpoints saved for a while held the state under:
        # Lightning looks there when the state key finds nothing
        return super().state_key

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("dirpath")
        if saved and self.dirpath and os.path.abspath(saved) != os.path.abspath(self.dirpath):
            state_dict = _rebased(state_dict, saved, self.dirpath) or state_dict
        super().load_state_dict(state_dict)


def _rebased(state: dict[str, Any], old: str, new: str) -> dict[str, Any] | None:
    """`state` with the paths under `old` moved to `new`; None unless each of those it names
    is there."""
    def moved(path: Any) -> Any:
        if not isinstance(path, str) or not path or \
                os.path.dirname(os.path.abspath(path)) != os.path.abspath(old):
            return path
        return os.path.join(new, os.path.basename(path))

    files = [p for p in (state.get("best_model_path"), *(state.get("best_k_models") or {}))
             if isinstance(p, str) and p]
    if not files or not all(os.path.isfile(moved(p)) for p in files):
        return None
    out = dict(state, dirpath=new)
    for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
        out[key] = moved(state.get(key))
    out["best_k_models"] = {moved(p): v for p, v in (state.get("best_k_models") or {}).items()}
    return out


class StepCheckpoint(RunCheckpoint):
    """last.ckpt every N optimizer steps. Lightning's ModelCheckpoint also writes `last` when
    training ends, after EpochEndCheckpoint has just written the same state: a second full
    write (twice the room on a nearly full disk, where it failed the finished run)."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pass


class Preemption(Callback):
    """On SIGTERM (or SLURM's `--signal=USR1@N`): stop at the end of the next optimizer step,
    save last.ckpt there so the run continues exactly with resume=auto, and on SLURM ask for the
    job to be requeued.

    Lightning's own SIGTERM handler runs a collective inside the handler: in DDP, with every
    process signalled (a job scheduler, `timeout`, a killed process group) it met another
    collective and the run hung until the wall time. Here a signal only raises a flag, and the
    ranks agree on it (one all-reduce) at each point where all of them may stop: the end of an
    optimizer step (they save there and stop); at an epoch's last step, after the epoch's
    validation, with the epoch-end checkpoint; and after each validation batch (promptly, within
    a scheduler's grace time: the last checkpoint is kept, and the resumed run repeats the steps
    since it, seeded the same). At the run's last step or in its last validation the run
    finishes: training is done."""

    def __init__(self, last_path: Path) -> None:
        self.last_path = last_path
        self.saved = False
        self.by_ctrl_c = False
        self.signalled = False
        self.started = False  # (its handlers are in place: stop_signals.py's are not)
        self._at_epoch_end = False  # agreed at an epoch's last step: stop once it is saved
        self.signal_name = "SIGTERM"
        self._signum = 0  # the signal this process got (0: none)
        self._trainer: L.Trainer | None = None
        self._handlers: dict[int, Any] = {}  # the handlers to put back

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        self._pid, self._trainer, self.started = os.getpid(), trainer, True
        for sig in STOP_SIGNALS:
            self._handlers[sig] = signal.signal(sig, self._on_signal)
        # Lightning answers Ctrl-C by exiting mid-step with nothing saved: the first one stops
        # the run at the next step boundary, with last.ckpt saved (under DDP each rank gets it at
        # its own point; they agree on the step as for SIGTERM)
        self._handlers[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_ctrl_c)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:  # a DataLoader worker forked with this handler
            return
        if not self.signalled and self._trainer is not None:
            launcher = self._trainer.strategy.launcher  # the processes Lightning started
            if launcher is not None:
                launcher.kill(signal.SIGTERM)
        if not self.signalled:
            self.signal_name = signal.Signals(signum).name
        self.signalled = True
        self._signum = self._signum or int(signum)

    def _on_ctrl_c(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:
            return
        if self.by_ctrl_c:  # the second one: stop at once
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.by_ctrl_c = True
        if self._trainer is None or self._trainer.global_rank == 0:  # (said once)
            print("\nCtrl-C: stopping after this step (Ctrl-C again stops at once, without "
                  "saving)", file=sys.stderr, flush=True)
        self._on_signal(signum, frame)

    def _agreed(self, trainer: L.Trainer, pl_module: L.LightningModule) -> bool:
        """Whether any rank was signalled: every rank stops at the same point, or none does (and
        names the signal a rank got: the one that prints may not have been signalled)."""
        signum = self._signum
        if trainer.world_size > 1:
            flag = torch.tensor([signum], device=pl_module.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            signum = int(flag.item())
        if signum and not self.by_ctrl_c:
            self.signal_name = signal.Signals(signum).name
        return bool(signum)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           *args: Any) -> None:
        ready = trainer.fit_loop.epoch_loop.batch_progress.current.ready
        last_of_epoch = ready >= trainer.num_training_batches
        if ready % trainer.accumulate_grad_batches and not last_of_epoch:  # inside a window
            return
        if not self._agreed(trainer, pl_module):
            return
        if last_of_epoch:  # Lightning runs the validation first, which a resume would skip
            self._at_epoch_end = True
            return
        if _max_steps_reached(trainer):  # the run's last step: it finishes
            return
        # saved at the step's end, as a step checkpoint; Lightning then raises
        trainer.save_checkpoint(self.last_path, weights_only=False)
        self.saved = True
        trainer._signal_connector.received_sigterm = True

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                *args: Any) -> None:
        if trainer.state.fn != "fit" or self._at_epoch_end or _run_ends_here(trainer):
            return  # (the last epoch's validation: training is done, the run finishes)
        if self._agreed(trainer, pl_module):  # Lightning stops after this batch
            trainer._signal_connector.received_sigterm = True

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # agreed at the epoch's last step, or at its validation's last batch (where Lightning
        # does not stop)
        if not (self._at_epoch_end or trainer.received_sigterm):
            return
        if _run_ends_here(trainer):  # the run's last epoch: it finishes
            self._at_epoch_end = trainer._signal_connector.received_sigterm = False
            return
        # the epoch-end checkpoint is written in this round of hooks; then Lightning raises
        self.saved = True
        trainer._signal_connector.received_sigterm = True

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # (Lightning may have put the process's own handlers back already: those stay)
        for sig, handler in self._handlers.items():
            if handler is not None and signal.getsignal(sig) in (self._on_signal,
                                                                  self._on_ctrl_c):
                signal.signal(sig, handler)
        self._handlers = {}

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule,
                     exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != "fit":
            return  # (the validation after training: run_summary.measure_final_model)
        why = None if self.saved else _not_resumable_here(trainer)
        if why is None and not self.saved:
            trainer.save_checkpoint(self.last_path, weights_only=False)
            self.saved = True
        name = "Ctrl-C" if self.by_ctrl_c else self.signal_name
        if trainer.is_global_zero:
            kept = ("last.ckpt is kept as it was; the resumed run repeats the steps since it "
                    "was saved") if self.last_path.is_file() else \
                "no checkpoint yet: the resumed run starts again from the beginning"
            print(f"{name}: last.ckpt saved at optimizer step {trainer.global_step}" if why is None
                  else f"{name} {why}: {kept}")
        job = os.environ.get("SLURM_JOB_ID")
        if job and trainer.is_global_zero:
            try:
                result = subprocess.run(["scontrol", "requeue", job], capture_output=True,
                                        text=True)
                why = result.stderr.strip() if result.returncode else None
            except OSError as exc:  # (no scontrol inside a container, for one)
                why = f"{exc.strerror}: scontrol"
            print(f"could not requeue SLURM job {job} ({why}): submit it again to continue"
                  if why else f"requeued SLURM job {job}")


def _max_steps_reached(trainer: L.Trainer) -> bool:
    return 0 < (trainer.max_steps or 0) <= trainer.global_step


def _run_ends_here(trainer: L.Trainer) -> bool:
    """Whether the epoch whose last step just ran is the run's last (or max_steps is reached)."""
    return _max_steps_reached(trainer) or 0 < (trainer.max_epochs or 0) <= trainer.current_epoch + 1


def _not_resumable_here(trainer: L.Trainer) -> str | None:
    """Why a checkpoint written now would not continue the run exactly (None: it would)."""
    if trainer.validating:
        return "during validation"
    ready, window = trainer.fit_loop.epoch_loop.batch_progress.current.ready, \
        trainer.accumulate_grad_batches
    if ready % window:
        return f"inside a window of trainer.accumulate_grad_batches={window}"
    return None


def check_finite(loss: torch.Tensor, step: int, epoch: int, skip: bool) -> bool:
    """True when the loss may be used; raises NonFiniteLossError unless `skip`. `epoch`:
    counted from 1, as the progress lines count them."""
    if bool(torch.isfinite(loss)):
        return True
    return _non_finite(f"the loss became {loss.item()}", step, epoch, skip)


def gradients_finite(groups: tuple[list[torch.Tensor], ...]) -> tuple[bool, ...]:
    """Whether every value of each group of gradients is finite, with one wait for the device."""
    device = next((g.device for grads in groups for g in grads), torch.device("cpu"))
    flags = []
    for grads in groups:
        grads = [g for g in grads if g.numel()]  # (the infinity norm of an empty tensor raises)
        # (the largest |value| of each tensor: a norm of large finite values could overflow)
        peaks = torch._foreach_norm(grads, float("inf")) if grads else []
        flags.append(torch.stack([p.float() for p in peaks]).isfinite().all() if peaks
                     else torch.ones((), dtype=torch.bool, device=device))
    return tuple(torch.stack(flags).tolist())


def check_finite_gradient(finite: bool, step: int, epoch: int, skip: bool) -> bool:
    """As check_finite, for the gradient of a finite loss (the step would make the weights NaN,
    and the next loss would only say so after a checkpoint may have kept them)."""
    if finite:
        return True
    return _non_finite("the loss was finite but its gradient became NaN/inf", step, epoch, skip)


USUAL_FIXES = ("Usual fixes: a lower optimizer.lr, trainer.precision=32-true, "
               "trainer.gradient_clip_val=1.0, a longer optimizer.warmup_epochs")


def _non_finite(what: str, step: int, epoch: int, skip: bool) -> bool:
    if skip:
        return False
    raise NonFiniteLossError(
        f"{what} at optimizer step {step} (epoch {epoch}). The run stopped "
        f"(checkpoints saved before this step are kept). {USUAL_FIXES}; or "
        "trainer.skip_nonfinite=true to skip such steps."
    )


def check_validation_features(features: list[torch.Tensor], epoch: int, step: int, *,
                              after_fit: bool = False, saved_by_step: bool = False,
                              best_saved: bool = True) -> None:
    """NonFiniteLossError when the validation's features hold NaN/inf: finite weights (each
    step's gradient was) can still overflow the forward pass, and the epoch's checkpoints,
    'best' among them for a kNN of 0 %, were saved from such a model. `after_fit`: the
    validation after training, whose model last.ckpt holds already; `saved_by_step`:
    trainer.checkpoint_every_n_steps may have saved it since the last validation."""
    bad = sum(nonfinite_rows(f) for f in features)
    if not bad:
        return
    if after_fit:
        kept = "checkpoints/last.ckpt holds this final model" + (
            "; the best-kNN checkpoint holds an earlier one" if best_saved else "")
    else:
        kept = "The run stopped without saving this epoch's checkpoints" + (
            " (one saved by trainer.checkpoint_every_n_steps since the last validation may hold "
            "this model: branch from the best-kNN one, resume=<it> output_dir=<new folder>)"
            if saved_by_step else "")
    when = "after training" if after_fit else f"after epoch {epoch}"
    raise NonFiniteLossError(
        f"the model's features became NaN/inf in the validation {when} (optimizer step {step}), "
        f"for {bad} of {sum(len(f) for f in features)} images. {kept}. {USUAL_FIXES}.")
