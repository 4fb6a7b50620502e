"""`massrl pretrain`: pre-train a backbone with MASSRL, BYOL or SimCLR."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from massrl.commands.common import add_config_args, resolve
from massrl.config import ConfigError, RunConfig

NAME = "pretrain"
HELP = ("Pre-train a backbone. Without -c it runs MASSRL on Fashion-MNIST with a narrow "
        "ResNet-18 (the shipped config fashion_mnist/massrl).")
DEFAULT_CONFIG = "fashion_mnist/massrl"


def configure(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser, RunConfig, default_config=DEFAULT_CONFIG)


def run(args: argparse.Namespace) -> int:
    if args.config is None:
        args.config = DEFAULT_CONFIG
    cfg = resolve(args, RunConfig)
    if cfg is None:
        return 0
    from lightning.pytorch.utilities import rank_zero_only
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from massrl.run_dir import another_machines_first_process, last_checkpoint

    if another_machines_first_process():  # (the Trainer sets its true rank later)
        rank_zero_only.rank = int(os.environ["NODE_RANK"])
    if rank_zero_only.rank != 0:  # a DDP process of rank > 0: rank 0 speaks for the run
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the rest of the process
    cfg = _resume_where_the_config_is(cfg, args)

    from massrl.stop_signals import StoppedAtOnce, StoppedWhileStarting
    from massrl.train import pretrain

    try:
        summary = pretrain(cfg)
    except StoppedWhileStarting as exc:
        where = getattr(exc, "run_dir", None) or cfg.output_dir
        kept = where is not None and last_checkpoint(where).is_file()
        print(f"massrl pretrain: stopped by {exc.signal_name} while the run was being set up, "
              "before training: " + (f"its last.ckpt is kept; continue with: "
                                     f"{continue_command(where)}" if kept else
                                     "nothing was trained"), file=sys.stderr)
        return 143
    except StoppedAtOnce as exc:
        saved = last_checkpoint(exc.run_dir).is_file()
        print("massrl pretrain: stopped at once by a second Ctrl-C. " + (
            f"Continue from the last checkpoint with: {continue_command(exc.run_dir)}" if saved
            else f"No checkpoint was saved yet: {continue_command(exc.run_dir)} starts the run "
                 "again from the beginning"), file=sys.stderr)
        return 130
    except SIGTERMException as exc:
        where = getattr(exc, "run_dir", None) or cfg.output_dir
        by_ctrl_c = getattr(exc, "by_ctrl_c", False)
        if rank_zero_only.rank == 0:  # (every rank got the signal: one says it)
            name = "Ctrl-C" if by_ctrl_c else getattr(exc, "signal_name", "SIGTERM")
            print(f"massrl pretrain: stopped by {name}. "
                  f"Continue with: {continue_command(where)}", file=sys.stderr)
        return 130 if by_ctrl_c else 143
    except ConfigError as exc:
        if rank_zero_only.rank == 0:
            raise
        # (a machine-dependent refusal may be this rank's alone: said, and marked as its own)
        print(f"massrl pretrain (rank {rank_zero_only.rank}): {exc}", file=sys.stderr)
        return 2
    print_summary(summary)
    return 0


def _resume_where_the_config_is(cfg: RunConfig, args: argparse.Namespace) -> RunConfig:
    """`-c <run>/config.yaml resume=auto` continues that run, wherever the command is run
    from and wherever the run's folder has moved: its config's output_dir (as typed when the
    run started, perhaps relative to another folder) named a folder with no run, and a new
    run started there. output_dir=... on the command line still decides."""
    config = Path(str(args.config))
    run_dir = Path(os.path.abspath(config.parent))
    if (cfg.resume != "auto" or config.name != "config.yaml" or not config.is_file()
            or not (run_dir / "checkpoints").is_dir()
            or any(o.split("=", 1)[0].strip() == "output_dir" for o in args.overrides)):
        return cfg
    if cfg.output_dir is None or Path(os.path.abspath(cfg.output_dir)) != run_dir:
        print(f"resume=auto: continuing the run in {run_dir}, the folder of its config.yaml "
              f"(output_dir=DIR names another)")
    return cfg.model_copy(update={"output_dir": str(run_dir)})


def continue_command(run_dir: object) -> str:
    """The command that continues an interrupted run: its own config.yaml holds every setting
    it ran with (the command it was started with, plus resume=auto, does the same)."""
    if run_dir is None:
        return "the same command with resume=auto output_dir=<the run directory>"
    from massrl.run_dir import own_config_option

    run_dir = os.path.abspath(str(run_dir))  # (it works from any folder)
    return (f"massrl pretrain {own_config_option(str(run_dir))} resume=auto "
            f"{shlex.quote(f'output_dir={run_dir}')}")


def _fmt(key: str, v: object) -> str:
    if isinstance(v, float):  # accuracies in % as the evaluations' tables (summary.json:
        if key.endswith("top1"):  # fractions), the loss to 4 places, speeds and times to 1
            return f"{100 * v:.2f} %"
        return f"{v:.4f}" if key.endswith("loss") else f"{v:,.1f}"
    return "-" if v is None else str(v)


def _notes(summary: dict) -> dict[str, str]:
    """What the kNN figures are measured on: the final model's can exceed the best
    checkpoint's when it came from a validation after training (eval.knn_every > 1)."""
    notes = {}
    if summary.get("knn_top1") is not None and summary.get("knn_after_epochs") is not None:
        notes["knn_top1"] = f"final model, after {summary['knn_after_epochs']} epoch(s)"
    if summary.get("best_knn_top1") is not None and summary.get("best_checkpoint"):
        notes["best_knn_top1"] = f"checkpoint {Path(summary['best_checkpoint']).name}"
    return notes


def print_summary(summary: dict) -> None:
    console = Console()
    table = Table(title=f"{summary['method']} on {summary['dataset']}", show_header=False)
    notes = _notes(summary)
    for key in ("knn_top1", "best_knn_top1", "probe_top1", "final_loss", "epochs",
                "images_seen", "images_per_s", "train_seconds", "skipped_files",
                "skipped_nonfinite_steps"):
        if key != "skipped_nonfinite_steps" or summary.get(key):  # (that one: where there were)
            table.add_row(key, _fmt(key, summary.get(key)), notes.get(key, ""))
    console.print(table)
    print(f"run directory: {summary['run_dir']}")
