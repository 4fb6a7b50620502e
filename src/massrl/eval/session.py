"""What every evaluation command shares: config + checkpoint, the dataset and its checks, cached
features, and the result file that records the protocol next to the numbers."""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from rich.console import Console
from rich.table import Table
from torch.utils.data import Dataset

import massrl
from massrl.config import ConfigError, to_yaml
from massrl.data.eval_transform import EvalTransform
from massrl.data.folder import files_fingerprint
from massrl.data.loading import labeled_images
from massrl.devices import resolve_num_workers
from massrl.eval.checkpoint import Pretrained, check_finite_features, load
from massrl.eval.config import build_eval_config, default_output_dir, raw_tree, same_data
from massrl.eval.features import (
    cached_features,
    resolve_device,
)
from massrl.eval.records import write_record
from massrl.files import json_text
from massrl.models.backbones import input_size_error
from massrl.provenance import package_versions, source_commit

if TYPE_CHECKING:
    from massrl.config import DataConfig
    from massrl.data import DatasetSplits

Split = Literal["train", "test"]
FEATURES_VERSION = 3  # bump when extraction changes, so old cache files are not reused
SIZE_WARN_RATIO = 2.0


@dataclass
class EvalRun:
    command: str
    cfg: Any
    pre: Pretrained
    output_dir: Path
    device: torch.device
    requested: dict[str, Any]  # the user's own keys (file + overrides), before defaults
    warnings: list[str] = field(default_factory=list)
    splits: DatasetSplits | None = None  # once open_data ran
    image_size: int = 0
    transfer: bool = False
    split_seed: int = 0  # the seed of the held-out split and subsets

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        Console(stderr=True).print(f"[yellow]warning:[/] {message}", highlight=False)


def start(command: str, schema: type, args: argparse.Namespace) -> EvalRun | None:
    """Load the checkpoint and resolve the config; None (after printing) for --print-config."""
    requested = raw_tree(args.config, args.overrides)
    _check_typed_mean(requested)
    ckpt = requested.get("ckpt")
    pre = load(str(ckpt)) if ckpt else None
    cfg = build_eval_config(schema, args.config, args.overrides, pre.config if pre else None)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return None
    assert pre is not None  # the config validation requires ckpt
    try:
        device = resolve_device(cfg.device)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    out = _output_dir(cfg, command)
    check_writable(out / "result.json")  # made by `finish`, once there is a result
    return EvalRun(command, cfg, pre, out, device, requested)


def _output_dir(cfg: Any, command: str) -> Path:
    """output_dir; without it the folder of `out` (umap, export: their record goes beside the
    file), else runs/eval/<command>/<time> (it was made in a working directory where nothing
    was to be written: refused where that is read-only)."""
    if cfg.output_dir:
        return Path(cfg.output_dir)
    out = getattr(cfg, "out", None)
    if out:
        return Path(out) if out.endswith(("/", os.sep)) or Path(out).is_dir() else \
            Path(out).parent
    return default_output_dir(command)


def _check_typed_mean(requested: dict[str, Any]) -> None:
    """A data.mean typed on the 0-255 scale (a checkpoint's own is used as it was trained)."""
    from massrl.config.schema import mean_scale_problem

    if problem := mean_scale_problem((requested.get("data") or {}).get("mean")):
        raise ConfigError(problem)


def output_file(out: str | None, run: EvalRun, default_name: str) -> Path:
    """Where an output file goes: `out` (inside it when it is a folder), else the run's output
    directory; checked writable now, before the work: an OSError naming the path, not one
    after it."""
    path = Path(out) if out else run.output_dir / default_name
    if path.is_dir() or (out and out.endswith(("/", os.sep))):  # "new_folder/" is a folder too
        path = path / default_name
    check_writable(path)
    return path


def check_writable(path: Path) -> None:
    """Raise the OSError that writing `path` would raise, leaving nothing behind: the folders
    made for the check are removed again, so a run that fails later leaves no empty folder."""
    missing = [d for d in [path.parent, *path.parent.parents] if not d.exists()]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError as exc:  # a file where a folder of the path should be
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), exc.filename) from None
    try:
        existed = path.exists()
        if existed and not path.is_file():  # (opening a FIFO waited for a reader forever)
            raise ConfigError(f"{path} exists and is {_kind(path)}, not a file: "
                              "name a file or a folder to write the output to")
        with open(path, "ab"):
            pass
        if not existed:
            path.unlink()
    finally:
        for folder in missing:  # deepest first; one another process has filled stays
            with contextlib.suppress(OSError):
                folder.rmdir()


