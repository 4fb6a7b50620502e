"""The run's loggers: CSV (metrics.csv) and TensorBoard always, Weights & Biases on request.

A resumed run logs to the same W&B run: its id is kept in the run directory (`wandb_run_id`).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import secrets
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, RichProgressBar
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from massrl.config import ConfigError, RunConfig
from massrl.epoch_clock import EpochClock
from massrl.eval.features import PROGRESS_EVERY_S
from massrl.extras import require
from massrl.files import write_text
from massrl.messages import first_line

WANDB_ID_FILE = "wandb_run_id"


class _NoAdverts(logging.Filter):
    """Lightning advertises a hosted logging service at every Trainer it builds ("💡 Tip: ...
    litlogger"): a line that says nothing about the run, dropped from massrl's output. So are
    lines that repeat massrl's own: `Trainer.fit` stopped at max_epochs (written into the live
    bar, which then drew itself twice) and the restore lines of a resume (massrl says where
    it resumes from)."""

    DROPPED = ("litlogger", "`Trainer.fit` stopped: `max_epochs=", "Restoring states from the "
               "checkpoint path", "Restored all states from the checkpoint")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in self.DROPPED)


def hide_lightning_adverts() -> None:
    """Drop Lightning's advertisement lines (idempotent; other Lightning messages stay)."""
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _NoAdverts) for f in log.filters):
        log.addFilter(_NoAdverts())


