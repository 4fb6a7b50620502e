"""Configs of the evaluation commands (`massrl knn|linear|umap|export`).

The data section defaults to the checkpoint's own (same dataset, root, subsets, image size and
normalisation), so the offline numbers match the online monitors; naming another dataset
(data.name=...) switches to transfer, where only the dataset-independent loader settings are kept.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from massrl.config import (
    ConfigError,
    DataConfig,
    RunConfig,
    Section,
    build_config,
    dotted_items,
    load_yaml,
    parse_overrides,
    root_path,
    set_dotted,
)
from massrl.config.section import UserPath

# Loader settings that do not depend on which dataset is read: kept when evaluating on another one.
DATASET_INDEPENDENT = ("download", "batch_size", "num_workers", "pin_memory",
                       "persistent_workers", "strict")


class _Base(Section):
    ckpt: UserPath = Field("", validate_default=True,
                      description="(required) massrl pre-training checkpoint")
    output_dir: UserPath | None = Field(None,
                                        description="default: runs/eval/<command>/<timestamp>")
    seed: int | None = Field(None, ge=0, lt=2**32, description="default: the checkpoint's seed")
    device: Literal["auto", "cpu", "cuda", "mps"] = Field(
        "auto", description="auto: a CUDA GPU, else an Apple GPU (mps), else the CPU")

    @field_validator("ckpt", mode="before")
    @classmethod
    def _required(cls, v: object) -> object:
        if v is None or v == "":  # (`ckpt=` reads as null)
            raise ValueError("ckpt=PATH is required (a checkpoint written by `massrl pretrain`)")
        return v


class EvalDataConfig(DataConfig):
    """The data keys as an evaluation reads them (the same keys, other words in --help)."""

    eval_subset: int | None = Field(
        None, gt=0, description="seeded class-balanced subset of the labeled train and test "
        "splits (default: the checkpoint's; null: whole splits)")
    image_size: int = Field(32, gt=0, description="evaluation image size (default: the "
                            "checkpoint's; another dataset: its own)")
    batch_size: int = Field(256, gt=0, description="images per feature-extraction batch")


class _DataEval(_Base):
    data: EvalDataConfig = Field(default_factory=EvalDataConfig)
    test_crop_ratio: float | None = Field(
        None, gt=0, le=1,
        description="test: resize to size/ratio, centre crop (default: 1 up to 64 px or the "
                    "dataset's own image size, else 0.875)",
    )
    cache: bool = Field(True, description="cache features per checkpoint, split and transform")
    cache_dir: UserPath | None = Field(None, description="default: ~/.cache/massrl/features")


class KnnEvalConfig(_DataEval):
    k: list[int] = Field(default_factory=lambda: [20, 200], min_length=1,
                         description="neighbours; one result per k (k=200 or k=[20,200])")
    temperature: float = Field(0.07, gt=0, description="vote weight exp(sim / temperature)")
    distance: Literal["cosine", "euclidean"] = "cosine"
    normalize: bool = Field(True, description="L2-normalise features (cosine always does)")

    @field_validator("k", mode="before")
    @classmethod
    def _one_k(cls, v: object) -> object:
        if isinstance(v, str) and "," in v:  # k=20,200 as well as k=[20,200]
            v = [part.strip() for part in v.split(",")]
        return v if isinstance(v, (list, tuple)) else [v]  # one k, whatever its type

    @field_validator("k")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(k < 1 for k in v):
            raise ValueError("every k must be >= 1")
        return list(dict.fromkeys(v))  # each k once, in the order given


class LinearEvalConfig(_DataEval):
    epochs: int = Field(100, gt=0, description="epochs of the head's (or fine-tuning's) training")
    lr: float = Field(0.1, gt=0, description="SGD learning rate of the linear head (cosine decay)")
    batch_size: int = Field(256, gt=0, description="images per training step of the head "
                            "(data.batch_size: per feature-extraction batch)")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    nesterov: bool = Field(False, description="Nesterov momentum (SimCLR's fine-tuning)")
    weight_decay: float = Field(0.0, ge=0, description="SGD weight decay")
    features_cached: bool = Field(
        False, description="train on cached features of un-augmented images (fast)"
    )
    crop_scale: tuple[float, float] = Field((0.08, 1.0), description="train random-resized-crop")
    label_fraction: float | None = Field(
        None, description="train on a seeded class-balanced fraction of the labels, in (0, 1]"
    )
    finetune: bool = Field(False, description="train the whole network, not only the head")
    backbone_lr: float | None = Field(None, gt=0, description="finetune: backbone lr (default lr)")
    subset_file: UserPath | None = Field(
        None, description="reuse the label subset a run saved (JSON), or a text file of image "
        "file names, one per line (SimCLR's 1 % / 10 % ImageNet lists)")

    @field_validator("label_fraction")
    @classmethod
    def _fraction(cls, v: float | None) -> float | None:
        if v is not None and not 0 < v <= 1:
            raise ValueError("label_fraction must be in (0, 1], e.g. 0.01 or 0.1")
        return v

    @field_validator("crop_scale")
    @classmethod
    def _range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1] <= 1:
            raise ValueError("need 0 < low <= high <= 1")
        return v

    @model_validator(mode="after")
    def _modes(self) -> LinearEvalConfig:
        if self.finetune and self.features_cached:
            raise ValueError("finetune=true trains the backbone, so features_cached must be false")
        if self.backbone_lr is not None and not self.finetune:
            raise ValueError("backbone_lr applies to finetune=true only (the linear protocol "
                             "keeps the backbone frozen)")
        return self


class UmapEvalConfig(_DataEval):
    out: UserPath | None = Field(None, description="PNG path (default: <output_dir>/umap.png)")
    split: Literal["train", "test"] = Field("train", description="labeled split to embed")
    max_points: int | None = Field(5000, ge=3, description="seeded subsample for speed")
    n_neighbors: int = Field(15, gt=1)
    min_dist: float = Field(0.1, ge=0)
    n_epochs: int | None = Field(None, gt=0, description="default: umap-learn's")


class ExportConfig(_Base):
    out: UserPath | None = Field(None,
                                 description="weights path (default: <output_dir>/backbone.pt)")


def same_data(name: str, root: str | None, pretrain: DataConfig) -> bool:
    """Whether an evaluation reads the pre-training data: the same dataset and the same root,
    however spelled (relative, with ~ or a trailing slash), or the dataset's default folder."""
    return name == pretrain.name and root_path(root, name) == root_path(pretrain.root, name)