def _kind(path: Path) -> str:
    mode = path.stat().st_mode
    return ("a folder" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "a device")


def open_data(run: EvalRun) -> None:
    """Load the evaluation dataset, check its labels and that the backbone takes its image size."""
    from massrl.data import DatasetNotFoundError, load_dataset

    data, pre_data = run.cfg.data, run.pre.config.data
    asked = run.requested.get("data") or {}
    # trained on pretrain(splits=...)'s datasets: its config's data.name is not what it saw
    own = bool(run.pre.meta.get("own_splits"))
    if own and "name" not in asked:
        raise ConfigError(f"{run.pre.path} was pre-trained on datasets given to pretrain(cfg, "
                          "splits=...) from Python, which its config does not name: say what "
                          "to evaluate on with data.name=... (a folder: data.name=folder "
                          "data.root=DIR), or evaluate from Python")
    run.transfer = own or not same_data(data.name, data.root, pre_data)
    # the pre-training data is split (and subset) as pre-training split it, whatever the
    # evaluation's seed: another split would put pre-training images in the test split
    run.split_seed = run.cfg.seed if run.transfer else run.pre.config.seed
    try:
        run.splits = splits = load_dataset(data, run.split_seed)
    except (DatasetNotFoundError, ValueError) as exc:
        text = str(exc)
        if text.startswith("data.eval_subset=") and "eval_subset" not in asked:
            text = f"the checkpoint's {text}"  # (inherited: the user never typed it)
        raise ConfigError(text) from None
    if splits.train_labeled is None or splits.test is None or not splits.num_classes:
        raise ConfigError(
            f"dataset '{data.name}' (root {data.root}) has no labels, but `massrl {run.command}` "
            "needs labeled train and test images. Use a labeled dataset, e.g. a folder with one "
            "sub-folder per class, or data.name=cifar10."
        )
    note_inherited_subsets(data, asked, splits)
    if not run.transfer:
        warn_changed_files(run, splits)
    asked_size = "image_size" in asked
    # Transfer: the evaluation dataset's own size unless the user chose one.
    run.image_size = transfer_size(run, splits) if run.transfer and not asked_size \
        else data.image_size
    check_input_size(run)


# folders of photos have no size of their own: the median side of phone pictures is 3,000 px,
# at which a ResNet's features of 100 images took 20 GB. They are seen at no more than this,
# ImageNet's evaluation size, or the pre-training size where that is larger
PHOTO_EVAL_SIZE = 224


def transfer_size(run: EvalRun, splits: DatasetSplits) -> int:
    """The size another dataset is evaluated at: its own (STL-10's 96 px, CIFAR's 32), and for
    a folder of images (folder, imagenet, imagenet100: sized from its files' median side) no
    more than PHOTO_EVAL_SIZE or the pre-training size."""
    native = splits.native_size or run.cfg.data.image_size
    if run.cfg.data.name in ("folder", "imagenet", "imagenet100"):
        return min(native, max(PHOTO_EVAL_SIZE, run.pre.config.data.image_size))
    return native


def warn_changed_files(run: EvalRun, splits: DatasetSplits) -> None:
    """A folder's test images that changed since pre-training (checkpoints record the file
    lists): without val/ the folder is split otherwise, and the test split may hold images the
    model was trained on. (A changed train split alone, beside an unchanged val/, leaks none.)"""
    from massrl.data.folder import file_list_change, file_list_digest

    then = (run.pre.meta.get("files") or {}).get("test")
    if then and splits.test is not None and \
            (change := file_list_change(then, file_list_digest(splits.test))):
        run.warn(f"the test split's files changed since pre-training ({change}): its figures "
                 "are not comparable with the run's, and in a folder without val/, split "
                 "from one list, it may now hold images the model was trained on")


