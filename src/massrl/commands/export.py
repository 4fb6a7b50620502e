"""`massrl export`: the backbone as a plain state_dict that loads in timm / torchvision."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from massrl.commands.common import add_eval_args
from massrl.eval.config import ExportConfig
from massrl.messages import first_line

if TYPE_CHECKING:
    from massrl.eval.session import EvalRun

NAME = "export"
HELP = ("Export the pre-trained backbone as a state_dict + JSON manifest that load with "
        "timm (and torchvision for ResNets) without massrl: `massrl export ckpt=PATH --out FILE`.")


def configure(parser: argparse.ArgumentParser) -> None:
    add_eval_args(parser, ExportConfig)
    parser.add_argument("--out", metavar="FILE.pt", help="same as out=FILE.pt")


def _normalisation(r: EvalRun) -> tuple[Any, Any]:
    """The mean/std pre-training used: its config, the checkpoint's record, or the dataset's."""
    data = r.pre.config.data
    if data.mean is not None and data.std is not None:
        return data.mean, data.std
    recorded = r.pre.meta.get("data") or {}
    if recorded.get("mean") and recorded.get("std"):
        return recorded["mean"], recorded["std"]
    try:
        from massrl.data import load_dataset

        splits = load_dataset(data, r.pre.config.seed)
        return splits.mean, splits.std
    except Exception as exc:  # the dataset may not be on this machine: record that instead
        r.warn(f"mean/std of '{data.name}' unknown ({first_line(exc)}); "
               "the manifest records null")
        return None, None


def run(args: argparse.Namespace) -> int:
    from massrl.eval import session
    from massrl.eval.export import export_backbone

    if args.out:
        args.overrides = [*args.overrides, f"out={args.out}"]
    r = session.start(NAME, ExportConfig, args)
    if r is None:
        return 0
    mean, std = _normalisation(r)
    out = session.output_file(r.cfg.out, r, "backbone.pt")
    name = "result.json"
    if r.cfg.out and not r.cfg.output_dir:  # the record beside the export, not in ./runs
        r.output_dir, name = out.parent, f"{out.with_suffix('').name}.result.json"
    pre = r.pre
    info = export_backbone(
        pre.backbone, pre.spec, out, image_size=pre.config.data.image_size, mean=mean, std=std,
        source={"checkpoint": str(pre.path), "sha256": pre.sha256, "method": pre.config.method,
                "dataset": pre.config.data.name, "massrl_version": pre.meta.get("version")},
    )
    rows = [("weights", info["weights_path"]), ("manifest", info["manifest_path"]),
            ("timm", f"{info['architecture']} {info['timm_kwargs'] or ''}".strip()),
            ("torchvision", info["torchvision"] or "- (not a width-64 torchvision ResNet)"),
            ("cifar stem", str(info["cifar_stem"])), ("feature dim", str(info["feature_dim"]))]
    session.finish(r, f"export - {pre.path.name}", info, rows, name)
    return 0