def inherited_data(pretrain: RunConfig, requested: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's data section, trimmed to loader settings if other data is asked for."""
    data = pretrain.data.model_dump(mode="json")
    pre = pretrain.data
    if not same_data(requested.get("name", pre.name), requested.get("root", pre.root), pre):
        data = {k: data[k] for k in DATASET_INDEPENDENT}
    return data


def raw_tree(config_file: str | Path | None, overrides: list[str] | None) -> dict[str, Any]:
    """YAML file + overrides before validation (to find ckpt and data.name first)."""
    tree = load_yaml(config_file) if config_file is not None else {}
    for key, value in parse_overrides(overrides or []):
        for dotted, item in dotted_items(key, value):  # (as build_config reads them)
            set_dotted(tree, dotted, item)
    return tree


def build_eval_config(
    schema: type[_Base],
    config_file: str | Path | None,
    overrides: list[str] | None,
    pretrain: RunConfig | None,
) -> Any:
    """Validated config whose defaults come from the pre-training run config where it has them."""
    base: dict[str, Any] = {}
    if pretrain is not None:
        base["seed"] = pretrain.seed
        if "data" in schema.model_fields:
            requested = raw_tree(config_file, overrides).get("data") or {}
            if not isinstance(requested, dict):
                raise ConfigError("data must be a mapping of keys, e.g. data.name=cifar10")
            base["data"] = inherited_data(pretrain, requested)
    return build_config(schema, config_file, overrides, base=base)


# the default output folders this process has claimed, with the outermost folder made for each
_RESERVED: list[tuple[Path, Path | None]] = []


def default_output_dir(command: str) -> Path:
    """runs/eval/<command>/<date-time>, with -2, -3, ... for another run in the same second;
    made at once (an atomic mkdir), so that runs started together each get their own.
    `release_output_dirs` removes it again if nothing was written into it."""
    from massrl.run_dir import outermost_missing

    base = Path("runs") / "eval" / command / time.strftime("%Y%m%d-%H%M%S")
    made = outermost_missing(base.parent.resolve())
    base.parent.mkdir(parents=True, exist_ok=True)
    path, n = base, 1
    while True:
        try:
            path.mkdir()
            break
        except FileExistsError:
            n += 1
            path = base.with_name(f"{base.name}-{n}")
    _RESERVED.append((path.resolve(), made))
    return path


def release_output_dirs() -> None:
    """Remove the default output folders of this process that stayed empty (a failed run, or
    one whose files went elsewhere), and the parents made for them that are empty too."""
    from massrl.run_dir import remove_empty_folders

    while _RESERVED:
        path, made = _RESERVED.pop()
        try:
            path.rmdir()  # (only when empty)
        except OSError:
            continue
        remove_empty_folders(path.parent, made)
