"""`massrl linear`: offline linear evaluation, or semi-supervised fine-tuning on few labels."""

from __future__ import annotations

import argparse

from massrl.commands.common import add_eval_args
from massrl.eval.config import LinearEvalConfig

NAME = "linear"
HELP = ("Offline linear evaluation on the frozen backbone (SGD + cosine, random crop + flip, "
        "frozen batch-norm); with label_fraction=0.01 finetune=true, semi-supervised fine-tuning: "
        "`massrl linear ckpt=PATH [label_fraction=0.1 finetune=true] [data.name=...]`.")


def configure(parser: argparse.ArgumentParser) -> None:
    add_eval_args(parser, LinearEvalConfig)


def run(args: argparse.Namespace) -> int:
    from massrl.commands import linear_run

    return linear_run.run(args)
