"""Per-image augmentation: strategies, crops, multi-view making and pair masks."""

from massrl.data.eval_transform import EvalTransform  # (the test-time transform, shared)

from .crops import UniformCrop, build_crop
from .fast_autoaugment import FastAutoAugment
from .strategies import build_strategy
from .views import MultiViewTransform, View, pair_mask

__all__ = [
    "EvalTransform",
    "FastAutoAugment",
    "MultiViewTransform",
    "UniformCrop",
    "View",
    "build_crop",
    "build_strategy",
    "pair_mask",
]
