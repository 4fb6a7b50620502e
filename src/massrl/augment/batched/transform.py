"""Worker-side half of the batched backend: decode, crop and resize only, hand over uint8.

`CropOnlyTransform` makes views as massrl.augment.MultiViewTransform does (the same crop kinds,
view modes and layout of strategy and crop ids, from its own random draws: not the same pixels
or, in random view mode, the same strategies for a seed) but stops before the strategies, which
then run on the whole batch on the training device (engine.BatchedAugmenter). From 64 px the
crops are resized by torch's uint8 kernel instead of PIL's (levels within 1 of PIL's, 2.4x
faster at 224 px).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from massrl.augment.batched.draws import new_seeds
from massrl.augment.crops import UniformCrop, build_crop, crop_source_side
from massrl.augment.views import pil_to_chw
from massrl.config import AugmentConfig
from massrl.data.images import as_rgb

RATIO = (3 / 4, 4 / 3)
TENSOR_RESIZE_FROM = 64  # view side (px) from which crops are resized by torch, not PIL


def rrc_box(width: int, height: int, scale: tuple[float, float],
            ratio: tuple[float, float] = RATIO) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (left, top, right, bottom): area ~ U[scale] of the image, log aspect
    ratio ~ U[log ratio], 10 tries, then the largest centred crop of clamped ratio. The same
    distribution as torchvision's, from one torch RNG draw (workers' seeding applies) and plain
    float maths, because torchvision's per-call overhead exceeds a 32 px resize."""
    u = torch.rand(40).tolist()
    area, lo, hi = width * height, math.log(ratio[0]), math.log(ratio[1])
    for k in range(0, 40, 4):
        target = area * (scale[0] + (scale[1] - scale[0]) * u[k])
        aspect = math.exp(lo + (hi - lo) * u[k + 1])
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = min(int(u[k + 2] * (height - h + 1)), height - h)
            left = min(int(u[k + 3] * (width - w + 1)), width - w)
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return left, top, left + w, top + h


class CropOnlyTransform:
    """PIL image -> {"views": [V x uint8[3,S,S]], "strategy": Long[V], "crop": Long[V],
    "seed": Long[V]} (each view's augmentation seed, for the engine).

    In crops_x_strategies mode "views" holds the num_crops shared crops (V = num_crops x S
    strategies); "strategy" and "crop" still describe all V views."""

    def __init__(self, cfg: AugmentConfig, image_size: int) -> None:
        self.cfg = cfg
        self.image_size = image_size
        self.crop = build_crop(cfg, image_size)
        self.source_side = crop_source_side(cfg, image_size)  # see MultiViewTransform
        self.num_strategies = len(cfg.strategies)
        self.num_views = cfg.views_per_image

    def _box(self, img: Image.Image) -> tuple[int, int, int, int]:
        if isinstance(self.crop, UniformCrop):
            top, left, side = self.crop.params(img.size[1], img.size[0])
            return left, top, left + side, top + side
        return rrc_box(img.size[0], img.size[1], tuple(self.cfg.crop_scale))

    def _crop(self, img: Image.Image) -> torch.Tensor:
        # crop + antialiased bilinear resize: what torchvision's resized_crop does on PIL
        # (resize(box=...) would differ: its filter reads outside the box)
        size = self.image_size
        box = img.crop(self._box(img))
        if size >= TENSOR_RESIZE_FROM:
            # torch's uint8 antialiased kernel, within 1 level of PIL's (tested):
            # 2.4x faster than PIL at 224 px, slower below 64 px (per-call costs)
            hwc = torch.from_numpy(np.array(box)).permute(2, 0, 1)[None]  # channels-last view
            out = F.interpolate(hwc, size=(size, size), mode="bilinear", antialias=True)
            return out[0].contiguous()
        return pil_to_chw(box.resize((size, size), Image.Resampling.BILINEAR))

    def __call__(self, img: Image.Image) -> dict:
        img = as_rgb(img)
        n, mode = self.num_strategies, self.cfg.view_mode
        if mode == "random":
            views = [self._crop(img) for _ in range(self.num_views)]
            strategy = torch.randint(n, (self.num_views,))
            crop = torch.arange(self.num_views)
        elif mode == "per_strategy":
            views = [self._crop(img) for _ in range(n)]
            strategy = crop = torch.arange(n)
        else:  # crops_x_strategies: crop-major, every strategy on each shared crop. Only the
            # crops travel (the collate would otherwise stack each one S times); the engine
            # expands them back to the V views (BatchedAugmenter.expand)
            views = [self._crop(img) for _ in range(self.cfg.num_crops)]
            strategy = torch.arange(n).repeat(self.cfg.num_crops)
            crop = torch.arange(self.cfg.num_crops).repeat_interleave(n)
        # each view's own augmentation seed, from this worker's generator (see draws.py)
        seed = new_seeds((len(strategy),))
        return {"views": views, "strategy": strategy.long(), "crop": crop.long(), "seed": seed}

    def __repr__(self) -> str:
        return (f"CropOnlyTransform(mode={self.cfg.view_mode}, views={self.num_views}, "
                f"size={self.image_size}, crop={self.crop!r})")
