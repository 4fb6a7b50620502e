"""What a dataset loader returns (`DatasetSplits`) and how it says a dataset is missing; shared by
the registry (datasets.py) and the image-folder loaders (folder_splits.py)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Dataset

from massrl.config import DataConfig, default_root

IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


class DatasetNotFoundError(FileNotFoundError):
    """The dataset is not where massrl looked; the message lists the places and how to get it."""

    exit_status = 2  # (the command's exit status: cli._failure)


@dataclass
class DatasetSplits:
    """The datasets of a run; each item is ``(PIL image, label)``, label -1 when unlabeled.

    Datasets of one's own go to ``SSLDataModule(cfg, splits=DatasetSplits(train=...))`` and are
    used as given: the config's data selection (``data.name``, ``root``, ``subset``,
    ``eval_subset``, ``mean``, ``std``) applies to the datasets massrl loads, not to these.
    Only ``train`` is needed; the online kNN monitor and probe run when ``train_labeled`` and
    ``test`` are given, with ``num_classes`` (or ``classes``, which gives it).
    """

    train: Dataset  # pre-training images
    train_labeled: Dataset | None = None  # kNN bank / linear-probe training; may be `train`
    test: Dataset | None = None
    num_classes: int | None = None
    classes: list[str] | None = None
    mean: tuple[float, float, float] = IMAGENET_STATS[0]  # the input normalisation
    std: tuple[float, float, float] = IMAGENET_STATS[1]
    native_size: int | None = None  # the images' typical side (evaluation transfer uses it)

    def __post_init__(self) -> None:
        if self.num_classes is None and self.classes is not None:
            self.num_classes = len(self.classes)
        labeled = self.train_labeled is not None and self.test is not None
        if labeled and self.num_classes is None:
            raise ValueError("DatasetSplits with train_labeled and test needs num_classes (or "
                             "classes) for the kNN monitor and probe; leave train_labeled=None "
                             "to pre-train without them")
        for name in ("mean", "std"):
            values = tuple(float(v) for v in getattr(self, name))
            if len(values) != 3 or (name == "std" and min(values) <= 0):
                raise ValueError(f"DatasetSplits.{name} must be 3 channel values"
                                 + (", all > 0" if name == "std" else "") + f": got {values}")
            if max(abs(v) for v in values) > 1:  # images are scaled to [0, 1] before
                raise ValueError(f"DatasetSplits.{name}={values} looks like 0-255 values: "
                                 "give them on the [0, 1] scale (divide by 255)")
            setattr(self, name, values)


def not_found(name: str, looked: Sequence[str | Path], how: Sequence[str]) -> DatasetNotFoundError:
    """The error for a missing dataset: where massrl looked, and the ways to get it."""
    lines = [f"dataset '{name}' not found. Looked in:"]
    lines += [f"  - {p}" for p in looked]
    lines.append("To get it:")
    lines += [f"  - {h}" for h in how]
    return DatasetNotFoundError("\n".join(lines))


def dataset_root(cfg: DataConfig) -> Path:
    """data.root, or the dataset's default folder."""
    return Path(cfg.root).expanduser() if cfg.root else default_root(cfg.name)
