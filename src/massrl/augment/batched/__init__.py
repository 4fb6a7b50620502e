"""Batched augmentation backend (augment.backend=batched).

DataLoader workers only crop and resize (`CropOnlyTransform`, uint8 views); `BatchedAugmenter` then
applies every strategy to the whole batch on the training device, each image with its own strategy,
sub-policy, ops and magnitudes. In a LightningModule::

    def on_before_batch_transfer(self, batch, dataloader_idx):
        return plan_batch(batch, self.augmenter, self.device)  # (optional: for GPUs)

    def on_after_batch_transfer(self, batch, dataloader_idx):
        return augment_batch(batch, self.augmenter)
"""

from .engine import BatchedAugmenter, augment_batch
from .plan import Plan, count_strategies, plan_batch
from .policies import Op, PolicySampler, Program
from .transform import CropOnlyTransform

__all__ = [
    "BatchedAugmenter", "CropOnlyTransform", "Op", "PolicySampler", "Program", "augment_batch",
    "Plan", "count_strategies", "plan_batch",
]
