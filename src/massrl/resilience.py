"""What keeps a long run alive: atomic checkpoints, resume, preemption, non-finite losses.

- Checkpoints are written to a temporary file and renamed over the old one, so a crash or a full
  disk while saving never leaves a broken `last.ckpt`.
- `resume=auto` continues the run in `output_dir` from its last checkpoint, exactly: model, EMA
  target, optimizer, scheduler, tau, the sampler's position in the epoch and the RNG states.
- SIGTERM (preemption) saves a checkpoint before the process exits; on SLURM the job is requeued.
  A first Ctrl-C in a single-process run does the same (a second one stops at once).
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
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException

from massrl.config import ConfigError, RunConfig, dotted_items, root_path
from massrl.files import atomic_write
from massrl.run_dir import own_config_option

# what cannot change when a run is resumed: the checkpoint's tensors would not fit, the run
# would silently become another experiment (the seed draws the subset and the views), the
# optimizer's state would not fit, or (the global batch) the lr schedule and each process's
# place in the epoch would no longer match (the process count is checked apart)
FROZEN_KEYS = ("method", "seed", "data.name", "data.root", "data.subset", "data.image_size",
               "data.batch_size", "trainer.accumulate_grad_batches", "optimizer.name",
               "model.backbone", "model.cifar_stem", "model.width", "model.kwargs",
               "model.proj_hidden_dim", "model.proj_output_dim", "model.pred_hidden_dim")


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the previous one is intact."""


class NonFiniteLossError(RuntimeError):
    pass


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
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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


class StepCheckpoint(ModelCheckpoint):
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
    collective and the run hung until the wall time. Here a signal only raises a flag; at the end
    of each optimizer step the ranks agree (one all-reduce), all save there and stop. A signal
    during the epoch's validation stops the run after the current validation batch (promptly,
    within a scheduler's grace time), keeping the last checkpoint: the resumed run repeats the
    steps since it, seeded the same. One at an epoch's last step lets its validation run and
    stops after the next epoch's first step (the run's last step: the run finishes)."""

    def __init__(self, last_path: Path) -> None:
        self.last_path = last_path
        self.saved = False
        self.by_ctrl_c = False
        self.signalled = False
        self._trainer: L.Trainer | None = None
        self._handlers: dict[int, Any] = {}  # the handlers to put back

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        self._pid, self._trainer = os.getpid(), trainer
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            self._handlers[sig] = signal.signal(sig, self._on_signal)
        # Lightning answers Ctrl-C by exiting mid-step with nothing saved: in one process (in
        # DDP every rank gets the Ctrl-C at its own point) the first one stops the run at the
        # next step boundary, with last.ckpt saved
        if trainer.world_size == 1:
            self._handlers[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_ctrl_c)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:  # a DataLoader worker forked with this handler
            return
        trainer = self._trainer
        if not self.signalled and trainer is not None:
            launcher = trainer.strategy.launcher  # the processes Lightning started
            if launcher is not None:
                launcher.kill(signal.SIGTERM)
        self.signalled = True
        if trainer is not None and trainer.validating:  # Lightning stops after this batch
            trainer._signal_connector.received_sigterm = True

    def _on_ctrl_c(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:
            return
        if self.by_ctrl_c:  # the second one: stop at once
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.by_ctrl_c = True
        print("\nCtrl-C: stopping after this step (Ctrl-C again stops at once, without saving)",
              file=sys.stderr, flush=True)
        self._on_signal(signum, frame)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           *args: Any) -> None:
        ready = trainer.fit_loop.epoch_loop.batch_progress.current.ready
        # not inside a window, nor at an epoch's last step: Lightning would run the validation
        # before it stops, and a resumed run would skip it (the next epoch's first step will do)
        if ready % trainer.accumulate_grad_batches or ready >= trainer.num_training_batches:
            return
        stop = self.signalled
        if trainer.world_size > 1:  # every rank stops at the same step, or none does
            flag = torch.tensor([float(stop)], device=pl_module.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            stop = bool(flag.item())
        if stop:  # saved at the step's end, as a step checkpoint; Lightning then raises
            trainer.save_checkpoint(self.last_path, weights_only=False)
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
        if not isinstance(exception, SIGTERMException):
            return
        why = None if self.saved else _not_resumable_here(trainer)
        if why is None and not self.saved:
            trainer.save_checkpoint(self.last_path, weights_only=False)
            self.saved = True
        name = "Ctrl-C" if self.by_ctrl_c else "SIGTERM"
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
    if skip:
        return False
    raise NonFiniteLossError(
        f"the loss became {loss.item()} at optimizer step {step} (epoch {epoch}). The run stopped "
        "(checkpoints saved before this step are kept). Usual fixes: a lower optimizer.lr, "
        "trainer.precision=32-true, trainer.gradient_clip_val=1.0, a longer "
        "optimizer.warmup_epochs; or trainer.skip_nonfinite=true to skip such steps."
    )


def _unused_keys(*methods: str | None) -> set[str]:
    """Keys either method does not read: their change is no change of the model (SimCLR's
    predictor width)."""
    from massrl.methods import METHODS

    return {k for m in methods if m in METHODS for k in METHODS[m].UNUSED_KEYS}


def _comparable(key: str, value: Any, tree: dict) -> Any:
    """data.root as the folder it names, the dataset's default for none (resolved from here:
    resume from where the run started, or give the root absolute)."""
    if key != "data.root" or not (value is None or isinstance(value, str)):
        return value
    return root_path(value, _get(tree, "data.name"))


def _get(tree: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree.get(part, {}) if isinstance(tree, dict) else {}
    return tree


def check_same_world_size(ckpt_path: Path, saved: int, now: int) -> None:
    """Refuse to resume with another number of processes: the global batch, the lr it scales
    and each process's place in the epoch would all change mid-run."""
    if saved != now:
        raise ConfigError(
            f"cannot resume from {ckpt_path}: it was trained by {saved} process(es), and this "
            f"run has {now} (trainer.devices x trainer.num_nodes, or the torchrun / srun process "
            "count). The global batch, its learning rate and each process's place in the epoch "
            f"would change mid-run: resume with {saved} process(es).")


