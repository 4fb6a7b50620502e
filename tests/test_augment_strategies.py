"""Strategies: output format, per-image diversity, torchvision equivalence, magnitudes, simclr."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from massrl.augment import build_strategy
from massrl.augment.strategies import RandAugmentStrategy, gaussian_blur
from massrl.config import AugmentConfig

STRATEGIES = ["simclr", "randaugment", "autoaugment", "fastautoaugment", "trivialaugment"]


def _textured(size=32, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    base = np.stack([xx * 6, yy * 6, (xx + yy) * 3], axis=-1)
    return Image.fromarray(np.clip(base + rng.integers(0, 50, base.shape), 0, 255).astype(np.uint8))


@pytest.mark.parametrize("name", STRATEGIES)
def test_output_format_and_per_image_diversity(name):
    strategy = build_strategy(name, AugmentConfig(), 0)
    img = _textured()
    torch.manual_seed(0)
    outputs = set()
    for _ in range(50):
        out, ops = strategy(img)
        assert isinstance(out, Image.Image) and out.mode == "RGB" and out.size == img.size
        assert isinstance(ops, list) and all(isinstance(o, str) for o in ops)
        outputs.add(np.asarray(out).tobytes())
    # every image draws its own ops/magnitudes; AutoAugment has only 25 sub-policies
    assert len(outputs) >= (15 if name == "autoaugment" else 30)


@pytest.mark.parametrize("name", STRATEGIES)
def test_generator_reproducible(name):
    strategy = build_strategy(name, AugmentConfig(), 1)
    img = _textured()
    runs = [strategy(img, torch.Generator().manual_seed(3)) for _ in range(2)]
    assert runs[0][1] == runs[1][1]
    assert np.array_equal(np.asarray(runs[0][0]), np.asarray(runs[1][0]))


@pytest.mark.parametrize(
    "name,reference",
    [
        ("randaugment", v2.RandAugment(num_ops=2, magnitude=9, num_magnitude_bins=11)),
        ("autoaugment", v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET)),
        ("trivialaugment", v2.TrivialAugmentWide()),
    ],
)
def test_labelled_selection_equals_torchvision(name, reference):
    """Our selection loop consumes the RNG like torchvision's: same seed, same picture."""
    strategy = build_strategy(name, AugmentConfig(), 0)
    img = _textured()
    for seed in range(20):
        torch.manual_seed(seed)
        ours, _ = strategy(img)
        torch.manual_seed(seed)
        theirs = reference(img)
        assert np.array_equal(np.asarray(ours), np.asarray(theirs)), seed


def test_randaugment_uses_magnitude_bin_of_11():
    strategy = build_strategy("randaugment", AugmentConfig(), 0)
    assert isinstance(strategy, RandAugmentStrategy)
    g = torch.Generator().manual_seed(0)
    draws = [d for _ in range(400) for d in strategy.draw(32, 32, g)]
    assert all(len(strategy.draw(32, 32, g)) == 2 for _ in range(10))  # N = 2
    by_op: dict[str, set] = {}
    for op, value in draws:
        by_op.setdefault(op, set()).add(round(value, 4))
    assert by_op["Rotate"] == {27.0, -27.0}  # 9/10 of 30 degrees, both signs
    assert by_op["ShearX"] == {0.27, -0.27}
    assert by_op["Posterize"] == {4.0}  # round(8 - 9 * 4/10)
    assert by_op["TranslateX"] == {round(0.9 * 150 / 331 * 32, 4), -round(0.9 * 150 / 331 * 32, 4)}


def test_randaugment_magnitude_follows_config():
    cfg = AugmentConfig(randaugment={"num_ops": 3, "magnitude": 5, "num_magnitude_bins": 11})
    strategy = build_strategy("randaugment", cfg, 0)
    g = torch.Generator().manual_seed(0)
    draws = [strategy.draw(32, 32, g) for _ in range(300)]
    assert all(len(d) == 3 for d in draws)
    rotations = {round(abs(v), 4) for d in draws for op, v in d if op == "Rotate"}
    assert rotations == {15.0}


