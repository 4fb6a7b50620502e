"""`massrl export`: the backbone as a plain state_dict that loads in timm / torchvision."""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING, Any

from massrl.commands.common import add_eval_args
from massrl.eval.config import ExportConfig
from massrl.messages import first_line

if TYPE_CHECKING:
    from massrl.eval.session import EvalRun

NAME = "export"
HELP = ("Export the pre-trained backbone as a state_dict (.pt, or .safetensors) + JSON manifest "
        "that load with timm (and torchvision for ResNets) without massrl, with the test "
        "transform it was evaluated with: `massrl export ckpt=PATH --out FILE`.")


def configure(parser: argparse.ArgumentParser) -> None:
    add_eval_args(parser, ExportConfig)
    parser.add_argument("--out", metavar="FILE.pt", help="same as out=FILE.pt")


def _pretraining_data(r: EvalRun) -> tuple[Any, Any, int | None]:
    """(mean, std, the images' typical side) of the pre-training data: its config's mean/std,
    else the checkpoint's record; the dataset itself only for what neither holds (checkpoints
    before the typical side was recorded)."""
    from massrl.data.eval_transform import SMALL_IMAGE

    data = r.pre.config.data
    recorded = r.pre.meta.get("data") or {}
    mean, std = ((data.mean, data.std) if data.mean is not None and data.std is not None
                 else (recorded.get("mean"), recorded.get("std")))
    native = recorded.get("native_size")
    # (up to 64 px a test image is seen whole whatever its own size: eval_transform.py)
    if mean and std and ("native_size" in recorded or data.image_size <= SMALL_IMAGE):
        return mean, std, native
    try:
        from massrl.data import load_dataset

        splits = load_dataset(data, r.pre.config.seed)
        return mean or splits.mean, std or splits.std, splits.native_size
    except Exception as exc:  # the dataset may not be on this machine: record that instead
        if not (mean and std):
            r.warn(f"mean/std of '{data.name}' unknown ({first_line(exc)}); "
                   "the manifest records null")
        if "native_size" not in recorded and data.image_size > SMALL_IMAGE:
            r.warn(f"the size of the images of '{data.name}' is unknown ({first_line(exc)}): "
                   f"the manifest's test transform assumes them larger than {data.image_size} "
                   "px (a 0.875 centre crop); massrl evaluates smaller ones whole")
        return mean or None, std or None, native


def run(args: argparse.Namespace) -> int:
    from massrl.eval import session
    from massrl.eval.export import check_export_paths, export_backbone

    if args.out:
        args.overrides = [*args.overrides, f"out={args.out}"]
    r = session.start(NAME, ExportConfig, args)
    if r is None:
        return 0
    out = session.output_file(r.cfg.out, r, "backbone.pt")
    check_export_paths(out, r.pre.path)  # (before reading the dataset, in _pretraining_data)
    mean, std, native_size = _pretraining_data(r)
    name = "result.json"
    if r.cfg.out and not r.cfg.output_dir:  # the record beside the export, not in ./runs
        r.output_dir, name = out.parent, f"{out.with_suffix('').name}.result.json"
    pre = r.pre
    info = export_backbone(
        pre.backbone, pre.spec, out, image_size=pre.config.data.image_size, mean=mean, std=std,
        native_size=native_size, checkpoint=pre.path,
        source={"checkpoint": os.path.abspath(pre.path), "sha256": pre.sha256,
                "method": pre.config.method, "dataset": pre.config.data.name,
                "massrl_version": pre.meta.get("version"), **pre.trained},
    )
    rows = [("weights", info["weights_path"]), ("manifest", info["manifest_path"]),
            ("timm", f"{info['architecture']} {info['timm_kwargs'] or ''}".strip()),
            ("torchvision", info["torchvision"] or "- (not a width-64 torchvision ResNet)"),
            ("cifar stem", str(info["cifar_stem"])), ("feature dim", str(info["feature_dim"])),
            ("test transform", "resize {resize} (bicubic), centre crop {center_crop}".format(
                **info["test_transform"]))]
    session.finish(r, f"export - {pre.path.name}", info, rows, name)
    return 0