def find_resume_checkpoint(cfg: RunConfig, run_dir: Path) -> Path | None:
    """The checkpoint to continue from: None for a fresh run."""
    if cfg.resume is None:
        return None
    if cfg.resume == "auto":
        last = run_dir / "checkpoints" / "last.ckpt"
        if last.is_file():
            return last
        others = sorted(last.parent.glob("*.ckpt"))
        if others:  # (last.ckpt could not be written: a full disk) the run is not to start over
            raise ConfigError(
                f"resume=auto: {last.parent} holds no last.ckpt but {others[-1].name}: continue "
                f"from it with resume={others[-1]}, or start afresh in another output_dir")
        return None
    path = Path(cfg.resume)
    if not path.exists():
        raise ConfigError(f"resume={cfg.resume}: no such checkpoint file. Use resume=auto with "
                          "output_dir=DIR to continue the run in DIR.")
    return path


def check_resume_compatible(cfg: RunConfig, ckpt_path: Path) -> dict:
    """Refuse to resume from a file that is not a massrl checkpoint, or with a config that
    changed what cannot change mid-run. Returns the checkpoint."""
    from massrl.eval.checkpoint import read_checkpoint

    try:
        ckpt = read_checkpoint(ckpt_path)
    except ConfigError as exc:  # (a truncated last.ckpt: a copy, or a crash outside massrl)
        others = sorted(p.name for p in Path(ckpt_path).parent.glob("*.ckpt")
                        if p.name != Path(ckpt_path).name)
        hint = (f" Continue from another checkpoint of the run with resume=PATH ("
                f"{', '.join(others)} in {Path(ckpt_path).parent})." if others else "")
        raise ConfigError(f"cannot resume: {exc}{hint}") from None
    saved = (ckpt.get("hyper_parameters") or {}).get("config")
    if saved is None:
        raise ConfigError(f"{ckpt_path} is not a massrl pre-training checkpoint: cannot resume")
    now = cfg.model_dump(mode="json")
    unused = _unused_keys(saved.get("method"), now["method"])
    changed = [f"{k}: {_get(saved, k)!r} in the checkpoint, {_get(now, k)!r} now"
               for k in FROZEN_KEYS
               if _comparable(k, _get(saved, k), saved) != _comparable(k, _get(now, k), now)
               and k not in unused]
    if changed:
        raise ConfigError(
            f"cannot resume from {ckpt_path}: the config changed what cannot change mid-run:\n  "
            + "\n  ".join(changed)
            + "\nStart a new run (another output_dir) or restore these values"
            + _own_config_hint(Path(ckpt_path)) + "."
        )
    if rank_zero_only.rank == 0:  # (said once, not by every process)
        if other := _other_changes(saved, now):
            print("note: resuming with settings changed since the checkpoint (the run's "
                  "earlier config.yaml is kept as config.before_resume_N.yaml): "
                  + "; ".join(other))
        if note := _length_change(saved, cfg):
            print(note)
    return ckpt


def _length_change(saved: dict, cfg: RunConfig) -> str | None:
    """The note for a resume that changes trainer.max_epochs: allowed (to train longer), but
    the schedules then follow another curve from here on."""
    before, after = (saved.get("trainer") or {}).get("max_epochs"), cfg.trainer.max_epochs
    if before is None or before == after:
        return None
    return (f"note: trainer.max_epochs {before} -> {after}: the lr schedule (and BYOL's tau) "
            f"now spans {after} epochs, so the lr jumps at the resumed step and the run will "
            f"not equal a {after}-epoch run from the start")


