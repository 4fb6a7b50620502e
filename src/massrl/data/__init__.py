"""Datasets (offline discovery, image folders, subsets) and the Lightning data module."""

from typing import Any

from massrl.data.datasets import (
    DatasetNotFoundError,
    DatasetSplits,
    UnusableDataError,
    load_dataset,
)
from massrl.data.folder import BadImageWarning
from massrl.data.images import BadImageError, load_image
from massrl.data.loading import collate_skip_bad, labeled_images, make_loader, worker_init_fn
from massrl.data.subset import balanced_subset, fraction_subset, random_subset

__all__ = [
    "BadImageError",
    "BadImageWarning",
    "DatasetNotFoundError",
    "DatasetSplits",
    "SSLDataModule",
    "UnusableDataError",
    "balanced_subset",
    "collate_skip_bad",
    "fraction_subset",
    "labeled_images",
    "load_dataset",
    "load_image",
    "make_loader",
    "random_subset",
    "worker_init_fn",
]


def __getattr__(name: str) -> Any:
    # the data module imports Lightning (~2 s, ~110 MB), which the evaluation commands that
    # use this package's datasets and loaders do not need
    if name == "SSLDataModule":
        from massrl.data.datamodule import SSLDataModule

        return SSLDataModule
    raise AttributeError(f"module 'massrl.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), "SSLDataModule"])
