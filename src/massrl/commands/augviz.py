"""`massrl augviz`: a picture of the views each augmentation strategy makes (no training)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from massrl.commands.common import add_config_args, resolve
from massrl.config import RunConfig

NAME = "augviz"
HELP = ("Draw a PNG grid: one row per image, the original then each view labelled with its "
        "strategy and ops. Works on any dataset, including data.name=folder data.root=DIR.")


DEFAULT_CONFIG = "fashion_mnist/massrl"


def configure(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser, RunConfig, example="augment.view_mode=per_strategy data.name=digits",
                    default_config=DEFAULT_CONFIG, only=("seed", "data", "augment"))
    # (not required by argparse: --print-config needs no picture)
    parser.add_argument("--out", metavar="FILE.png", help="PNG file to write (required), or a "
                        "folder to write augmentations.png into")
    parser.add_argument("--images", type=int, default=8,
                        help="rows (images) in the grid (default: 8)")


def run(args: argparse.Namespace) -> int:
    if args.config is None:
        args.config = DEFAULT_CONFIG
    cfg = resolve(args, RunConfig)
    if cfg is None:
        return 0
    if not args.out:
        print("massrl augviz: --out FILE.png is required: where to write the picture",
              file=sys.stderr)
        return 2
    if args.images <= 0:
        print("massrl augviz: --images must be a positive number of rows", file=sys.stderr)
        return 2
    from massrl.augviz import augmentation_grid, view_maker
    from massrl.data import load_dataset
    from massrl.files import picture_path

    out = Path(args.out).expanduser()
    if out.is_dir() or args.out.endswith(("/", os.sep)):  # a folder: the picture goes inside
        out = out / "augmentations.png"
    try:
        out = picture_path(out)
    except ValueError as exc:
        print(f"massrl augviz: --out {args.out}: {exc}", file=sys.stderr)
        return 2
    splits = load_dataset(cfg.data, seed=cfg.seed)  # (its errors: cli._failure)
    # augment.backend=auto draws the per-image pipeline's views, the ones labelled with their ops
    # (the engine does not report them); batched, asked for, shows the engine's own
    backend = "per_image" if cfg.augment.backend == "auto" else cfg.augment.backend
    transform, note = view_maker(cfg, splits, backend)
    out = augmentation_grid(splits.train, transform, out, num_images=args.images,
                            title=f"{cfg.augment.view_mode} views of {cfg.data.name}{note}",
                            seed=cfg.seed)
    print(f"wrote {os.path.abspath(out)}")  # (absolute: scripts take the last line)
    return 0
