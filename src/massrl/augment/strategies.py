"""The augmentation strategies of MASSRL, each applied per image with its own random draws.

`build_strategy(name, cfg, view_index)` returns a callable
`(PIL RGB image, generator=None) -> (PIL image, ops applied)`. Every draw uses torch's RNG (the
given generator, else the global one that DataLoader seeds per worker), so runs are reproducible.

RandAugment, AutoAugment and TrivialAugmentWide reuse torchvision's op spaces, policies and op
implementations, but the selection loop is ours: torchvision's transforms do not report which ops
they chose, and the picture of views needs exact labels. The loops consume the RNG in the same order
as torchvision's, so with the same seed they produce torchvision's output exactly (tested).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import numpy as np
import torch
from PIL import Image, ImageFilter
from torchvision.transforms.v2 import (
    AutoAugment,
    AutoAugmentPolicy,
    RandAugment,
    TrivialAugmentWide,
)
from torchvision.transforms.v2 import functional as F

from massrl import plugins
from massrl.config import AugmentConfig

from .fast_autoaugment import ENHANCE_OPS, FastAutoAugment, apply_tv_op, format_op

Strategy = Callable[..., tuple[Image.Image, list[str]]]
OpSpace = dict[str, tuple[Callable, bool]]  # torchvision's: op -> (magnitudes(bins, h, w), signed)


def _rand(generator: torch.Generator | None) -> float:
    return float(torch.rand((), generator=generator))


def _randint(n: int, generator: torch.Generator | None) -> int:
    return int(torch.randint(n, (), generator=generator))


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * _rand(generator)


def _signed(value: float, signed: bool, generator: torch.Generator | None) -> float:
    # torchvision flips the sign with `rand <= 0.5`; same comparison keeps the outputs identical
    return -value if signed and _rand(generator) <= 0.5 else value


class _OpsStrategy:
    """Base of the torchvision-space strategies: draw (op, magnitude) pairs, then apply them."""

    def draw(self, height: int, width: int, generator: torch.Generator | None = None) -> list:
        raise NotImplementedError

    def __call__(
        self, img: Image.Image, generator: torch.Generator | None = None
    ) -> tuple[Image.Image, list[str]]:
        drawn = self.draw(img.size[1], img.size[0], generator)
        for op, value in drawn:
            img = apply_tv_op(img, op, value)
        return img, [format_op(*label_scale(op, value)) for op, value in drawn]


def label_scale(op: str, value: float) -> tuple[str, float]:
    """A torchvision-space magnitude on the scale Fast AutoAugment's labels use, so that every
    strategy's picture labels read alike: enhance ops as their factor (torchvision's value is
    factor - 1), Solarize as a threshold on 0..255 (torchvision's is a fraction of it)."""
    if op in ENHANCE_OPS:
        return op, 1.0 + value
    if op == "Solarize":
        return op, 255.0 * value
    return op, value


class RandAugmentStrategy(_OpsStrategy):
    """N ops drawn uniformly from torchvision's RandAugment space, all at magnitude bin M."""

    # class attributes: the spaces hold lambdas, which must not be pickled into DataLoader workers
    space: ClassVar[OpSpace] = RandAugment._AUGMENTATION_SPACE

    def __init__(self, num_ops: int = 2, magnitude: int = 9, num_magnitude_bins: int = 11) -> None:
        self.num_ops, self.magnitude, self.bins = num_ops, magnitude, num_magnitude_bins
        self.ops = tuple(self.space)

    def draw(self, height: int, width: int, generator: torch.Generator | None = None) -> list:
        drawn = []
        for _ in range(self.num_ops):
            op = self.ops[_randint(len(self.ops), generator)]
            magnitudes_fn, signed = self.space[op]
            values = magnitudes_fn(self.bins, height, width)
            if values is None:
                drawn.append((op, 0.0))
            else:
                drawn.append((op, _signed(float(values[self.magnitude]), signed, generator)))
        return drawn


class AutoAugmentStrategy(_OpsStrategy):
    """One of torchvision's AutoAugment sub-policies per image, each op with its probability."""

    space: ClassVar[OpSpace] = AutoAugment._AUGMENTATION_SPACE

    def __init__(self, policy: str = "imagenet") -> None:
        self.policy = AutoAugmentPolicy(policy)
        # torchvision holds the published policy tables; reuse them rather than restate them
        self.subpolicies = AutoAugment(self.policy)._policies

    def draw(self, height: int, width: int, generator: torch.Generator | None = None) -> list:
        sub = self.subpolicies[_randint(len(self.subpolicies), generator)]
        drawn = []
        for op, prob, level in sub:
            if not _rand(generator) <= prob:
                continue
            magnitudes_fn, signed = self.space[op]
            values = magnitudes_fn(10, height, width)  # AutoAugment's fixed 10 magnitude bins
            value = 0.0 if values is None else _signed(float(values[level]), signed, generator)
            drawn.append((op, value))
        return drawn


class TrivialAugmentStrategy(_OpsStrategy):
    """One op from TrivialAugmentWide's space at a uniformly drawn magnitude bin."""

    space: ClassVar[OpSpace] = TrivialAugmentWide._AUGMENTATION_SPACE

    def __init__(self, num_magnitude_bins: int = 31) -> None:
        self.bins = num_magnitude_bins
        self.ops = tuple(self.space)

    def draw(self, height: int, width: int, generator: torch.Generator | None = None) -> list:
        op = self.ops[_randint(len(self.ops), generator)]
        magnitudes_fn, signed = self.space[op]
        values = magnitudes_fn(self.bins, height, width)
        if values is None:
            return [(op, 0.0)]
        value = float(values[_randint(self.bins, generator)])
        return [(op, _signed(value, signed, generator))]


class FastAutoAugmentStrategy:
    def __init__(self, policy: str = "imagenet") -> None:
        self.faa = FastAutoAugment(policy)

    def __call__(
        self, img: Image.Image, generator: torch.Generator | None = None
    ) -> tuple[Image.Image, list[str]]:
        img, drawn = self.faa(img, generator)
        return img, [format_op(op, value) for op, value in drawn]


def gaussian_blur(img: Image.Image, sigma: float) -> Image.Image:
    """Gaussian blur with a kernel of ~10% of the image side (BYOL's 23 px at 224 px).

    Kernels up to 5x5 (images below ~60 px) are applied exactly, truncated like torchvision's, via
    PIL's 2-D kernel filter on a reflect-padded copy (PIL leaves borders unfiltered otherwise).
    Larger kernels use PIL's GaussianBlur, 6x faster than torchvision's at 224 px and nearly
    untruncated there anyway.
    """
    k = max(3, int(0.1 * min(img.size)) | 1)
    if k > 5:
        return img.filter(ImageFilter.GaussianBlur(radius=sigma))
    x = np.arange(k) - k // 2
    w1 = np.exp(-(x**2) / (2 * sigma**2))
    w2 = np.outer(w1, w1).ravel()
    pad = k // 2
    arr = np.asarray(img)
    padded = np.pad(arr, ((pad, pad), (pad, pad)) + ((0, 0),) * (arr.ndim - 2), mode="reflect")
    blurred = Image.fromarray(padded).filter(
        ImageFilter.Kernel((k, k), w2.tolist(), scale=float(w2.sum()))
    )
    return blurred.crop((pad, pad, pad + img.size[0], pad + img.size[1]))


class SimCLRStrategy:
    """SimCLR/BYOL colour pipeline: colour jitter, grayscale, blur, solarize(128), each with its
    probability (defaults: BYOL's first view)."""

    def __init__(self, blur_p: float = 1.0, solarize_p: float = 0.0,
                 jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1),
                 jitter_p: float = 0.8, grayscale_p: float = 0.2) -> None:
        self.blur_p, self.solarize_p = blur_p, solarize_p
        self.jitter = jitter  # brightness, contrast, saturation, hue
        self.jitter_p, self.grayscale_p = jitter_p, grayscale_p

    def _color_jitter(self, img: Image.Image, g: torch.Generator | None) -> Image.Image:
        b, c, s, h = self.jitter
        # torchvision's ColorJitter ranges: a factor never below 0
        factors = [_uniform(max(0.0, 1 - x), 1 + x, g) for x in (b, c, s)]
        hue = _uniform(-h, h, g)
        fns = [
            lambda im: F.adjust_brightness(im, factors[0]),
            lambda im: F.adjust_contrast(im, factors[1]),
            lambda im: F.adjust_saturation(im, factors[2]),
            lambda im: F.adjust_hue(im, hue),
        ]
        for i in torch.randperm(4, generator=g).tolist():  # random order, as ColorJitter does
            img = fns[i](img)
        return img

    def __call__(
        self, img: Image.Image, generator: torch.Generator | None = None
    ) -> tuple[Image.Image, list[str]]:
        ops = []
        if _rand(generator) < self.jitter_p:
            img = self._color_jitter(img, generator)
            ops.append("ColorJitter")
        if _rand(generator) < self.grayscale_p:
            img = F.rgb_to_grayscale(img, num_output_channels=3)
            ops.append("Grayscale")
        if _rand(generator) < self.blur_p:
            sigma = _uniform(0.1, 2.0, generator)
            img = gaussian_blur(img, sigma)
            ops.append(f"Blur({sigma:.2f})")
        if _rand(generator) < self.solarize_p:
            img = F.solarize(img, threshold=128)
            ops.append("Solarize(128)")
        return img, ops


