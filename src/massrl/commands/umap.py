"""`massrl umap`: a UMAP picture of a pre-trained backbone's features, coloured by class."""

from __future__ import annotations

import argparse
import os

from massrl.commands.common import add_eval_args
from massrl.eval.config import UmapEvalConfig

NAME = "umap"
HELP = ("UMAP of frozen backbone features of a labeled split, one colour per class: "
        "`massrl umap ckpt=PATH --out FILE.png`.")


def configure(parser: argparse.ArgumentParser) -> None:
    add_eval_args(parser, UmapEvalConfig)
    parser.add_argument("--out", metavar="FILE.png", help="same as out=FILE.png")


def run(args: argparse.Namespace) -> int:
    from massrl.config import ConfigError
    from massrl.eval import session
    from massrl.eval.umap_plot import save_umap
    from massrl.extras import require
    from massrl.files import picture_path

    if args.out:
        args.overrides = [*args.overrides, f"out={args.out}"]
    r = session.start(NAME, UmapEvalConfig, args)
    if r is None:  # (--print-config needs no umap-learn)
        return 0
    require("umap", "massrl umap")  # (before the features are computed)
    cfg = r.cfg
    try:
        out = picture_path(session.output_file(cfg.out, r, "umap.png"))
    except ValueError as exc:
        raise ConfigError(f"out={cfg.out}: {exc}") from None
    name = "result.json"
    if cfg.out and not cfg.output_dir:  # the record beside the picture, not in ./runs
        r.output_dir, name = out.parent, f"{out.stem}.result.json"
    session.open_data(r)
    feats, labels = session.features(r, cfg.split)
    title = (f"{r.pre.config.method} - {r.pre.path.name} ({cfg.data.name} {cfg.split}, "
             f"{min(len(labels), cfg.max_points or len(labels))} points)")
    save_umap(feats, labels, r.splits.classes, title, out, seed=cfg.seed,
              n_neighbors=cfg.n_neighbors, min_dist=cfg.min_dist, n_epochs=cfg.n_epochs,
              max_points=cfg.max_points)
    # (absolute, as the other records' paths: the record is read from other folders)
    results = {"png": os.path.abspath(out),
               "num_points": min(len(labels), cfg.max_points or len(labels))}
    session.finish(r, f"UMAP - {r.pre.path.name}", results,
                   [("picture", str(out)), ("points", str(results["num_points"]))], name)
    return 0
