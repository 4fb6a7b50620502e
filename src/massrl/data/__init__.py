"""Datasets (offline discovery, image folders, subsets) and the Lightning data module."""

from massrl.data.datamodule import SSLDataModule, collate_skip_bad, worker_init_fn
from massrl.data.datasets import (
    DatasetNotFoundError,
    DatasetSplits,
    UnusableDataError,
    load_dataset,
)
from massrl.data.folder import BadImageWarning
from massrl.data.images import BadImageError, load_image
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
    "load_dataset",
    "load_image",
    "random_subset",
    "worker_init_fn",
]
