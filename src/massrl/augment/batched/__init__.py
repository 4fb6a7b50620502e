"""Batched augmentation backend (augment.backend=batched).

DataLoader workers only crop and resize (`CropOnlyTransform`, uint8 views); `BatchedAugmenter` then
applies every strategy to the whole batch on the training device, each image with its own strategy,
sub-policy, ops and magnitudes. In a LightningModule::

    def on_before_batch_transfer(self, batch, dataloader_idx):
        return count_strategies(batch, self.augmenter)  # (optional: helps the GPU's full mode)

    def on_after_batch_transfer(self, batch, dataloader_idx):
        return augment_batch(batch, self.augmenter)
"""

from .engine import BatchedAugmenter, augment_batch, count_strategies
from .policies import Op, PolicySampler, Program
from .transform import CropOnlyTransform, num_views

__all__ = [
    "BatchedAugmenter", "CropOnlyTransform", "Op", "PolicySampler", "Program", "augment_batch",
    "count_strategies", "num_views",
]