def note_inherited_subsets(data: DataConfig, asked: dict, splits: DatasetSplits) -> None:
    """Say when the checkpoint's data.subset / eval_subset (set for pre-training and its
    monitors) shrink the evaluation's splits, and how to take them whole."""
    from massrl.data.datasets import SubsetDataset
    from massrl.data.subset import base_and_indices

    labeled = splits.train_labeled
    # (data.subset reaches the labeled split where pre-training trains on that split)
    subset_applies = isinstance(splits.train, SubsetDataset) and labeled is not None and (
        labeled is splits.train or getattr(labeled, "dataset", None) is splits.train)
    inherited = [f"data.{key}" for key, applies in (("subset", subset_applies),
                                                    ("eval_subset", True))
                 if applies and getattr(data, key) is not None and key not in asked]
    shares = {name: ds for name, ds in (("labeled training", splits.train_labeled),
                                         ("test", splits.test)) if ds is not None}
    if not inherited or not any(isinstance(ds, SubsetDataset) for ds in shares.values()):
        return
    used = [f"{len(ds)} of {len(base_and_indices(ds)[0])}" if isinstance(ds, SubsetDataset)
            else f"all {len(ds)}" for ds in shares.values()]
    print(" ".join(f"{key}={getattr(data, key.removeprefix('data.'))}" for key in inherited)
          + " (the checkpoint's, for pre-training and its monitors): evaluating with "
          + " and ".join(f"{n} {name} images" for n, name in zip(used, shares, strict=True))
          + " (class-balanced); " + " ".join(f"{key}=null" for key in inherited)
          + " takes the whole splits")


def check_input_size(run: EvalRun) -> None:
    size, pre_size, name = run.image_size, run.pre.config.data.image_size, run.pre.spec.name
    if why := input_size_error(run.pre.backbone, size):
        raise ConfigError(f"the backbone ({name}, pre-trained on {pre_size} px images) cannot "
                          f"take {size} px images: {why}. Set data.image_size={pre_size}.")
    if max(size, pre_size) / min(size, pre_size) >= SIZE_WARN_RATIO:
        run.warn(
            f"evaluating at {size} px a backbone pre-trained at {pre_size} px"
            f"{' (cifar_stem)' if run.pre.spec.cifar_stem else ''}; features usually suffer. "
            f"Consider data.image_size={pre_size}."
        )


def split_dataset(run: EvalRun, split: Split) -> Dataset:
    return run.splits.train_labeled if split == "train" else run.splits.test


def test_transform(run: EvalRun) -> EvalTransform:
    """The test-time transform of every evaluation (and of the pre-training monitors)."""
    return EvalTransform(run.image_size, run.splits.mean, run.splits.std,
                         run.cfg.test_crop_ratio, run.splits.native_size)


def test_transform_info(run: EvalRun) -> dict[str, Any]:
    t = test_transform(run)
    return {"resize": t.resize, "center_crop": t.image_size, "crop_ratio": t.crop_ratio,
            "interpolation": "bicubic", "mean": list(run.splits.mean),
            "std": list(run.splits.std)}


def channels_last(run: EvalRun) -> bool:
    """The layout of the batches features are computed from: the run's own (trainer.channels_last,
    unless its model turned it off on the CPU), so that on float32 features `massrl knn` gives
    the online monitor's number, and by default the faster one."""
    from massrl.devices import channels_last_hazards

    trainer = run.pre.config.trainer
    return (run.device.type == "cpu" and trainer.channels_last
            and not channels_last_hazards(run.pre.backbone))


def extraction_info(run: EvalRun) -> dict[str, Any]:
    """What, besides the images, decides a feature cache entry: the extraction's version, the
    test transform, and what changes the last digits (device, torch, batch layout)."""
    return {"version": FEATURES_VERSION, **test_transform_info(run), "device": run.device.type,
            "torch": torch.__version__, "channels_last": channels_last(run)}


def loader_options(run: EvalRun, *, every_epoch: bool = False) -> dict[str, Any]:
    """The data.* loader settings for the device this evaluation runs on; `every_epoch`: a
    loader read once per epoch, whose workers data.persistent_workers keeps."""
    data = run.cfg.data
    return {"num_workers": resolve_num_workers(data.num_workers, run.device.type == "cpu"),
            "pin_memory": data.pin_memory,
            **({"persistent_workers": data.persistent_workers} if every_epoch else {})}


