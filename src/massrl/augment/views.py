"""Making the views of one image from several augmentation strategies, and the loss's pair masks.

View modes (README, "Multi-augmentation views"):
  random              cfg.num_views views, each its own crop and a strategy drawn per view
  per_strategy        one view per strategy, each its own crop; view k = strategy k
  crops_x_strategies  cfg.num_crops shared crops, every strategy on every crop (V = C * S)
Every view then gets a horizontal flip (p=0.5), conversion to float and normalisation.
Each view carries a strategy id (index into cfg.strategies) and a crop id for pair masks and labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from massrl.config import AugmentConfig
from massrl.data.eval_transform import channel_stats
from massrl.data.images import as_rgb

from .crops import build_crop, crop_source_side
from .strategies import Strategy, build_strategy

PAIRS = ("all", "cross_strategy", "within_strategy", "cross_crop")


@dataclass
class View:
    tensor: torch.Tensor  # float [3, S, S], normalised
    strategy: int
    strategy_name: str
    crop: int
    ops: list[str] = field(default_factory=list)
    image: Image.Image | None = None  # the un-normalised picture, for display


def pil_to_chw(img: Image.Image) -> torch.Tensor:
    """RGB PIL picture -> uint8 [3, H, W]. The HWC -> CHW copy is numpy's: half the time of
    torch's uint8 permute-and-copy (pil_to_tensor) at 224 px."""
    # (np.array copies always: for a 1-pixel image the transposed view is already contiguous,
    # and torch warns on numpy's read-only PIL buffer)
    return torch.from_numpy(np.array(np.asarray(img).transpose(2, 0, 1), order="C"))


def _to_normalised(img: Image.Image, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """PIL picture -> float [3, H, W] = level * scale + shift (scale = 1 / (255 std), shift =
    -mean / std): one copy to float and two in-place passes, a third of the time of pil_to_tensor,
    to_dtype and (x - mean) / std at 224 px, which allocate a float copy per step."""
    chw = pil_to_chw(as_rgb(img))
    return torch.empty(chw.shape, dtype=torch.float32).copy_(chw).mul_(scale).add_(shift)


def _affine(mean: tuple, std: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) of _to_normalised for these per-channel statistics."""
    mean, std = channel_stats(mean, std)
    m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return 1 / (255 * s), -m / s


class MultiViewTransform:
    """PIL image -> {"views": [V x float[3,S,S]], "strategy": Long[V], "crop": Long[V]}.

    ``source_side``: the shorter side beyond which a source image adds no detail to any view
    (datasets may decode large JPEGs down to it)."""

    def __init__(
        self, cfg: AugmentConfig, image_size: int, mean: tuple, std: tuple
    ) -> None:
        self.cfg = cfg
        self.image_size = image_size
        self.strategy_names: tuple[str, ...] = tuple(cfg.strategies)
        self._scale, self._shift = _affine(mean, std)
        self.crop = build_crop(cfg, image_size)
        self.source_side = crop_source_side(cfg, image_size)
        self.num_views = cfg.views_per_image
        # The asymmetric simclr pipeline alternates with this index: the view index in random
        # mode, the crop index in crops_x_strategies (so the two crops differ). per_strategy has
        # one simclr view: it takes the first pipeline wherever simclr sits in the list (its
        # position chose the pipeline: [randaugment, simclr] blurred a tenth of its views).
        slots = {"random": self.num_views, "per_strategy": 1,
                 "crops_x_strategies": cfg.num_crops}[cfg.view_mode]
        self._strategies: list[list[Strategy]] = [
            [build_strategy(name, cfg, i) for name in self.strategy_names] for i in range(slots)
        ]

    def _view(self, cropped: Image.Image, slot: int, sid: int, crop_id: int) -> View:
        img, ops = self._strategies[slot][sid](cropped)
        if float(torch.rand(())) < 0.5:
            img = F.horizontal_flip(img)
            ops = [*ops, "HFlip"]
        tensor = _to_normalised(img, self._scale, self._shift)
        return View(tensor, sid, self.strategy_names[sid], crop_id, ops, img)

    def sample(self, img: Image.Image) -> list[View]:
        """All views of one image, with their labels and pictures."""
        img = as_rgb(img)
        S, mode = len(self.strategy_names), self.cfg.view_mode
        if mode == "random":
            return [
                self._view(self.crop(img), v, int(torch.randint(S, ())), v)
                for v in range(self.num_views)
            ]
        if mode == "per_strategy":
            return [self._view(self.crop(img), 0, k, k) for k in range(S)]
        views = []
        for c in range(self.cfg.num_crops):
            cropped = self.crop(img)  # shared by every strategy of this crop
            views.extend(self._view(cropped, c, s, c) for s in range(S))
        return views

    def __call__(self, img: Image.Image) -> dict:
        views = self.sample(img)
        return {
            "views": [v.tensor for v in views],
            "strategy": torch.tensor([v.strategy for v in views], dtype=torch.long),
            "crop": torch.tensor([v.crop for v in views], dtype=torch.long),
        }

    def __repr__(self) -> str:
        return (
            f"MultiViewTransform(mode={self.cfg.view_mode}, views={self.num_views}, "
            f"strategies={self.strategy_names}, crop={self.crop!r})"
        )


def pair_mask(strategy: torch.Tensor, crop: torch.Tensor, pairs: str = "all") -> torch.Tensor:
    """Bool [B, V, V]: which ordered view pairs (i, j), i != j, enter the loss.

    all: every pair; cross_strategy / within_strategy: strategy ids differ / match;
    cross_crop: crop ids differ.
    """
    if pairs not in PAIRS:
        raise ValueError(f"unknown pairs '{pairs}'; choose from {PAIRS}")
    B, V = strategy.shape
    off_diag = ~torch.eye(V, dtype=torch.bool, device=strategy.device)
    same_strategy = strategy[:, :, None] == strategy[:, None, :]
    if pairs == "all":
        keep = torch.ones(B, V, V, dtype=torch.bool, device=strategy.device)
    elif pairs == "cross_strategy":
        keep = ~same_strategy
    elif pairs == "within_strategy":
        keep = same_strategy
    else:
        keep = crop[:, :, None] != crop[:, None, :]
    return keep & off_diag


def sparse_pairs_note(cfg: AugmentConfig) -> str | None:
    """A note when view_mode=random leaves most view pairs out of the loss: a strategy drawn
    uniformly per view makes two views share it with probability 1/S."""
    S = len(cfg.strategies)
    kept = {"within_strategy": 1 / S, "cross_strategy": 1 - 1 / S}.get(cfg.pairs, 1.0)
    if cfg.view_mode != "random" or kept > 0.5:
        return None
    better = ("view_mode=crops_x_strategies (num_crops >= 2) pairs every strategy with itself"
              if cfg.pairs == "within_strategy" else
              "view_mode=per_strategy gives every view pair distinct strategies")
    return (f"note: augment.pairs={cfg.pairs} with view_mode=random and {S} strategies keeps "
            f"about {kept:.0%} of the view pairs (views draw their strategy independently); "
            f"the rest cost augmentation and encoder time without entering the loss. {better}.")
