"""What goes into summary.json: a run's wall time, speed and final figures, kept by a Lightning
callback (train.pretrain writes the file)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn

from massrl.epoch_clock import EpochClock
from massrl.provenance import runtime
from massrl.run_dir import last_checkpoint

if TYPE_CHECKING:
    from massrl.config import RunConfig
    from massrl.methods import SSLMethod

KNN_METRIC = "val/knn_top1"
VAL_FIGURES = (KNN_METRIC, "val/probe_top1")  # the summary's validation figures


class RunSummary(Callback):
    """Keeps the wall time and, at the end, gathers the run's final figures for summary.json."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.start = time.perf_counter()
        self.started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.train_seconds = 0.0
        self._clock = EpochClock()
        self._images_at_start = 0
        # the last validation's figures and after how many epochs: kept in checkpoints, since a
        # resumed session may end without a validation of its own (eval.knn_every > 1)
        self.last_val: dict[str, Any] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after a checkpoint was restored: a run resumed mid-epoch starts its clock here (no
        # epoch start comes first), and counts its speed from the images seen from here on
        self._clock.start(pl_module)
        self._images_at_start = getattr(pl_module, "images_seen", 0)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._clock.start(pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = trainer.callback_metrics
        self.last_val = {name: float(metrics[name]) for name in VAL_FIGURES if name in metrics}
        if self.last_val:  # (a validation after fit counts the epochs already trained)
            after_fit = trainer.state.fn == TrainerFn.VALIDATING
            self.last_val["after_epochs"] = trainer.current_epoch + (0 if after_fit else 1)
            self.last_val["after_fit"] = after_fit

    def state_dict(self) -> dict[str, Any]:
        return {"last_val": dict(self.last_val)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_val = dict(state_dict.get("last_val", {}))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.train_seconds += self._clock.seconds(pl_module)

    def summary(self, trainer: L.Trainer, module: SSLMethod, ckpt: ModelCheckpoint | None
                ) -> dict[str, Any]:
        m = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        return {
            "name": module.cfg.run_name,
            "method": module.cfg.method,
            # (a run on pretrain(splits=...)'s datasets: its config's data.name is not them)
            "dataset": "own splits" if module.own_splits else module.cfg.data.name,
            "seed": module.cfg.seed,
            "setup": run_setup(module.cfg),
            **self.val_figures(ckpt),
            "final_loss": m.get("train/loss_epoch"),
            "epochs": trainer.current_epoch,
            "images_seen": module.images_seen,
            "skipped_files": module.skipped_files,
            "skipped_nonfinite_steps": module.skipped_nonfinite_steps,
            "train_seconds": round(self.train_seconds, 2),
            "wall_seconds": round(time.perf_counter() - self.start, 2),
            # this session's (a resumed run's last one: its times above are this session's)
            "started": self.started,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "resumed_from": os.path.abspath(trainer.ckpt_path) if trainer.ckpt_path else None,
            # (None for a session that trained no step)
            "images_per_s": (round((module.images_seen - self._images_at_start)
                                   / self.train_seconds, 1) if self.train_seconds else None),
            # (absolute, as Lightning's best_model_path: the file is read from other folders)
            "run_dir": os.path.abspath(self.run_dir),
            "last_checkpoint": str(last_checkpoint(os.path.abspath(self.run_dir))),
            "best_checkpoint": (ckpt.best_model_path or None) if ckpt is not None else None,
            "runtime": runtime(trainer, module),
        }

    def val_figures(self, ckpt: ModelCheckpoint | None) -> dict[str, Any]:
        """The summary's kNN and probe figures: the last validation's, and the best kNN, that
        of best_checkpoint (a validation after training saves no checkpoint: not counted)."""
        knn = self.last_val.get(KNN_METRIC)
        best = ckpt.best_model_score if ckpt is not None else None
        if best is None and not self.last_val.get("after_fit"):
            best = knn
        return {"knn_top1": knn, "knn_after_epochs": self.last_val.get("after_epochs"),
                "best_knn_top1": None if best is None else float(best),
                "probe_top1": self.last_val.get("val/probe_top1")}


def run_setup(cfg: RunConfig) -> dict[str, Any]:
    """The knobs runs of a sweep differ in, beside method, dataset and seed (config.yaml holds
    all of them): a table of summaries compares runs without reading their configs."""
    m, d, a = cfg.model, cfg.data, cfg.augment
    return {"backbone": m.backbone, "width": m.width, "image_size": d.image_size,
            "batch_size": d.batch_size, "subset": d.subset, "max_epochs":
            cfg.trainer.max_epochs, "optimizer": cfg.optimizer.name, "lr": cfg.optimizer.lr,
            "strategies": list(a.strategies), "view_mode": a.view_mode,
            "views_per_image": a.views_per_image}


def measure_final_model(trainer: L.Trainer, method: L.LightningModule, datamodule: Any,
                        record: RunSummary, best: ModelCheckpoint | None,
                        summary: dict[str, Any]) -> None:
    """eval.knn_every left the last epochs unmeasured: one more validation makes `summary` the
    final model's. A Ctrl-C, SIGTERM or SIGUSR1 there skips it: training is done, and its
    summary is kept without (the stop lost summary.json: a resume then had none to show)."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from massrl.loggers import quiet_lightning
    from massrl.run_dir import last_checkpoint
    from massrl.stop_signals import (
        StoppedWhileStarting,
        by_ctrl_c,
        ctrl_c_kept,
        end_launched_processes,
        stop_signals_raise,
    )

    try:
        with quiet_lightning(), ctrl_c_kept(), stop_signals_raise():
            trainer.validate(method, datamodule=datamodule, verbose=False)
        summary.update(record.val_figures(best))
    except SystemExit as exc:  # (Lightning's exit on Ctrl-C, SIGTERMException, ours)
        if not (by_ctrl_c(exc) or isinstance(exc, SIGTERMException | StoppedWhileStarting)):
            raise
        end_launched_processes(trainer)
        last = last_checkpoint(record.run_dir)
        held = ("the last one measured" if summary.get("knn_after_epochs") is not None
                else "no kNN accuracy")
        if trainer.is_global_zero:
            print(f"note: stopped in the validation after training, which was skipped: "
                  f"summary.json holds {held}; `massrl knn ckpt={last}` measures the final model",
                  file=sys.stderr)

