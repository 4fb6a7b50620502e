"""The one test-time transform: online monitors during pre-training, `massrl knn`, `massrl linear`
and `massrl umap` all see a test image the same way, so their numbers agree on one checkpoint.

Also the check of the normalisation statistics every transform and the batched engine take.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from massrl.data.images import as_rgb

SMALL_IMAGE = 64  # up to this size a test image is seen whole (see test_resize)


def channel_stats(mean: Sequence[float] | float, std: Sequence[float] | float
                  ) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Per-channel (mean, std) of RGB inputs: one value (a grey dataset's) serves all three
    channels; std must be positive (the inputs are divided by it)."""
    out = []
    for name, value in (("mean", mean), ("std", std)):
        values = [value] if isinstance(value, int | float) else list(value)
        if len(values) == 1:
            values *= 3
        if len(values) != 3:
            raise ValueError(f"{name} needs 1 or 3 values (the inputs are RGB), got {len(values)}")
        out.append(tuple(float(v) for v in values))
    if min(out[1]) <= 0:
        raise ValueError(f"std must be positive in every channel, got {list(out[1])}")
    return out[0], out[1]


def test_resize(image_size: int, crop_ratio: float | None = None,
                native_size: int | None = None) -> tuple[int, float]:
    """(resize side, ratio): an image seen at no more than its own size (``native_size``, the
    dataset's typical side: STL-10 at 96 px) or a small one is evaluated whole, as solo-learn
    evaluates CIFAR and STL-10; a larger one (ImageNet at 224 px) with the 0.875 centre crop."""
    if crop_ratio is None:
        whole = image_size <= SMALL_IMAGE or (native_size is not None and image_size >= native_size)
        crop_ratio = 1.0 if whole else 0.875
    return round(image_size / crop_ratio), crop_ratio


def centre_band(img: Image.Image, most: int = 3) -> Image.Image:
    """A long thin image (a banner) cut to its centre band of `most` x its shorter side (at
    least 8 px more, the bicubic filter's reach when a tiny image is enlarged): resized whole, a
    1 x 10,000 px image became 256 x 2,560,000 at 224 px (3.5 GB). The band holds what the
    centre crop shows, but its resize falls on a grid up to a pixel apart from the whole
    image's, so the view can differ by a sub-pixel shift (a few levels at ~20 source pixels
    per side; visibly where a few source pixels are enlarged to 224). Others are untouched."""
    w, h = img.size
    side = max(most * min(w, h), min(w, h) + 8)
    if max(w, h) <= side:
        return img
    if w > h:
        return img.crop(((w - side) // 2, 0, (w - side) // 2 + side, h))
    return img.crop((0, (h - side) // 2, w, (h - side) // 2 + side))


class EvalTransform:
    """PIL image of any mode -> float [3, S, S]: the shorter side resized (bicubic) to S / ratio,
    a centre S x S crop, normalised (see `test_resize` for the ratio). ``source_side``: the
    shorter side beyond which a source image adds no detail (the resize side)."""

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float],
                 crop_ratio: float | None = None, native_size: int | None = None) -> None:
        self.image_size = image_size
        self.resize, self.crop_ratio = test_resize(image_size, crop_ratio, native_size)
        self.source_side = self.resize
        self.mean, self.std = channel_stats(mean, std)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = F.resize(centre_band(as_rgb(img)), [self.resize], InterpolationMode.BICUBIC,
                       antialias=True)
        img = F.center_crop(img, [self.image_size, self.image_size])
        return F.normalize(F.to_tensor(img), self.mean, self.std)

    def __repr__(self) -> str:
        return (f"EvalTransform(image_size={self.image_size}, resize={self.resize}, "
                f"crop_ratio={self.crop_ratio})")
