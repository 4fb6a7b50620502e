"""Argument handling shared by every sub-command: -c FILE, KEY=VALUE overrides, --print-config."""

from __future__ import annotations

import argparse
import os
from collections.abc import Collection
from typing import Any

from pydantic import BaseModel

from massrl.config import ConfigError, build_config, describe_options, load_yaml, to_yaml


class _Once(argparse.Action):
    """An option given once: with two config files the first would be ignored silently."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        if getattr(namespace, self.dest, None) is not None:
            parser.error(f"{option_string} given twice: one config file per run (put the "
                         "other's keys in it, or give them as KEY=VALUE)")
        setattr(namespace, self.dest, values)


def add_config_args(parser: argparse.ArgumentParser, schema: type[BaseModel],
                    config_help: str = "YAML config file, or a shipped one such as "
                    "fashion_mnist/massrl",
                    example: str = "optimizer.lr=0.5 data.subset=2000",
                    default_config: str | None = None,
                    only: Collection[str] | None = None) -> None:
    parser.add_argument("-c", "--config", metavar="FILE.yaml", help=config_help, action=_Once)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help=f"dotted overrides, e.g. {example}")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config and exit")
    shipped = load_yaml(default_config) if default_config else None
    note = (f"; '(without -c: X)' is the value of {default_config}, which runs without -c"
            if default_config else "")
    which = "config keys" if only is None else f"the keys it reads ({', '.join(only)}; " \
        "it accepts a pre-training config's others)"
    parser.epilog = (f"{which} and their schema defaults{note} (a -c config file may set "
                     "others; --print-config shows the resolved values):\n"
                     + "\n".join(describe_options(schema, without_c=shipped, only=only)))


def add_eval_args(parser: argparse.ArgumentParser, schema: type) -> None:
    """An evaluation command's -c/overrides/--print-config arguments, with a note on the
    checkpoint's defaults (here, not in massrl.eval.session: --help loads no torch)."""
    add_config_args(parser, schema,
                    config_help="YAML file of this command's keys (e.g. saved from "
                    "--print-config); pre-training configs do not apply here",
                    example="ckpt=runs/RUN/checkpoints/last.ckpt"
                    + (" data.eval_subset=null" if "data" in schema.model_fields else ""))
    note = ("data.* and seed default to the checkpoint's own pre-training values (the table "
            "below shows the plain defaults); naming another data.name evaluates transfer.")
    if "data" not in schema.model_fields:
        note = "Input size and normalisation are taken from the checkpoint's run config."
    parser.epilog = note + "\n\n" + (parser.epilog or "")


def refuse_several_processes(command: str) -> None:
    """Only pre-training runs as several processes: each process of an evaluation would run
    the whole of it and write the same result."""
    several = max(int(os.environ.get(v) or 1) for v in ("WORLD_SIZE", "SLURM_STEP_NUM_TASKS"))
    if command != "pretrain" and several > 1:
        raise ConfigError("massrl <command> runs in one process: start it without torchrun, "
                          "or with srun -n 1; it uses one GPU")


def resolve(args: argparse.Namespace, schema: type[BaseModel]) -> Any:
    """The validated config; prints it and returns None when --print-config was given."""
    cfg = build_config(schema, args.config, args.overrides)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return None
    return cfg


def data_error_message(exc: BaseException) -> str:
    """One line for a data error. A DataLoader worker's error comes back with the worker's
    traceback as its message: only its last line, the error itself, is the user's business."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    if len(lines) > 1 and any("Traceback" in line for line in lines):
        return lines[-1].split("Error: ", 1)[-1]
    return str(exc)
