"""Crops that start every view: torchvision's RandomResizedCrop or the paper's uniform square crop.

Both crop at the source resolution and then resize to `size`, so tiny inputs (8x8 digits,
28x28 Fashion-MNIST) upsample to any requested size.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from PIL import Image
from torchvision.transforms.v2 import InterpolationMode, RandomResizedCrop
from torchvision.transforms.v2 import functional as F

from massrl.config import AugmentConfig

Crop = Callable[[Image.Image], Image.Image]


class UniformCrop:
    """Square crop with side ~ U[low, high] x the shorter side, at a uniform random position."""

    def __init__(self, size: int, side_range: tuple[float, float] = (0.5, 1.0)) -> None:
        self.size = size
        self.low, self.high = side_range

    def params(
        self, height: int, width: int, generator: torch.Generator | None = None
    ) -> tuple[int, int, int]:
        """(top, left, side) in source pixels."""
        frac = self.low + (self.high - self.low) * float(torch.rand((), generator=generator))
        side = max(1, min(round(frac * min(height, width)), height, width))
        top = int(torch.randint(height - side + 1, (), generator=generator))
        left = int(torch.randint(width - side + 1, (), generator=generator))
        return top, left, side

    def __call__(self, img: Image.Image, generator: torch.Generator | None = None) -> Image.Image:
        top, left, side = self.params(img.size[1], img.size[0], generator)
        return F.resized_crop(
            img, top, left, side, side, [self.size, self.size],
            interpolation=InterpolationMode.BILINEAR, antialias=True,
        )

    def __repr__(self) -> str:
        return f"UniformCrop(size={self.size}, side_range=({self.low}, {self.high}))"


def build_crop(cfg: AugmentConfig, size: int) -> Crop:
    """The crop named by cfg.crop producing `size` x `size` pictures."""
    if cfg.crop == "rrc":
        # torchvision draws from the global torch RNG, which DataLoader seeds per worker
        return RandomResizedCrop(
            size, scale=tuple(cfg.crop_scale), ratio=(3 / 4, 4 / 3), antialias=True
        )
    if cfg.crop == "uniform":
        return UniformCrop(size, tuple(cfg.uniform_crop_range))
    raise ValueError(f"unknown crop '{cfg.crop}'; choose rrc or uniform")


def rrc_source_side(size: int, scale: tuple[float, float]) -> int:
    """Shorter image side beyond which RandomResizedCrop(size, scale, ratio 3/4..4/3) gains no
    detail: its crop's shorter side is at least sqrt(scale_min x 3/4) of the image's, so at this
    side even the smallest crop still spans `size` pixels (decoding larger only costs time)."""
    return math.ceil(size / math.sqrt(scale[0] * 3 / 4))


def crop_source_side(cfg: AugmentConfig, size: int) -> int:
    """`rrc_source_side` of cfg's crop (uniform crop: size / its smallest side fraction)."""
    if cfg.crop == "uniform":
        return math.ceil(size / cfg.uniform_crop_range[0])
    return rrc_source_side(size, tuple(cfg.crop_scale))
