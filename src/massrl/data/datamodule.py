"""Lightning data module: multi-view training batches and labeled evaluation loaders."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from massrl.config import RunConfig
from massrl.data.datasets import (
    DatasetSplits,
    check_covers_the_classes,
    class_balanced,
    load_dataset,
)
from massrl.data.eval_transform import EvalTransform
from massrl.data.folder import UnusableDataError
from massrl.data.loading import (
    MappedDataset,
    ViewsItem,
    labeled_images,
    make_loader,
    run_worker_init_fn,
)
from massrl.data.sampler import ResumableLoader, ResumableSampler
from massrl.devices import augment_backend, run_num_workers


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

    # (no prepare_data: train.build_datamodule sets the data up in every process before the
    # Trainer exists, downloads taking turns through data.download_lock; loading it again in
    # Lightning's prepare_data read a dataset twice)
    def setup(self, stage: str | None = None) -> None:
        if self._splits is None:
            self._splits = load_dataset(self.cfg.data, seed=self.cfg.seed)
            if self.cfg.eval.knn_bank is not None:
                check_covers_the_classes("eval.knn_bank", self.cfg.eval.knn_bank, self._splits)

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

        aug, size = self.cfg.augment, self.cfg.data.image_size
        # (the engine's package loads numba: imported only when needed)
        if augment_backend(self.cfg) == "batched":
            from massrl.augment.batched import CropOnlyTransform

            return CropOnlyTransform(aug, size)
        return MultiViewTransform(aug, size, self.splits.mean, self.splits.std)

    def train_dataloader(self) -> DataLoader:
        if self.train_transform is None:
            self.train_transform = self.default_train_transform()
        # a transform of one's own without a source_side gets full-size images
        dataset = MappedDataset(self.splits.train, ViewsItem(self.train_transform))
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        self.check_fills_a_batch(world)
        sampler = ResumableSampler(len(dataset), self.cfg.seed, self.cfg.data.batch_size,
                                   rank=rank, world_size=world)
        loader = self._loader(dataset, sampler=sampler, drop_last=True, cls=ResumableLoader)
        if trainer is not None:
            progress = trainer.fit_loop.epoch_loop.batch_progress
            loader.consumed = lambda: progress.current.ready
            loader.next_epoch = lambda: trainer.fit_loop.epoch_progress.current.processed
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
        bank = splits.train_labeled
        if self.cfg.eval.knn_bank is not None:  # (the probe is validated on the test split)
            bank = class_balanced(bank, self.cfg.eval.knn_bank, self.cfg.seed)
        return [self._loader(labeled_images(split, transform)) for split in (bank, splits.test)]

    def _loader(self, dataset: Dataset, **kwargs: Any) -> DataLoader:
        data, trainer = self.cfg.data, self.trainer
        # pinned memory helps only a copy to a GPU, the one the trainer runs on when attached
        device = (trainer.strategy.root_device if trainer is not None
                  else "cuda" if torch.cuda.is_available() else "cpu")
        return make_loader(dataset, data.batch_size, num_workers=run_num_workers(self.cfg),
                           device=device, pin_memory=data.pin_memory,
                           persistent_workers=data.persistent_workers,
                           worker_init=run_worker_init_fn, **kwargs)