def test_labels_name_the_ops_applied():
    g = torch.Generator().manual_seed(0)
    strategy = build_strategy("randaugment", AugmentConfig(), 0)
    img = _textured()
    for seed in range(20):
        drawn = strategy.draw(32, 32, torch.Generator().manual_seed(seed))
        _, ops = strategy(img, torch.Generator().manual_seed(seed))
        assert [o.split("(")[0] for o in ops] == [op for op, _ in drawn]
    from massrl.augment.fast_autoaugment import format_op
    from massrl.augment.strategies import label_scale

    # labels on one scale across strategies: Solarize on 0..255, enhance ops as their factor
    assert format_op(*label_scale("Solarize", 0.5)) == "Solarize(128)"
    assert format_op(*label_scale("Color", -0.3)) == "Color(0.7)"
    assert format_op(*label_scale("Rotate", -0.0)) == "Rotate(0)"
    _, ops = build_strategy("fastautoaugment", AugmentConfig(), 0)(img, g)
    assert all(o.split("(")[0] in {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate",
               "AutoContrast", "Invert", "Equalize", "Solarize", "Posterize", "Contrast",
               "Color", "Brightness", "Sharpness", "Cutout"} for o in ops)


def _simclr_counts(view_index, asymmetric=True, n=300, **colour):
    cfg = AugmentConfig(asymmetric=asymmetric, simclr=colour)
    strategy = build_strategy("simclr", cfg, view_index)
    g = torch.Generator().manual_seed(view_index)
    img = _textured()
    counts = {"ColorJitter": 0, "Grayscale": 0, "Blur": 0, "Solarize": 0}
    for _ in range(n):
        out, ops = strategy(img, g)
        for o in ops:
            counts[o.split("(")[0]] += 1
        if "Grayscale" in ops:  # grey stays grey through blur and solarize
            arr = np.asarray(out)
            assert np.array_equal(arr[..., 0], arr[..., 1])
    return {k: v / n for k, v in counts.items()}


def test_simclr_first_view_probabilities():
    p = _simclr_counts(0)
    assert 0.72 < p["ColorJitter"] < 0.88 and 0.13 < p["Grayscale"] < 0.27
    assert p["Blur"] == 1.0 and p["Solarize"] == 0.0


def test_simclr_second_view_is_byol_asymmetric():
    p = _simclr_counts(1)
    assert 0.04 < p["Blur"] < 0.17 and 0.13 < p["Solarize"] < 0.27
    symmetric = _simclr_counts(1, asymmetric=False)
    assert symmetric["Blur"] == 1.0 and symmetric["Solarize"] == 0.0


def test_simclr_colour_settings_reach_each_view():
    # SimCLR's own recipe: no solarize, blur 0.5, stronger jitter; and a CIFAR recipe's blur off
    colour = {"blur_p": (0.0, 0.5), "solarize_p": (1.0, 0.0), "jitter_p": 0.0, "grayscale_p": 1.0}
    first, second = (_simclr_counts(v, **colour) for v in (0, 1))
    assert first == {"ColorJitter": 0.0, "Grayscale": 1.0, "Blur": 0.0, "Solarize": 1.0}
    assert 0.4 < second["Blur"] < 0.6 and second["Solarize"] == 0.0
    assert _simclr_counts(1, asymmetric=False, **colour)["Solarize"] == 1.0  # first view's


def test_simclr_jitter_strengths_set_the_factor_ranges():
    img = Image.new("RGB", (8, 8), (100, 100, 100))
    cfg = AugmentConfig(simclr={"jitter": (0.9, 0.0, 0.0, 0.0), "jitter_p": 1.0,
                                "grayscale_p": 0.0, "blur_p": (0.0, 0.0)})
    strategy, g = build_strategy("simclr", cfg, 0), torch.Generator().manual_seed(0)
    levels = np.array([np.asarray(strategy(img, g)[0])[0, 0, 0] for _ in range(400)])
    # brightness factors from [0.1, 1.9]: grey 100 to about 10..190, evenly
    assert 10 <= levels.min() < 20 and 180 < levels.max() <= 190
    assert 0.2 < (levels < 70).mean() < 0.45


def test_blur_matches_torchvision_kernel_at_small_size():
    img = _textured()
    for sigma in (0.5, 1.0, 2.0):
        ours = np.asarray(gaussian_blur(img, sigma)).astype(int)
        ref = np.asarray(F.gaussian_blur(img, [3, 3], [sigma, sigma])).astype(int)
        assert np.abs(ours - ref).max() <= 1  # borders included (PIL alone leaves them raw)
    assert not np.array_equal(np.asarray(gaussian_blur(img, 1.0))[0], np.asarray(img)[0])


def test_blur_large_images_smooths():
    img = _textured(96)
    blurred = np.asarray(gaussian_blur(img, 2.0)).astype(float)
    assert blurred.std() < np.asarray(img).astype(float).std()
    assert gaussian_blur(img, 2.0).size == (96, 96)


def test_unknown_strategy_fails():
    with pytest.raises(ValueError, match="unknown strategy"):
        build_strategy("mixup", AugmentConfig(), 0)
