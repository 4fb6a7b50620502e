"""From a dataset of (PIL image, label) pairs to batches: the one item mapping and loader that
training views and evaluation images share, the collate that skips undecodable files, and the
seeding of worker processes."""

from __future__ import annotations

import gc
import random
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate

from massrl.data.images import decode_at_least
from massrl.data.sampler import seed_torch


@dataclass(frozen=True)
class BadItem:
    """An undecodable image, by its index in the dataset: lets the training loop count bad
    files once each, however many epochs meet them."""

    index: int


def collate_skip_bad(batch: list[Any]) -> dict[str, Any]:
    """Drop ``None`` and `BadItem` items (undecodable images), default-collate the rest and add
    ``"skipped"`` (their number) and, for BadItems, ``"skipped_index"`` (their indices).

    Items are dicts (as `MappedDataset` makes them); other items are returned under ``"data"``.
    When every item is bad the result holds only those keys: consumers must check for the
    data keys (e.g. ``"views" in batch``) and skip such a batch.
    """
    good = [item for item in batch if item is not None and not isinstance(item, BadItem)]
    bad = [item.index for item in batch if isinstance(item, BadItem)]
    collated: dict[str, Any] = {}
    if good:
        collated = default_collate(good)
        if not isinstance(collated, dict):
            collated = {"data": collated}
    collated["skipped"] = len(batch) - len(good)
    if bad:
        collated["skipped_index"] = bad
    return collated


def worker_init_fn(worker_id: int) -> None:
    """One torch thread per worker (per-sample augmentation is parallel across workers, and
    threads inside each would oversubscribe the cores), and python/numpy seeded from torch's
    per-worker seed so random augmentations differ between workers yet repeat across runs.
    Ctrl-C is the main process's (which stops at the next step with a checkpoint): a worker
    that died of it would fail that step first."""
    # the objects a forked worker inherits are left out of its garbage collections: a full one
    # touched every one of them, copying the parent's pages into each worker (at 100k files,
    # 16 -> 147 MiB private memory per worker; 34 MiB frozen)
    gc.freeze()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    seed = torch.initial_seed() % 2**32  # base_seed + worker_id, drawn from the loader generator
    random.seed(seed)
    # hashed, so numpy's stream is not a shifted copy of a neighbouring worker's
    np.random.seed(np.random.SeedSequence(seed).generate_state(4))


# the signals a job scheduler stops a run with (Windows has no SIGUSR1)
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1")
                     if hasattr(signal, name))


def run_worker_init_fn(worker_id: int) -> None:
    """worker_init_fn of a pre-training run's loaders: SIGTERM and SIGUSR1 are the main
    process's too, which stops at a step with a checkpoint and then ends its workers (a worker
    that died of one sent to the whole process group, by a job scheduler or `timeout`, failed
    the run's next batch first). Other loaders keep the default: multiprocessing ends a loader's
    workers left at interpreter exit with SIGTERM."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    worker_init_fn(worker_id)


class MappedDataset(Dataset):
    """Applies ``fn(image, label) -> dict`` to each item of ``base`` and adds ``"index"``; a bad
    (None) item becomes a `BadItem`. Large JPEGs are decoded down to ``decode_side`` (default:
    ``fn``'s ``source_side``, the transform's, if it has one; None: full size)."""

    def __init__(self, base: Dataset, fn: Callable[[Image.Image, int], dict],
                 decode_side: int | None = None) -> None:
        self.base, self.fn = base, fn
        self.decode_side = decode_side or getattr(fn, "source_side", None)

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int | tuple[int, int]) -> dict | BadItem:
        if isinstance(index, tuple):  # (index, seed) from ResumableSampler: seed this image's views
            index, seed = index
            seed_torch(seed)  # (the transforms draw on the CPU)
            random.seed(seed)
            np.random.seed(seed % 2**32)
        with decode_at_least(self.decode_side):
            item = self.base[index]
        if item is None:
            return BadItem(index)
        if not (isinstance(item, tuple | list) and len(item) == 2):
            raise TypeError(f"item {index} of the dataset is a {type(item).__name__}: massrl's "
                            "datasets yield (PIL image, label) pairs, label -1 when unlabeled")
        # the dataset index travels with the sample: gathered evaluation features drop the
        # repeats a DistributedSampler pads an uneven split with (SSLMethod._gather)
        return {**self.fn(*item), "index": index}


class ViewsItem:
    """Picklable (for worker processes): the multi-view dict of a training transform
    (``{"views", "strategy", "crop"}``) plus the label."""

    def __init__(self, transform: Callable[[Image.Image], dict]) -> None:
        self.transform = transform
        self.source_side = getattr(transform, "source_side", None)

    def __call__(self, image: Image.Image, label: int) -> dict:
        out = dict(self.transform(image))
        out["label"] = int(label)
        return out


class ImageItem:
    """Picklable: ``{"image": transform(image), "label"}``, an evaluation item."""

    def __init__(self, transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.transform = transform
        self.source_side = getattr(transform, "source_side", None)

    def __call__(self, image: Image.Image, label: int) -> dict:
        return {"image": self.transform(image), "label": int(label)}


def labeled_images(base: Dataset, transform: Callable[[Image.Image], torch.Tensor],
                   decode_side: int | None = None) -> MappedDataset:
    """``{"image", "label", "index"}`` items of ``base`` through ``transform``."""
    return MappedDataset(base, ImageItem(transform), decode_side)


def make_loader(
    dataset: Dataset, batch_size: int, *, shuffle: bool = False, seed: int = 0,
    num_workers: int = 0, device: torch.device | str = "cpu", pin_memory: bool = True,
    persistent_workers: bool = False, cls: type[DataLoader] = DataLoader,
    worker_init: Callable[[int], None] = worker_init_fn, **kwargs: Any,
) -> DataLoader:
    """A loader that skips undecodable images; shuffling is seeded. ``pin_memory`` applies when
    ``device`` is a GPU (pinning for the CPU only costs time, and warns); ``persistent_workers``
    keeps the workers of a loader read every epoch. ``cls`` and ``kwargs`` (a sampler,
    ``drop_last``) for the training loader."""
    return cls(
        dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
        collate_fn=collate_skip_bad,
        generator=torch.Generator().manual_seed(seed) if shuffle else None,
        pin_memory=pin_memory and torch.device(device).type == "cuda",
        persistent_workers=persistent_workers and num_workers > 0,
        worker_init_fn=worker_init if num_workers > 0 else None,
        **kwargs,
    )
