"""Pre-training as a library call: `pretrain(cfg)` builds data, method and Trainer, fits, and
writes the run directory (config.yaml, checkpoints, metrics.csv, TensorBoard logs, the
augmentation picture and summary.json)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from lightning.fabric.plugins.environments import LightningEnvironment
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback, RichProgressBar
from lightning.pytorch.utilities import rank_zero_only

from massrl import plugins
from massrl.augment.views import sparse_pairs_note
from massrl.caller_state import callers_process_kept
from massrl.config import ConfigError, RunConfig, to_yaml
from massrl.config.schema import check_training_data, check_training_settings
from massrl.data.folder import check_headers
from massrl.devices import (
    augment_backend,
    auto_backend_note,
    check_accelerator,
    refuse_launch_from_inside,
    resolve_precision,
    run_num_workers,
    trains_on_cpu,
    usable_cores,
    use_channels_last,
    use_sync_batchnorm,
)
from massrl.extras import check_run_extras
from massrl.files import json_text, write_text
from massrl.loggers import (
    build_loggers,
    finish_loggers,
    hide_lightning_adverts,
    progress_callbacks,
)
from massrl.memory import retain_freed_memory
from massrl.methods import SSLMethod, build_method
from massrl.models.backbones import check_input_size
from massrl.optim import warmup_note
from massrl.provenance import code_change_note, running_commit
from massrl.resilience import (
    AtomicCheckpointIO,
    EpochEndCheckpoint,
    Preemption,
    RunCheckpoint,
    StepCheckpoint,
)
from massrl.resume import (
    check_resume_compatible,
    check_resume_fits,
    check_same_world_size,
    epochs_done,
    find_resume_checkpoint,
)
from massrl.run_dir import (
    finished_already,
    keep_previous_record,
    last_checkpoint,
    make_run_dir,
    refuse_a_used_folder,
    remove_new_run_dir,
    run_lock,
)
from massrl.run_summary import KNN_METRIC, RunSummary, measure_final_model
from massrl.stop_signals import fit, stop_signals_raise

if TYPE_CHECKING:
    from massrl.data import DatasetSplits, SSLDataModule

def set_cpu_threads(cfg: RunConfig) -> None:
    """On a CPU run, leave one core to each DataLoader worker (or use trainer.cpu_threads).

    torch's threads meet at a barrier after every operation: when another process takes one of
    their cores, the whole step waits for the descheduled thread. Measured here on 2 cores kept
    busy by other processes, a width-16 BYOL step at batch 256: 2 threads 9.6 images/s, 1 thread
    52 images/s.
    """
    if not trains_on_cpu(cfg.trainer.accelerator):
        return
    workers = run_num_workers(cfg)
    if cfg.trainer.cpu_threads:
        torch.set_num_threads(cfg.trainer.cpu_threads)
    elif workers > 0:
        torch.set_num_threads(max(1, usable_cores() - workers))


def build_trainer(cfg: RunConfig, run_dir: Path, has_labels: bool,
                  resumed_step: int | None = None) -> tuple[L.Trainer, dict]:
    t = cfg.trainer
    ckpt_dir = run_dir / "checkpoints"
    # last.ckpt at every epoch end, every N optimizer steps and on a stop (written atomically),
    # by three callbacks writing the same file: with the version counter a ModelCheckpoint
    # would keep its own (last-v1.ckpt), and resume=auto would read whichever came first
    last = last_checkpoint(run_dir)
    callbacks: list[Callback] = [Preemption(last)]
    if t.checkpoint_every_n_steps:
        callbacks.append(StepCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0,
                                        every_n_train_steps=t.checkpoint_every_n_steps,
                                        enable_version_counter=False))
    best = None
    if has_labels and cfg.eval.knn_every:
        best = RunCheckpoint(dirpath=ckpt_dir, monitor=KNN_METRIC, mode="max", save_top_k=1,
                             filename="best-knn-{epoch}", auto_insert_metric_name=False)
        callbacks.append(best)
    if t.keep_every_n_epochs:
        callbacks.append(RunCheckpoint(
            dirpath=ckpt_dir, filename="epoch-{epoch}", auto_insert_metric_name=False,
            every_n_epochs=t.keep_every_n_epochs, save_top_k=-1, enable_version_counter=False))
    # after `best` (checkpoint callbacks run in this order at the epoch end): the epoch's
    # last.ckpt then holds the best score so far, which a resumed run must beat
    callbacks.append(EpochEndCheckpoint(last))
    summary = RunSummary(run_dir)
    callbacks.append(summary)
    callbacks += progress_callbacks(t.progress_bar)
    loggers = build_loggers(cfg, run_dir, resumed_step)
    hide_lightning_adverts()
    try:
        trainer = _trainer(cfg, run_dir, has_labels, callbacks, loggers)
    except (MisconfigurationException, TypeError, ValueError, ImportError) as exc:
        # (ImportError: an accelerator whose package is missing, e.g. tpu without torch_xla)
        if not isinstance(exc, (MisconfigurationException, ImportError)) and not any(
                key in str(exc) for key in ("accelerator", "devices", "strategy", "num_nodes")):
            raise  # (not the settings Lightning refuses: a bug to see whole)
        raise ConfigError(f"Lightning cannot run trainer.accelerator={t.accelerator} "
                          f"trainer.devices={t.devices} trainer.strategy={t.strategy} "
                          f"trainer.num_nodes={t.num_nodes} here: {exc}") from None
    refuse_launch_from_inside(trainer, t.strategy)
    _check_launch(trainer, t.devices, t.num_nodes)
    return trainer, {"summary": summary, "best": best, "preemption": callbacks[0]}


def _check_launch(trainer: L.Trainer, devices: Any, num_nodes: int) -> None:
    """Processes per machine and machines as SLURM or torchrun started them, checked before the
    run directory is written (Lightning checks when training starts, with a traceback)."""
    env = getattr(trainer.strategy, "cluster_environment", None)
    if env is None:
        return
    launch = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "WORLD_SIZE")  # (node 0 needs no addr)
    if num_nodes > 1 and isinstance(env, LightningEnvironment) and \
            not any(v in os.environ for v in launch):
        raise ConfigError(f"trainer.num_nodes={num_nodes} needs the command started on each "
                          "machine, by srun (SLURM), torchrun --nnodes, or with MASTER_ADDR, "
                          "MASTER_PORT and NODE_RANK set on each (docs/distributed.md): started "
                          "alone it waits for the other machines forever")
    try:
        env.validate_settings(num_devices=trainer.num_devices, num_nodes=trainer.num_nodes)
    except ValueError as exc:
        raise ConfigError(f"trainer.devices={devices} trainer.num_nodes={num_nodes} do not match "
                          f"how the processes were started: {exc}") from None


def _trainer(cfg: RunConfig, run_dir: Path, has_labels: bool, callbacks: list,
             loggers: list) -> L.Trainer:
    t = cfg.trainer
    return L.Trainer(
        default_root_dir=run_dir,
        max_epochs=t.max_epochs,
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=resolve_precision(t.precision, t.accelerator, t.strategy),
        accumulate_grad_batches=t.accumulate_grad_batches,
        sync_batchnorm=use_sync_batchnorm(t.sync_batchnorm, t.accelerator),
        gradient_clip_val=t.gradient_clip_val,
        log_every_n_steps=t.log_every_n_steps,
        limit_train_batches=t.limit_train_batches,
        check_val_every_n_epoch=cfg.eval.knn_every or 1,
        # None = all batches (Lightning announces an explicit 1.0 with a line of its own)
        limit_val_batches=None if has_labels and cfg.eval.knn_every else 0,
        num_sanity_val_steps=0,
        enable_progress_bar=any(isinstance(c, RichProgressBar) for c in callbacks),
        callbacks=callbacks,
        logger=loggers,
        enable_model_summary=False,
        plugins=[AtomicCheckpointIO(), *_slurm_without_auto_requeue()],
    )


def _slurm_without_auto_requeue() -> list:
    """Under SLURM, Lightning's own requeue off: its SIGUSR1 handler saved an hpc_ckpt file
    that a later start restored without massrl's resume checks. Preemption handles SIGUSR1 and
    SIGTERM alike. Not for torchrun inside a SLURM job, whose environment Lightning picks first
    (given SLURM's, the ranks would be wrong)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    if SLURMEnvironment.detect() and not TorchElasticEnvironment.detect():
        return [SLURMEnvironment(auto_requeue=False)]
    return []


def build_datamodule(cfg: RunConfig, splits: DatasetSplits | None = None) -> SSLDataModule:
    """The datamodule (of `splits`, datasets of one's own, when given), set up, with the
    view-making transform of the configured backend."""
    from massrl.data import SSLDataModule

    dm = SSLDataModule(cfg, splits=splits)
    dm.setup("fit")
    dm.train_transform = dm.default_train_transform()
    return dm


def check_one_batch(dm, cfg: RunConfig, world_size: int) -> None:
    """Stop before training when the split cannot fill one batch per device: Lightning would
    train nothing and finish as if all went well; nor a global batch the method cannot train
    on (SimCLR's needs negatives)."""
    from massrl.methods import METHODS

    METHODS[cfg.method].check_global_batch(cfg, cfg.data.batch_size * world_size)
    dm.check_fills_a_batch(world_size)


def pretrain(cfg: RunConfig, run_dir: Path | None = None, *, splits: DatasetSplits | None = None
             ) -> dict[str, Any]:
    """Run one pre-training job and return its summary (also written to summary.json).

    `splits`: datasets of one's own (massrl.data.DatasetSplits), used as given instead of the
    ones `cfg.data` names (the run's name and directory still follow `cfg`)."""
    with callers_process_kept(), contextlib.ExitStack() as held:  # (held: the run's lock)
        return _pretrain(cfg, run_dir, held, splits)


def _pretrain(cfg: RunConfig, run_dir: Path | None, held: contextlib.ExitStack,
              splits: DatasetSplits | None) -> dict[str, Any]:
    check_accelerator(cfg.trainer.accelerator)
    check_training_settings(cfg)
    check_run_extras(cfg)
    cfg = plugins.record_imported(cfg)
    running_commit()  # (asked now: the code as the run starts, not as at its first save)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    set_cpu_threads(cfg)
    if cfg.trainer.retain_freed_memory:
        retain_freed_memory()
    if cfg.data.num_workers == "auto":
        print(f"data.num_workers=auto: {run_num_workers(cfg)} DataLoader workers on this machine")
    if note := auto_backend_note(cfg):
        print(note)
    if cfg.resume == "auto" and not cfg.output_dir and run_dir is None:
        raise ConfigError("resume=auto needs output_dir=DIR: the run directory to continue")
    new_folder = None  # (a run that stops before training leaves no folder of its own)
    if run_dir is None:
        run_dir, new_folder = make_run_dir(cfg)
    # (refused: the directory is another running run's, and stays as it is)
    held.enter_context(run_lock(run_dir, rank_zero_only.rank))
    try:
        with stop_signals_raise():  # (Preemption takes them once training starts)
            started = _start(cfg, run_dir, splits)
    except BaseException:
        remove_new_run_dir(run_dir.resolve(), new_folder)
        raise
    if isinstance(started, dict):  # a finished run: nothing to train
        return started
    resume_from, resumed_step, dm, method, trainer, parts = started
    if rank_zero_only.rank == 0:  # (once the run is sure to train)
        if resume_from is not None:
            keep_previous_record(run_dir, resumed_step, to_yaml(cfg))
        write_text(run_dir / "config.yaml", to_yaml(cfg))
    fit(trainer, method, dm, resume_from, run_dir, new_folder, parts["preemption"])
    summary = parts["summary"].summary(trainer, method, parts["best"])
    if dm.has_labels and cfg.eval.knn_every and \
            parts["summary"].last_val.get("after_epochs") != trainer.current_epoch:
        measure_final_model(trainer, method, dm, parts["summary"], parts["best"], summary)
    if trainer.is_global_zero:
        write_text(run_dir / "summary.json", json_text(summary, indent=2) + "\n")
    finish_loggers(trainer.loggers, summary)
    return summary


def _start(cfg: RunConfig, run_dir: Path, splits: DatasetSplits | None
           ) -> dict[str, Any] | tuple:
    """The checkpoint to resume from and what `_prepare` builds, or the summary of a run that
    has nothing left to train."""
    resume_from = find_resume_checkpoint(cfg, run_dir)
    holds_a_run = last_checkpoint(run_dir).is_file()
    if cfg.resume is None or resume_from is None:  # (resume=auto with nothing to resume)
        refuse_a_used_folder(run_dir, holds_a_run)
    saved_world = resumed_step = None
    if resume_from is not None:
        ckpt = check_resume_compatible(cfg, resume_from)
        if (ckpt.get("massrl") or {}).get("own_splits") and splits is None:
            raise ConfigError(f"cannot resume from {resume_from}: it trained on datasets given "
                              "to pretrain(cfg, splits=...) from Python, which its config does "
                              "not name (it would go on with data.name's). Continue it from "
                              "Python with the same splits and resume=auto")
        check_training_data(cfg, (ckpt.get("hyper_parameters") or {}).get("config"))
        inside = _inside(resume_from, run_dir)
        if (holds_a_run or (run_dir / "summary.json").is_file()) and not inside:
            # (its checkpoints, metrics and summary would be overwritten by another run's)
            raise ConfigError(f"output_dir {run_dir} already holds a run, and resume="
                              f"{cfg.resume} is another run's checkpoint: continue that one "
                              "into a new output_dir, or this one with resume=auto")
        last = last_checkpoint(run_dir)
        if holds_a_run and os.path.abspath(resume_from) != os.path.abspath(last) and \
                Path(resume_from).resolve() != last.resolve():
            raise ConfigError(f"resume={cfg.resume} is another checkpoint of the run in "
                              f"{run_dir}: continued there it would replace the run's later "
                              "checkpoints, metrics and summary. Branch off into a new folder "
                              "(output_dir=DIR), or continue the run with resume=auto")
        done, saved_world = epochs_done(ckpt), ckpt.get("massrl", {}).get("world_size")
        resumed_step = ckpt.get("global_step", 0)
        if done >= cfg.trainer.max_epochs:
            return finished_already(cfg, run_dir, resume_from, done)
        print(f"resuming from {resume_from} ({done} of {cfg.trainer.max_epochs} epochs done)")
        if note := code_change_note(ckpt):
            print(note)
        if not inside:
            # (Lightning's own warning on it names two paths and an attribute)
            print(f"note: a branch of that run into {run_dir}: its best-kNN checkpoint is "
                  "chosen afresh among this run's epochs")
    else:
        if cfg.resume == "auto":
            print(f"resume=auto: no checkpoint in {run_dir} yet, starting the run")
        check_training_data(cfg, None)
    dm, method, trainer, parts = _prepare(cfg, run_dir, resumed_step, splits)
    if resume_from is not None:
        check_resume_fits(ckpt, method, resume_from)
        del ckpt  # (a large model's tensors: not held through training)
    if saved_world is not None:
        check_same_world_size(resume_from, saved_world, trainer.world_size)
    return resume_from, resumed_step, dm, method, trainer, parts


def _prepare(cfg: RunConfig, run_dir: Path, resumed_step: int | None,
             splits: DatasetSplits | None
             ) -> tuple[Any, SSLMethod, L.Trainer, dict]:
    """Everything before training: data, method, Trainer, and the checks that stop a run
    which could not train."""
    for note in (sparse_pairs_note(cfg.augment),
                 warmup_note(cfg.optimizer.warmup_epochs, cfg.trainer.max_epochs)):
        if note:
            print(note)
    if cfg.augment.compile and augment_backend(cfg) == "per_image":
        print("augment.compile applies to augment.backend=batched: the per-image pipeline "
              "runs uncompiled")
    dm = build_datamodule(cfg, splits)
    if cfg.data.strict and dm.has_labels and cfg.eval.knn_every:
        check_headers(dm.splits.test)  # (else found by the first validation, an epoch later)
    if rank_zero_only.rank == 0:
        from massrl.augviz import save_augmentation_picture

        save_augmentation_picture(cfg, run_dir / "augmentations.png", dm.splits)
    method = build_method(cfg, num_classes=dm.num_classes,
                          strategy_names=list(cfg.augment.strategies))
    ignored = method.ignored_settings(cfg)
    if ignored:
        print(f"note: {' '.join(ignored)} set, but method={cfg.method} does not use "
              f"{'it' if len(ignored) == 1 else 'them'}")
    method.use_data(dm.splits)
    method.own_splits = splits is not None
    check_input_size(method.backbone, cfg.model.backbone, cfg.data.image_size)
    method.channels_last = use_channels_last(cfg.trainer.channels_last, cfg.trainer.accelerator,
                                             method)
    if method.channels_last:
        method = method.to(memory_format=torch.channels_last)
    trainer, parts = build_trainer(cfg, run_dir, dm.has_labels, resumed_step)
    check_one_batch(dm, cfg, trainer.world_size)
    if cfg.trainer.compile:
        compile_encoders(method)
    return dm, method, trainer, parts


def _inside(path: str | Path, run_dir: Path) -> bool:
    """Whether `path` is in the run's folder, as spelt (its checkpoints/ may be a link to
    another disk: resolved, they would be elsewhere) or resolved (the folder reached through
    a link)."""
    spelt = Path(os.path.abspath(path)).is_relative_to(os.path.abspath(run_dir))
    return spelt or Path(path).resolve().is_relative_to(run_dir.resolve())


def compile_encoders(method: SSLMethod) -> None:
    """trainer.compile: the encoders carry the compute; compiling them in place keeps the
    checkpoint keys plain and leaves the data-dependent loss bookkeeping in eager mode."""
    for name in method.ENCODERS:
        getattr(method, name).compile()
