"""The run's loggers: CSV (metrics.csv) and TensorBoard always, Weights & Biases on request.

A resumed run logs to the same W&B run: its id is kept in the run directory (`wandb_run_id`).
"""

from __future__ import annotations

import importlib.util
import logging
import secrets
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from massrl.config import ConfigError, RunConfig

WANDB_ID_FILE = "wandb_run_id"


class _NoAdverts(logging.Filter):
    """Lightning advertises a hosted logging service at every Trainer it builds ("💡 Tip: ...
    litlogger"): a line that says nothing about the run, dropped from massrl's output."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


def hide_lightning_adverts() -> None:
    """Drop Lightning's advertisement lines (idempotent; other Lightning messages stay)."""
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _NoAdverts) for f in log.filters):
        log.addFilter(_NoAdverts())


def build_loggers(cfg: RunConfig, run_dir: Path) -> list[Logger]:
    loggers: list[Logger] = [CSVLogger(run_dir, name="", version=""),
                             TensorBoardLogger(run_dir, name="tensorboard", version="")]
    if cfg.wandb.enabled:
        loggers.append(wandb_logger(cfg, run_dir))
    return loggers


def wandb_logger(cfg: RunConfig, run_dir: Path) -> WandbLogger:
    if importlib.util.find_spec("wandb") is None:
        raise ConfigError("wandb.enabled=true needs the wandb package: pip install wandb "
                          "(or pip install 'massrl[wandb]')")
    id_file = run_dir / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if id_file.is_file() else None
    if run_id is None:
        run_id = secrets.token_hex(4)  # W&B's run id: lowercase letters and digits
        if rank_zero_only.rank == 0:  # (the only rank that logs: the others' id is unused)
            id_file.write_text(run_id + "\n")
    return WandbLogger(project=cfg.wandb.project, entity=cfg.wandb.entity, tags=cfg.wandb.tags,
                       name=run_dir.name if cfg.output_dir else cfg.run_name, id=run_id,
                       resume="allow", save_dir=str(run_dir),
                       config=cfg.model_dump(mode="json"))


def finish_loggers(loggers: list[Logger], summary: dict[str, Any]) -> None:
    """Close the W&B run (its closing lines print now, before massrl's summary) with the run's
    summary.json as its summary."""
    for logger in loggers:
        if isinstance(logger, WandbLogger) and rank_zero_only.rank == 0:
            run = logger.experiment
            run.summary.update({k: v for k, v in summary.items() if not isinstance(v, dict)})
            run.finish()
