"""Worker-side half of the batched backend: decode, crop and resize only, hand over uint8.

`CropOnlyTransform` makes the same views as massrl.augment.MultiViewTransform (same crops, same
view modes, same strategy and crop ids) but stops before the strategies, which then run on the
whole batch on the training device (engine.BatchedAugmenter).
"""

from __future__ import annotations

import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from massrl.augment.crops import build_crop
from massrl.config import AugmentConfig


def num_views(cfg: AugmentConfig) -> int:
    """Views per image of cfg.view_mode."""
    s = len(cfg.strategies)
    return {"random": cfg.num_views, "per_strategy": s,
            "crops_x_strategies": cfg.num_crops * s}[cfg.view_mode]


class CropOnlyTransform:
    """PIL image -> {"views": [V x uint8[3,S,S]], "strategy": Long[V], "crop": Long[V]}."""

    def __init__(self, cfg: AugmentConfig, image_size: int) -> None:
        self.cfg = cfg
        self.image_size = image_size
        self.crop = build_crop(cfg, image_size)
        self.num_strategies = len(cfg.strategies)
        self.num_views = num_views(cfg)

    def _crop(self, img: Image.Image) -> torch.Tensor:
        return F.pil_to_tensor(self.crop(img)).contiguous()

    def __call__(self, img: Image.Image) -> dict:
        img = img if img.mode == "RGB" else img.convert("RGB")  # grey datasets repeat to 3 channels
        n, mode = self.num_strategies, self.cfg.view_mode
        if mode == "random":
            views = [self._crop(img) for _ in range(self.num_views)]
            strategy = torch.randint(n, (self.num_views,))
            crop = torch.arange(self.num_views)
        elif mode == "per_strategy":
            views = [self._crop(img) for _ in range(n)]
            strategy = crop = torch.arange(n)
        else:  # crops_x_strategies: crop-major, every strategy on each shared crop
            crops = [self._crop(img) for _ in range(self.cfg.num_crops)]
            views = [c for c in crops for _ in range(n)]
            strategy = torch.arange(n).repeat(self.cfg.num_crops)
            crop = torch.arange(self.cfg.num_crops).repeat_interleave(n)
        return {"views": views, "strategy": strategy.long(), "crop": crop.long()}

    def __repr__(self) -> str:
        return (f"CropOnlyTransform(mode={self.cfg.view_mode}, views={self.num_views}, "
                f"size={self.image_size}, crop={self.crop!r})")
