"""Uniform crops and the view layouts: every position reachable, the pixels of the box, crops shared
as the view mode says.

Found by mutation testing: each test fails under a small plausible bug the suite missed."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def test_uniform_crops_reach_every_position_and_stay_inside_the_image():
    """UniformCrop: a uniform position over every place the square fits,
    the last row and column included, on images taller than wide too. A bug (off by one:
    never the last row) and another (height and width swapped into params) fail."""
    from massrl.augment import UniformCrop

    crop = UniformCrop(8, (0.5, 0.5))
    g = torch.Generator().manual_seed(0)
    params = [crop.params(12, 20, g) for _ in range(3000)]
    assert {side for _, _, side in params} == {6}
    assert {top for top, _, _ in params} == set(range(12 - 6 + 1))
    assert {left for _, left, _ in params} == set(range(20 - 6 + 1))
    # on a picture: a crop of an all-white image taller than wide (and wider than tall) is all
    # white, never padded with black from outside the image
    torch.manual_seed(0)
    for size in ((10, 40), (40, 10)):
        white = Image.new("RGB", size, (255, 255, 255))
        for _ in range(200):
            assert np.asarray(crop(white)).min() == 255, size


def test_a_uniform_crop_takes_the_pixels_at_its_box():
    """the picture of a uniform crop is the box params() drew (top is the
    row, left the column). A bug (top and left swapped into resized_crop) crops elsewhere."""
    from massrl.augment import UniformCrop

    arr = np.zeros((30, 50, 3), dtype=np.uint8)
    arr[..., 0] = np.arange(30)[:, None] * 8  # red: the row
    arr[..., 1] = np.arange(50)[None, :] * 5  # green: the column
    img = Image.fromarray(arr)
    crop = UniformCrop(10, (1 / 3, 1 / 3))  # side 10: no resize
    for seed in range(20):
        top, left, side = crop.params(30, 50, torch.Generator().manual_seed(seed))
        out = np.asarray(crop(img, torch.Generator().manual_seed(seed)))
        assert side == 10
        assert np.array_equal(out, arr[top:top + 10, left:left + 10]), (top, left)

def test_crops_x_strategies_crops_each_crop_once_and_per_strategy_once_per_view():
    """crops_x_strategies: every strategy sees the SAME crop of crop id c
    (the pair masks' cross_crop and within-crop pairs rest on it); per_strategy: one crop per
    view. A bug (a new crop for every view) gives views of one crop id other boxes."""
    from massrl.augment import MultiViewTransform
    from massrl.config import AugmentConfig

    cfg = AugmentConfig(view_mode="crops_x_strategies", num_crops=2,
                        strategies=["simclr", "randaugment"])
    t = MultiViewTransform(cfg, 16, (0.5,), (0.5,))
    boxes = []
    real = t.crop

    def counted(img):
        out = real(img)
        boxes.append(out)
        return out

    t.crop = counted
    out = t(Image.new("RGB", (20, 20)))
    assert len(boxes) == 2 and out["crop"].tolist() == [0, 0, 1, 1]
    boxes.clear()
    t = MultiViewTransform(AugmentConfig(view_mode="per_strategy",
                                         strategies=["simclr", "randaugment"]), 16, (0.5,), (0.5,))
    real = t.crop
    t.crop = counted
    t(Image.new("RGB", (20, 20)))
    assert len(boxes) == 2
