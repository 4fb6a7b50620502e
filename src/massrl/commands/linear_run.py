"""The work of `massrl linear` (imported when it runs, so that its --help loads no torch)."""

from __future__ import annotations

import argparse
import hashlib
import json
from typing import Any

import torch
from torch.utils.data import Dataset, Subset

from massrl.augment.crops import rrc_source_side
from massrl.config import ConfigError
from massrl.data.folder import files_fingerprint
from massrl.data.loading import labeled_images, make_loader
from massrl.data.sampler import ResumableSampler
from massrl.eval import session
from massrl.eval.config import LinearEvalConfig
from massrl.eval.features import cached_features, train_transform
from massrl.eval.label_subsets import (
    file_list_indices,
    is_file_list,
    label_subset,
    split_identity,
)
from massrl.eval.linear import (
    LinearResult,
    SGDRecipe,
    train_linear_on_features,
    train_on_images,
)
from massrl.models.backbones import feature_dim


def _targets(ds: Dataset) -> list[int]:
    targets = getattr(ds, "targets", None)
    if targets is None:  # no label list: read the items (slow, decodes every image once)
        targets = [ds[i][1] for i in range(len(ds))]  # type: ignore[arg-type]
    return [int(t) for t in targets]


def _train_set(r: session.EvalRun) -> tuple[Dataset, dict[str, Any]]:
    """The labeled training images, restricted to the label fraction when one is asked for:
    drawn (seeded, class-balanced), reused from a run's saved file, or named by a file list."""
    cfg, ds = r.cfg, r.splits.train_labeled
    if cfg.label_fraction is None and cfg.subset_file is None:
        return ds, {"label_fraction": None, "num_train": len(ds)}
    try:
        if cfg.subset_file is not None and is_file_list(cfg.subset_file):
            indices = file_list_indices(ds, cfg.subset_file, cfg.label_fraction)
            path, fraction = cfg.subset_file, len(indices) / len(ds)
        else:
            indices, path, fraction = label_subset(
                _targets(ds), cfg.label_fraction, cfg.seed, dataset=cfg.data.name,
                subset_file=cfg.subset_file, save_dir=r.output_dir,
                source={"images": split_identity(ds)})
    except (ValueError, OSError) as exc:
        raise ConfigError(str(exc)) from None
    digest = hashlib.sha256(json.dumps(indices).encode()).hexdigest()
    info = {"label_fraction": fraction, "num_train": len(indices),
            "subset_file": str(path) if path else None, "subset_sha256": digest}
    return Subset(ds, indices), info


def _cached_mode(r: session.EvalRun, train: Dataset, subset: dict[str, Any],
                 recipe: SGDRecipe) -> LinearResult:
    cfg = r.cfg
    if subset["label_fraction"] is None and cfg.subset_file is None:
        train_x, train_y = session.features(r, "train")
    else:  # features of exactly the chosen images (bad images may be skipped, so no indexing)
        key = {"ckpt_sha256": r.pre.sha256, "split": "train-subset",
               "subset_sha256": subset["subset_sha256"], "seed": cfg.seed,
               "split_seed": r.split_seed, "dataset": cfg.data.name, "root": cfg.data.root,
               "subset": cfg.data.subset, "eval_subset": cfg.data.eval_subset,
               "num_samples": len(train), "files": files_fingerprint(train),
               **session.extraction_info(r)}
        train_x, train_y = cached_features(
            r.pre.backbone, labeled_images(train, session.test_transform(r)), key,
            cache_dir=cfg.cache_dir, use_cache=cfg.cache, device=r.device,
            batch_size=cfg.data.batch_size, channels_last=key["channels_last"],
            **session.loader_options(r))
        session.warn_left_out(r, len(train) - len(train_y), len(train), "train")
    subset["num_train"] = len(train_y)  # (features of the images that decoded)
    test_x, test_y = session.features(r, "test")
    return train_linear_on_features(train_x, train_y, test_x, test_y, r.splits.num_classes,
                                    recipe, cfg.seed, r.device)


def _image_mode(r: session.EvalRun, train: Dataset, recipe: SGDRecipe) -> LinearResult:
    cfg, s = r.cfg, r.splits
    aug = train_transform(r.image_size, s.mean, s.std, tuple(cfg.crop_scale))
    side = rrc_source_side(r.image_size, tuple(cfg.crop_scale))
    # every image every epoch: dropping the last partial batch left out up to half of a small
    # label fraction (1 % of CIFAR-10 at batch 256: 244 of 500); a batch of one, which
    # batch-norm cannot train on, is skipped by the training loop
    # and each image's crop is seeded by (seed, epoch, image), as in pre-training: the figures
    # do not depend on the number of workers
    images = labeled_images(train, aug, side)
    loader = make_loader(images, cfg.batch_size, device=r.device,
                         sampler=ResumableSampler(len(images), cfg.seed, cfg.batch_size),
                         **session.loader_options(r, every_epoch=True))
    common = dict(finetune=cfg.finetune, seed=cfg.seed, device=r.device,
                  channels_last=session.channels_last(r))
    if cfg.finetune:
        test = labeled_images(s.test, session.test_transform(r))
        common["test_loader"] = make_loader(test, cfg.data.batch_size, device=r.device,
                                            **session.loader_options(r, every_epoch=True))
    else:
        common["test_features"] = session.features(r, "test")
    return train_on_images(r.pre.backbone, s.num_classes, feature_dim(r.pre.backbone), loader,
                           recipe, **common)


def run(args: argparse.Namespace) -> int:
    r = session.start("linear", LinearEvalConfig, args)
    if r is None:
        return 0
    session.open_data(r)
    cfg = r.cfg
    torch.manual_seed(cfg.seed)
    train, subset = _train_set(r)
    recipe = SGDRecipe(cfg.epochs, cfg.lr, cfg.batch_size, cfg.momentum, cfg.weight_decay,
                       cfg.nesterov, cfg.backbone_lr)
    mode = "finetune" if cfg.finetune else "cached" if cfg.features_cached else "augmented"
    result = (_cached_mode(r, train, subset, recipe) if mode == "cached"
              else _image_mode(r, train, recipe))
    results = {"mode": mode, **subset, **result.to_dict()}
    # (features are of the images that decoded, and have been warned about already)
    results["num_train"] -= results.pop("train_left_out")
    session.warn_left_out(r, result.train_left_out, subset["num_train"], "train")
    session.warn_left_out(r, results.pop("test_left_out"), len(r.splits.test), "test")
    rows = [("mode", mode), ("training images", str(results["num_train"])),
            ("top-1 (last epoch)", session.pct(result.top1)),
            ("top-5 (last epoch)", session.pct(result.top5)),
            (f"best top-1 (epoch {result.best_epoch})", session.pct(result.best_top1))]
    frac = f", {cfg.label_fraction:g} of labels" if cfg.label_fraction else ""
    title = f"linear ({mode}) - {r.pre.config.method} {r.pre.path.name} on {cfg.data.name}{frac}"
    session.finish(r, title, results, rows)
    return 0