def features(run: EvalRun, split: Split) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen features of a labeled split with the test transform, cached on disk."""
    cfg, ds = run.cfg, split_dataset(run, split)
    key = {"ckpt_sha256": run.pre.sha256, "split": split, "dataset": cfg.data.name,
           "root": cfg.data.root, "subset": cfg.data.subset, "eval_subset": cfg.data.eval_subset,
           # (the seed that drew the splits and subsets: another evaluation seed, the same images)
           "seed": run.split_seed, "num_samples": len(ds), "files": files_fingerprint(ds),
           **extraction_info(run)}
    feats, labels = cached_features(
        run.pre.backbone, labeled_images(ds, test_transform(run)), key, cache_dir=cfg.cache_dir,
        use_cache=cfg.cache, device=run.device, batch_size=cfg.data.batch_size,
        channels_last=key["channels_last"], **loader_options(run),
    )
    warn_left_out(run, len(ds) - len(labels), len(ds), split)
    check_finite_features(feats, f"{split} images", run.pre.path)
    return feats, labels


def warn_left_out(run: EvalRun, bad: int, total: int, split: str) -> None:
    """Images that could not be decoded, recorded in result.json (the split sizes there count
    the files)."""
    if bad:
        run.warn(f"{bad} of the {total} images of the {split} split could not be decoded and "
                 "were left out")


def protocol(run: EvalRun) -> dict[str, Any]:
    """Every setting that can change the numbers, next to them in the result file."""
    pre = run.pre
    info: dict[str, Any] = {
        "command": run.command, "massrl_version": massrl.__version__,
        "torch_version": torch.__version__, "device": str(run.device),
        "versions": package_versions(), "massrl_commit": source_commit(),
        # (threads change the float rounding; workers no longer change any figure: recorded
        # for speed, and for results made before linear seeded each image's crops)
        "runtime": {"cpu_threads": torch.get_num_threads(),
                    **({"num_workers": loader_options(run)["num_workers"]}
                       if hasattr(run.cfg, "data") else {})},
        "checkpoint": {"path": str(pre.path.resolve()), "sha256": pre.sha256, **pre.trained,
                       # (the code that wrote it; the commit only from a git checkout's runs)
                       "massrl_version": pre.meta.get("version"),
                       "massrl_commit": pre.meta.get("commit"),
                       "method": pre.config.method, "run_name": pre.config.run_name,
                       "backbone": pre.spec.to_dict(), "pretrain_dataset": pre.config.data.name,
                       "pretrain_image_size": pre.config.data.image_size},
        "config": run.cfg.model_dump(mode="json"),
        # (the online monitors' features are the training precision's: docs/evaluation.md)
        "features": {"precision": "float32", "backbone_mode": "eval",
                     "channels_last": channels_last(run)},
    }
    if run.splits is not None:
        if "data" in info["config"]:  # the size evaluated at (a transfer's own, unless asked)
            info["config"]["data"]["image_size"] = run.image_size
        info["dataset"] = {
            "name": run.cfg.data.name, "transfer": run.transfer, "image_size": run.image_size,
            "num_classes": run.splits.num_classes, "split_seed": run.split_seed,
            "test_transform": test_transform_info(run),
            "sizes": {"train": len(run.splits.train_labeled), "test": len(run.splits.test)},
        }
    return info


def finish(run: EvalRun, title: str, results: dict[str, Any], rows: list[tuple[str, str]],
           name: str = "result.json") -> Path:
    """Write <output_dir>/<name> (result.json) and print the result table."""
    path = run.output_dir / name
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"created": time.strftime("%Y-%m-%dT%H:%M:%S"), "results": results,
               "protocol": protocol(run), "warnings": run.warnings}
    write_record(path, json_text(payload, indent=2, default=str) + "\n")
    console = Console()
    step = run.pre.trained["global_step"]
    if step is not None:  # (which state of a run that goes on: last.ckpt is replaced)
        title += f" (epoch index {run.pre.trained['epoch']}, step {step})"
    console.print(title, style="bold", highlight=False)  # (a table's title wraps to its width)
    console.print(result_table(rows))
    # plain print, absolute: a script takes the last line (rich wrapped a long path at the
    # terminal's or 80 columns, and `| tail -1` got its end)
    print(f"result: {os.path.abspath(path)}", flush=True)
    return path


def result_table(rows: list[tuple[str, str]]) -> Table:
    """The rows as a two-column table: short values (figures) right-aligned, so their digits
    line up; where some are long (paths), all left-aligned, as one reads them."""
    table = Table(show_header=False)
    table.add_column()
    table.add_column(justify="left" if any(len(v) > 24 for _, v in rows) else "right")
    for name, value in rows:
        table.add_row(name, value)
    return table


def pct(x: float) -> str:
    return f"{100 * x:.2f} %"