# what a resumed run is expected to change: where it runs, how long, how it reports
_RUN_KEYS = ("resume", "output_dir", "trainer.max_epochs", "trainer.progress_bar",
             "trainer.cpu_threads", "data.num_workers", "data.pin_memory",
             "data.persistent_workers")


_SAID_ELSEWHERE = (*_RUN_KEYS, *FROZEN_KEYS)


def _said_elsewhere(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in _SAID_ELSEWHERE)


def _other_changes(saved: dict, now: dict) -> list[str]:
    """The settings outside FROZEN_KEYS a resumed run changes (allowed, but said: resuming
    with a newer shipped config must not switch an augmentation off unseen). The saved config
    is read with this version's defaults for keys it did not have yet."""
    try:
        saved = RunConfig.model_validate(saved).model_dump(mode="json")
    except ValueError:  # an older layout: every newer key would read as a change
        return []
    then, new = _flat(saved), _flat(now)
    return [f"{k}: {then.get(k)!r} -> {new.get(k)!r}" for k in sorted(then.keys() | new.keys())
            if then.get(k) != new.get(k) and not _said_elsewhere(k)]


def _flat(tree: dict) -> dict[str, Any]:
    """Dotted keys of a config tree; an empty mapping adds none ({} -> {a: 1} reads as
    `x.a: None -> 1`)."""
    return {k: v for top, value in tree.items() for k, v in dotted_items(top, value) if v != {}}


def check_resume_fits(ckpt: dict, method: Any, ckpt_path: Path) -> None:
    """What FROZEN_KEYS cannot see, checked before the run directory changes (Lightning's own
    load would fail later, with config.yaml rewritten and metrics.csv moved aside): the files a
    folder's splits are drawn from, and the model's parameters (eval.probe, the number of
    classes, a plugin method's method_kwargs)."""
    problems = [*_changed_files(ckpt, method.data_files), *_changed_parameters(ckpt, method)]
    if problems:
        raise ConfigError(f"cannot resume from {ckpt_path}:\n  " + "\n  ".join(problems)
                          + "\nStart a new run (another output_dir) or restore what changed"
                          + _own_config_hint(Path(ckpt_path)) + ".")


def _changed_files(ckpt: dict, now: dict[str, Any]) -> list[str]:
    from massrl.data.folder import file_list_change

    saved = (ckpt.get("massrl") or {}).get("files") or {}  # (none in older checkpoints)
    changes = [(split, file_list_change(then, now.get(split))) for split, then in saved.items()]
    return [f"the files of the {split} split changed since the checkpoint ({change}): the run "
            "would not continue on the same images (a folder without val/ draws its held-out "
            "images from the same list, so some would have been trained on)"
            for split, change in changes if change]


def _changed_parameters(ckpt: dict, method: Any) -> list[str]:
    saved = {k: tuple(v.shape) for k, v in (ckpt.get("state_dict") or {}).items()
             if hasattr(v, "shape")}
    now = {k: tuple(v.shape) for k, v in method.state_dict().items()}
    if "probe.weight" in saved:  # the probe before its standardiser: on_load_checkpoint moves it
        for name in ("weight", "bias"):
            saved[f"probe.1.{name}"] = saved.pop(f"probe.{name}")
        saved.update({k: v for k, v in now.items() if k.startswith("probe.0.")})
    modules: dict[str, list[str]] = {}
    for key in sorted(saved.keys() | now.keys()):
        if saved.get(key) != now.get(key):
            then, new = saved.get(key), now.get(key)
            modules.setdefault(key.split(".")[0], []).append(
                "not in the checkpoint" if then is None else "not in this model" if new is None
                else f"{key} is {list(then)} in the checkpoint, {list(new)} now")
    what = {"probe": " (the online probe: eval.probe, or the number of classes)"}
    return [f"the model's '{name}' parameters differ{what.get(name, '')}: {diffs[0]}"
            for name, diffs in modules.items()]


def _own_config_hint(ckpt_path: Path) -> str:
    """The run's own config, which restores every value, when the checkpoint is in a run
    directory that has one."""
    run_dir = ckpt_path.parent.parent
    has_own = (run_dir / "config.yaml").is_file()
    return f" ({own_config_option(run_dir)} restores them all)" if has_own else ""


def epochs_done(ckpt: dict) -> int:
    """The epochs a checkpoint's run had trained through when it was saved: "processed", as an
    epoch-end save (EpochEndCheckpoint, in on_train_epoch_end) comes before Lightning counts
    the epoch "completed", and Lightning resumes such a checkpoint after that epoch."""
    progress = ckpt.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {})
    return int(progress.get("current", {}).get("processed", 0))