def utf8_safe(value: Any) -> Any:
    """`value` with every string valid UTF-8: a path of non-UTF-8 bytes, which Python holds as
    surrogate escapes, gets those bytes as \\x escapes (TensorBoard's protobufs and W&B's JSON
    refuse surrogates)."""
    if isinstance(value, str):
        return os.fsencode(value).decode("utf-8", "backslashreplace")
    if isinstance(value, dict):
        return {utf8_safe(k): utf8_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [utf8_safe(v) for v in value]
    return value


class _TensorBoard(TensorBoardLogger):
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(params, dict):
            params = utf8_safe(params)
        super().log_hyperparams(params, *args, **kwargs)


def build_loggers(cfg: RunConfig, run_dir: Path, resumed_step: int | None = None
                  ) -> list[Logger]:
    """`resumed_step`: the optimizer step of the checkpoint a resumed run continues from. The
    steps after it, which the resumed run repeats, are hidden from the interrupted session's
    TensorBoard events (TensorBoard's purge_step), so that each step shows once."""
    tensorboard = _TensorBoard(run_dir, name="tensorboard", version="",
                                    purge_step=resumed_step)
    loggers: list[Logger] = [CSVLogger(run_dir, name="", version=""), tensorboard]
    if cfg.wandb.enabled:
        loggers.append(wandb_logger(cfg, run_dir))
    return loggers


def wandb_logger(cfg: RunConfig, run_dir: Path) -> WandbLogger:
    require("wandb", "wandb.enabled=true")
    if rank_zero_only.rank == 0:  # (the rank that logs)
        check_wandb_login()
    id_file = run_dir / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if id_file.is_file() else None
    if run_id is None:
        run_id = secrets.token_hex(4)  # W&B's run id: lowercase letters and digits
        if rank_zero_only.rank == 0:  # (the only rank that logs: the others' id is unused)
            write_text(id_file, run_id + "\n")
    return WandbLogger(project=cfg.wandb.project, entity=cfg.wandb.entity, tags=cfg.wandb.tags,
                       name=run_dir.name if cfg.output_dir else cfg.run_name, id=run_id,
                       resume="allow", save_dir=str(run_dir),
                       config=utf8_safe(cfg.model_dump(mode="json")))


def check_wandb_login() -> None:
    """An online W&B run needs credentials: without them wandb raised its UsageError at the
    first log, inside training (a traceback, and a run folder left holding a lock)."""
    offline = ("offline", "disabled", "dryrun")
    if os.environ.get("WANDB_MODE", "").lower() in offline:
        return
    import wandb

    if "prompt" not in inspect.signature(wandb.login).parameters:
        return  # (a wandb before login(prompt=...): it says so itself, later)
    how = ("Log in once with `wandb login`, set WANDB_API_KEY, or log offline with "
           "WANDB_MODE=offline (`wandb sync` uploads the run later)")
    try:  # (W&B's settings files too: `wandb offline` here)
        settings = wandb.Settings()  # (read afresh: wandb.setup()'s stay as first read)
        settings.update_from_system_settings()
        settings.update_from_env_vars(dict(os.environ))  # (over the files, as W&B does)
        if settings.mode in offline:
            return
    except AttributeError:  # (a wandb without these: its login below decides)
        pass
    except ValueError as exc:  # (pydantic's: a WANDB_* variable W&B cannot read)
        raise ConfigError(f"wandb.enabled=true: W&B's settings (WANDB_* variables or its settings "
                          f"files) are invalid: {first_line(exc)}") from None
    try:
        logged_in = wandb.login(prompt=False, verify=False)
    except Exception as exc:  # noqa: BLE001 - W&B's refusal of a key, named
        raise ConfigError(f"wandb.enabled=true: W&B refused the credentials here "
                          f"({first_line(exc)}). {how}") from None
    if not logged_in:
        raise ConfigError(f"wandb.enabled=true: no W&B credentials on this machine. {how}")


def finish_loggers(loggers: list[Logger], summary: dict[str, Any]) -> None:
    """Close the W&B run (its closing lines print now, before massrl's summary) with the run's
    summary.json as its summary."""
    for logger in loggers:
        if isinstance(logger, WandbLogger) and rank_zero_only.rank == 0:
            run = logger.experiment
            run.summary.update({k: v for k, v in summary.items() if not isinstance(v, dict)})
            run.finish()


# Lightning's notices that are expected in a massrl run and only bury the useful output
QUIET = (
    ".*does not have many workers.*",  # the config decides the worker count
    ".*Experiment logs directory .* exists and is not empty.*",  # config.yaml is written first
    ".*is smaller than the logging interval.*",  # tiny runs
    ".*LeafSpec.*",  # a deprecation inside Lightning
    # a resumed run's own checkpoints (a new run into a run directory is refused)
    ".*Checkpoint directory .* exists and is not empty.*",
    # a resume with another trainer.checkpoint_every_n_steps: the periodic save's callback is
    # keyed by its cadence, and its state (no top-k) holds nothing the resumed run needs
    ".*callbacks used to create the checkpoint need to be provided.*",
    # a run branched off another's checkpoint into a new folder: massrl says so (train.py)
    ".*The dirpath has changed from.*",
    # training metrics are rank 0's share of the batch by design (docs/distributed.md)
    ".*when logging on epoch level in distributed setting.*",
    # inside Lightning's all_gather(sync_grads=True) (SimCLR's negatives from every rank); the
    # replacement torch names is private
    ".*torch.distributed.nn.functional.all_gather is deprecated.*",
)


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Without the notices that are expected in a massrl run and only bury the useful output."""
    with warnings.catch_warnings():
        for message in QUIET:
            warnings.filterwarnings("ignore", message)
        yield


def progress_callbacks(show: bool) -> list[Callback]:
    """trainer.progress_bar: rich's live bar in a terminal; written to a file (a batch job's
    log), where a live bar shows nothing until the end, one line per epoch."""
    if not show:
        return []
    return [EpochBar()] if sys.stdout.isatty() else [EpochLines()]


class EpochBar(RichProgressBar):
    """Rich's live bar, counting epochs from 1 as the epoch lines, the UMAP pictures and the
    summary do (Lightning's says `Epoch 0/1` for the first of two)."""

    def _get_train_description(self, current_epoch: int) -> str:
        text = f"Epoch {current_epoch + 1}"
        if self.trainer.max_epochs is not None:
            text += f"/{self.trainer.max_epochs}"
        # as wide as the validation bar's description: no flicker between the two
        return f"{text:{len(self.validation_description)}}"


class EpochLines(Callback):
    """After each training epoch: `epoch E/N  loss ...  val/knn_top1 ...  images/s  seconds`;
    within a long epoch or check, a line every PROGRESS_EVERY_S (an ImageNet epoch's log
    stayed empty for an hour; a 100k-image kNN bank's for minutes)."""

    def __init__(self) -> None:
        self._clock = EpochClock()
        self._seen = 0
        self._validated = False
        self._said = time.monotonic()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # a run resumed mid-epoch has no epoch start: its first line counts from here
        self.on_train_epoch_start(trainer, pl_module)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._clock.start(pl_module)
        self._seen = getattr(pl_module, "images_seen", 0)
        self._validated = False
        self._said = time.monotonic()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if self._due(trainer):
            loss = trainer.callback_metrics.get("train/loss_step")
            self._progress(trainer, f"batch {batch_idx + 1}/{trainer.num_training_batches}",
                           *([f"loss {float(loss):.4f}"] if loss is not None else []))

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                outputs: Any, batch: Any, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        if self._due(trainer) and not trainer.sanity_checking:
            total = trainer.num_val_batches[dataloader_idx]
            split = ("kNN bank", "test split")[dataloader_idx] if dataloader_idx < 2 else ""
            self._progress(trainer, f"validation, {split}: batch {batch_idx + 1}/{total}")

    def _due(self, trainer: L.Trainer) -> bool:
        return trainer.is_global_zero and time.monotonic() - self._said >= PROGRESS_EVERY_S

    def _progress(self, trainer: L.Trainer, *parts: str) -> None:
        self._said = time.monotonic()
        print("  ".join([f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}:", *parts]),
              flush=True)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._validated = not trainer.sanity_checking

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        seconds = self._clock.seconds(pl_module)
        metrics = trainer.callback_metrics
        parts = [f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}"]
        names = ["train/loss_epoch"] + (["val/knn_top1", "val/probe_top1"] if self._validated
                                        else [])
        parts += [f"{name.removesuffix('_epoch')} {float(metrics[name]):.4f}"
                  for name in names if name in metrics]
        images = getattr(pl_module, "images_seen", 0) - self._seen
        parts += [f"{images / max(seconds, 1e-9):.1f} images/s", f"{seconds:.0f} s"]
        print("  ".join(parts), flush=True)