def build_strategy(name: str, cfg: AugmentConfig, view_index: int = 0) -> Strategy:
    """A per-image strategy. `view_index` matters only for simclr with cfg.asymmetric: odd views
    get the second view's blur and solarize probabilities (cfg.simclr, BYOL's by default)."""
    if name == "simclr":
        sc = cfg.simclr
        blur_p, solarize_p = sc.first_and_second(cfg.asymmetric and view_index % 2 == 1)
        return SimCLRStrategy(blur_p, solarize_p, sc.jitter, sc.jitter_p, sc.grayscale_p)
    if name == "randaugment":
        ra = cfg.randaugment
        return RandAugmentStrategy(ra.num_ops, ra.magnitude, ra.num_magnitude_bins)
    if name == "autoaugment":
        return AutoAugmentStrategy(cfg.autoaugment_policy)
    if name == "fastautoaugment":
        return FastAutoAugmentStrategy(cfg.fastautoaugment_policy)
    if name == "trivialaugment":
        return TrivialAugmentStrategy()
    if name in plugins.STRATEGIES:
        return plugins.STRATEGIES[name].per_image(cfg, view_index)
    raise ValueError(
        f"unknown strategy '{name}'; choose from simclr, randaugment, autoaugment, "
        "fastautoaugment, trivialaugment"
    )
