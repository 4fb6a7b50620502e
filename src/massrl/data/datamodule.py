"""Lightning data module: multi-view training batches and labeled evaluation loaders."""

from __future__ import annotations

import math
import random
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate

from massrl.config import RunConfig
from massrl.data.datasets import DatasetSplits, load_dataset
from massrl.data.eval_transform import EvalTransform
from massrl.data.folder import UnusableDataError
from massrl.data.images import decode_at_least
from massrl.data.sampler import ResumableLoader, ResumableSampler
from massrl.devices import run_num_workers


@dataclass(frozen=True)
class BadItem:
    """An undecodable image, by its index in the dataset: lets the training loop count bad
    files once each, however many epochs meet them."""

    index: int


def collate_skip_bad(batch: list[Any]) -> dict[str, Any]:
    """Drop ``None`` and `BadItem` items (undecodable images), default-collate the rest and add
    ``"skipped"`` (their number) and, for BadItems, ``"skipped_index"`` (their indices).

    Items are dicts (as the data module makes them); other items are returned under ``"data"``.
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
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    seed = torch.initial_seed() % 2**32  # base_seed + worker_id, drawn from the loader generator
    random.seed(seed)
    # hashed, so numpy's stream is not a shifted copy of a neighbouring worker's
    np.random.seed(np.random.SeedSequence(seed).generate_state(4))


class _Mapped(Dataset):
    """Applies ``fn(image, label) -> dict`` to each item; a bad (None) item becomes a BadItem.
    ``decode_side``: the transform's ``source_side`` (large JPEGs are decoded down to it)."""

    def __init__(self, base: Dataset, fn: Callable[[Image.Image, int], dict],
                 decode_side: int | None = None) -> None:
        self.base, self.fn, self.decode_side = base, fn, decode_side

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int | tuple[int, int]) -> dict | None:
        if isinstance(index, tuple):  # (index, seed) from ResumableSampler: seed this image's views
            index, seed = index
            torch.manual_seed(seed)
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


class _TrainItem:
    """Picklable (for worker processes): the multi-view dict of the transform plus the label."""

    def __init__(self, transform: Callable[[Image.Image], dict]) -> None:
        self.transform = transform

    def __call__(self, image: Image.Image, label: int) -> dict:
        out = dict(self.transform(image))
        out["label"] = int(label)
        return out


class _EvalItem:
    def __init__(self, transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.transform = transform

    def __call__(self, image: Image.Image, label: int) -> dict:
        return {"image": self.transform(image), "label": int(label)}


class SSLDataModule(L.LightningDataModule):
    """Train batches ``{"views": [V x [B,3,S,S]], "strategy": [B,V], "crop": [B,V], "label": [B],
    "index": [B], "skipped": int}``; validation loaders ``[bank, test]`` of ``{"image", "label",
    "index", "skipped"}`` (index = position in the split).

    ``train_transform`` maps a PIL image to ``{"views", "strategy", "crop"}``; by default the
    one of ``cfg.augment.backend`` (`default_train_transform`). ``splits``: datasets of one's
    own (``DatasetSplits`` of datasets yielding ``(PIL image, label)``) instead of
    ``cfg.data``'s.
    """

    def __init__(
        self, cfg: RunConfig, train_transform: Callable[[Image.Image], dict] | None = None,
        splits: DatasetSplits | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.train_transform = train_transform
        self._splits = splits

    # ------------------------------------------------------------ setup

    def prepare_data(self) -> None:
        # Runs on one process per node: the only place a download may happen, so ranks don't race.
        if self.cfg.data.download:
            load_dataset(self.cfg.data, seed=self.cfg.seed)

    def setup(self, stage: str | None = None) -> None:
        if self._splits is None:
            # After prepare_data the files exist, so download=True only verifies them here.
            self._splits = load_dataset(self.cfg.data, seed=self.cfg.seed)

    @property
    def splits(self) -> DatasetSplits:
        if self._splits is None:
            self.setup()
        return self._splits

    @property
    def num_classes(self) -> int | None:
        return self.splits.num_classes

    @property
    def has_labels(self) -> bool:
        """Whether labeled evaluation (kNN, probe) is possible: a labeled bank and a test split."""
        return self.splits.train_labeled is not None and self.splits.test is not None

    # ------------------------------------------------------------ loaders

    def default_train_transform(self) -> Callable[[Image.Image], dict]:
        """The views of cfg.augment: the whole per-image pipeline, or (backend=batched) only the
        crops, which the model's BatchedAugmenter then augments on its device."""
        from massrl.augment import MultiViewTransform
        from massrl.augment.batched import CropOnlyTransform

        aug, size = self.cfg.augment, self.cfg.data.image_size
        if aug.backend == "batched":
            return CropOnlyTransform(aug, size)
        return MultiViewTransform(aug, size, self.splits.mean, self.splits.std)

    def train_dataloader(self) -> DataLoader:
        if self.train_transform is None:
            self.train_transform = self.default_train_transform()
        # a transform of one's own without a source_side gets full-size images
        dataset = _Mapped(self.splits.train, _TrainItem(self.train_transform),
                          getattr(self.train_transform, "source_side", None))
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        self.check_fills_a_batch(world)
        sampler = ResumableSampler(len(dataset), self.cfg.seed, self.cfg.data.batch_size,
                                   rank=rank, world_size=world)
        loader = self._loader(dataset, sampler=sampler, drop_last=True, cls=ResumableLoader)
        if trainer is not None:
            progress = trainer.fit_loop.epoch_loop.batch_progress
            loader.consumed = lambda: progress.current.ready
        return loader

    def train_batches_per_epoch(self, world_size: int = 1) -> int:
        """Batches each rank trains on per epoch (shards padded as in ResumableSampler, the last
        partial batch dropped)."""
        per_rank = math.ceil(len(self.splits.train) / world_size)
        return per_rank // self.cfg.data.batch_size

    def check_fills_a_batch(self, world_size: int = 1) -> None:
        """Refuse a training split that cannot fill one batch per rank: Lightning would train
        nothing and finish as if all went well."""
        if self.train_batches_per_epoch(world_size) > 0:
            return
        n = len(self.splits.train)
        per_rank = math.ceil(n / world_size)
        where = f" ({per_rank} per device on {world_size})" if world_size > 1 else ""
        raise UnusableDataError(
            f"the training split has {n} images{where}, fewer than one batch of data.batch_size="
            f"{self.cfg.data.batch_size} (each epoch drops its last partial batch): set "
            f"data.batch_size={per_rank} or less, or add images")

    def val_dataloader(self) -> list[DataLoader]:
        if not self.has_labels:
            return []
        splits = self.splits
        transform = EvalTransform(self.cfg.data.image_size, splits.mean, splits.std,
                                  native_size=splits.native_size)
        item, side = _EvalItem(transform), transform.source_side
        return [
            self._loader(_Mapped(splits.train_labeled, item, side), shuffle=False,
                         drop_last=False),
            self._loader(_Mapped(splits.test, item, side), shuffle=False, drop_last=False),
        ]

    def _loader(self, dataset: Dataset, cls: type[DataLoader] = DataLoader,
                **kwargs: Any) -> DataLoader:
        data = self.cfg.data
        workers = run_num_workers(self.cfg)
        return cls(
            dataset,
            batch_size=data.batch_size,
            num_workers=workers,
            collate_fn=collate_skip_bad,
            # pinning without a GPU only costs time (and warns)
            pin_memory=data.pin_memory and torch.cuda.is_available(),
            persistent_workers=data.persistent_workers and workers > 0,
            worker_init_fn=worker_init_fn if workers > 0 else None,
            **kwargs,
        )
