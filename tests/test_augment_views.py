"""View making (three modes), normalisation, crops on small images and pair masks."""

import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import RandomResizedCrop

from massrl.augment import EvalTransform, MultiViewTransform, UniformCrop, build_crop, pair_mask
from massrl.config import AugmentConfig

ALL = ["simclr", "randaugment", "autoaugment", "fastautoaugment", "trivialaugment"]
MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.1)


def _textured(size=28, mode="L", seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = np.clip(np.linspace(0, 255, size)[None, :] + rng.integers(0, 60, (size, size)), 0, 255)
    img = Image.fromarray(arr.astype(np.uint8), "L")
    return img if mode == "L" else img.convert(mode)


def _mvt(**kw) -> MultiViewTransform:
    size = kw.pop("size", 32)
    return MultiViewTransform(AugmentConfig(**kw), size, MEAN, STD)


@pytest.mark.parametrize(
    "mode,expected_strategy,expected_crop",
    [
        ("per_strategy", [0, 1, 2, 3, 4], [0, 1, 2, 3, 4]),
        ("crops_x_strategies", [0, 1, 2, 3, 4] * 2, [0] * 5 + [1] * 5),
    ],
)
def test_structured_modes(mode, expected_strategy, expected_crop):
    t = _mvt(strategies=ALL, view_mode=mode, num_crops=2)
    out = t(_textured())
    assert t.num_views == len(expected_strategy) == len(out["views"])
    assert out["strategy"].dtype == torch.long and out["strategy"].tolist() == expected_strategy
    assert out["crop"].dtype == torch.long and out["crop"].tolist() == expected_crop
    for v in out["views"]:
        assert v.shape == (3, 32, 32) and v.dtype == torch.float32


def test_random_mode_draws_strategy_per_view_per_image():
    t = _mvt(strategies=ALL, view_mode="random", num_views=3)
    assert t.num_views == 3 and t.strategy_names == tuple(ALL)
    torch.manual_seed(0)
    ids = torch.stack([t(_textured())["strategy"] for _ in range(50)])
    assert ids.shape == (50, 3)
    assert set(ids.flatten().tolist()) == set(range(5))
    assert len({tuple(r) for r in ids.tolist()}) > 20  # not one fixed assignment
    assert t(_textured())["crop"].tolist() == [0, 1, 2]  # every view has its own crop


def test_same_image_gives_distinct_views():
    t = _mvt(strategies=ALL, view_mode="per_strategy")
    torch.manual_seed(0)
    views = [v for _ in range(10) for v in t(_textured())["views"]]
    assert len({v.numpy().tobytes() for v in views}) >= 45


@pytest.mark.parametrize("name", ALL)
def test_each_strategy_normalised_range(name):
    t = _mvt(strategies=[name], view_mode="random", num_views=4)
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    for view in t.sample(_textured(mode="RGB")):
        raw = view.tensor * std + mean  # undo the normalisation: must be 8-bit pixels in [0, 1]
        assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5
        assert torch.allclose(raw * 255, (raw * 255).round(), atol=1e-3)
        expected = torch.from_numpy(np.asarray(view.image).copy()).permute(2, 0, 1) / 255
        assert torch.allclose(raw, expected, atol=1e-5)  # the picture is what the tensor shows
        assert view.strategy_name == name and view.strategy == 0


def test_constant_image_normalises_to_expected_values():
    # RandAugment with no ops is the identity: only crop and flip, which keep a flat image flat
    t = _mvt(strategies=["randaugment"], randaugment={"num_ops": 0}, crop="uniform")
    rgb = (51, 102, 204)
    expected = [(c / 255 - m) / s for c, m, s in zip(rgb, MEAN, STD, strict=True)]
    for view in t(Image.new("RGB", (28, 28), rgb))["views"]:
        for ch in range(3):
            assert view[ch].mean().item() == pytest.approx(expected[ch], abs=1e-5)
            assert view[ch].std().item() < 1e-5


def test_eval_transform_resize_centre_crop_normalise():
    rgb = (51, 102, 204)
    out = EvalTransform(32, MEAN, STD)(Image.new("RGB", (40, 64), rgb))
    assert out.shape == (3, 32, 32)
    expected = torch.tensor([(c / 255 - m) / s for c, m, s in zip(rgb, MEAN, STD, strict=True)])
    assert torch.allclose(out.mean(dim=(1, 2)), expected, atol=1e-5)
    # centre crop: a picture whose left/right quarters are black keeps only its white middle
    arr = np.zeros((32, 64), np.uint8)
    arr[:, 16:48] = 255
    middle = EvalTransform(32, (0.0,) * 3, (1.0,) * 3)(Image.fromarray(arr))
    assert torch.allclose(middle, torch.ones(3, 32, 32))


def test_a_banner_is_resized_from_its_centre_band_only():
    """A 10,000 x 3 px banner was resized whole (256 x 853,333 px at 224); now from its centre
    band of 3 x its height, which holds all the crop and the resize filter use."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    from massrl.data.eval_transform import centre_band

    rng = np.random.default_rng(0)
    wide = Image.fromarray(rng.integers(0, 256, (12, 200, 3), np.uint8))
    assert centre_band(wide).size == (36, 12) and centre_band(wide.rotate(90, expand=True)).size \
        == (12, 36)
    assert centre_band(Image.new("RGB", (40, 1))).size == (9, 1)  # the filter's reach
    square = Image.new("RGB", (30, 12))
    assert centre_band(square) is square  # up to 3:1 untouched
    t = EvalTransform(224, (0.0,) * 3, (1.0,) * 3)
    whole = F.center_crop(F.resize(wide, [256], InterpolationMode.BICUBIC, antialias=True),
                          [224, 224])
    assert (t(wide) - F.to_tensor(whole)).abs().max() < 0.02  # the same picture
    banner = Image.new("RGB", (10000, 3), (0, 128, 255))
    assert t(banner).shape == (3, 224, 224)


def test_a_test_image_is_seen_whole_at_its_own_size_and_cropped_when_larger():
    """STL-10 at 96 px (its own size) is evaluated whole, as solo-learn does; ImageNet-like
    images at 224 px (larger originals) get the 0.875 centre crop; small images always whole."""
    stl = EvalTransform(96, MEAN, STD, native_size=96)
    imagenet = EvalTransform(224, MEAN, STD, native_size=400)
    unknown = EvalTransform(96, MEAN, STD)
    assert (stl.resize, stl.crop_ratio) == (96, 1.0)
    assert (imagenet.resize, imagenet.crop_ratio) == (256, 0.875)
    assert (unknown.resize, unknown.crop_ratio) == (110, 0.875)
    assert EvalTransform(32, MEAN, STD, native_size=8).crop_ratio == 1.0
    assert EvalTransform(96, MEAN, STD, 0.5, native_size=96).crop_ratio == 0.5  # asked for
    # whole: a 96 px picture with a bright 2-pixel border keeps it
    arr = np.zeros((96, 96), np.uint8)
    arr[:2] = 255
    assert EvalTransform(96, (0.0,) * 3, (1.0,) * 3, native_size=96)(Image.fromarray(arr))[
        :, 0].mean() > 0.9


def test_normalisation_keeps_every_pixel_and_channel_in_place():
    """A textured picture at the eval size is only normalised: pixel for pixel, per channel."""
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    out = EvalTransform(32, MEAN, STD)(Image.fromarray(arr))
    ref = (torch.from_numpy(arr).permute(2, 0, 1).float() / 255
           - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_grey_small_inputs_and_flip_labels():
    for size in (8, 28):
        for crop in ("rrc", "uniform"):
            t = _mvt(strategies=ALL, view_mode="per_strategy", crop=crop)
            views = t.sample(_textured(size))
            assert all(v.tensor.shape == (3, 32, 32) for v in views)
            assert all(v.image.size == (32, 32) for v in views)
    torch.manual_seed(0)
    flips = [("HFlip" in v.ops) for _ in range(40) for v in t.sample(_textured())]
    assert 0.35 < np.mean(flips) < 0.65


@pytest.mark.parametrize("mode", ["I;16", "F", "1x1"])
def test_deep_and_tiny_pil_images_keep_their_picture(mode, recwarn):
    """Given straight to the transforms (the Python API), 16-bit and float images are scaled
    as the data loader scales them: PIL's convert("RGB") clipped them to white or black."""
    ramp = np.tile(np.linspace(0, 1, 32, dtype=np.float32), (32, 1))
    if mode == "I;16":
        img = Image.fromarray((ramp * 65535).astype(np.uint16))
    elif mode == "F":
        img = Image.fromarray(ramp, mode="F")
    else:
        img = Image.new("RGB", (1, 1), (10, 200, 30))
    for t in (_mvt(strategies=["randaugment"]),
              EvalTransform(32, (0.5,) * 3, (0.25,) * 3)):
        out = t(img)
        x = out["views"][0] if isinstance(out, dict) else out
        levels = torch.unique(x).numel()
        assert levels > (1 if mode == "1x1" else 20), (type(t).__name__, levels)
    assert not [w for w in recwarn if "not writable" in str(w.message)]


def test_asymmetric_simclr_alternates_over_views_and_crops():
    torch.manual_seed(0)
    t = _mvt(strategies=["simclr"], view_mode="random", num_views=2)
    blurred = np.array([
        any(o.startswith("Blur") for o in v.ops) for _ in range(60) for v in t.sample(_textured())
    ]).reshape(60, 2)
    assert blurred[:, 0].all() and blurred[:, 1].mean() < 0.3
    t = _mvt(strategies=["simclr", "randaugment"], view_mode="crops_x_strategies", num_crops=2)
    views = [t.sample(_textured()) for _ in range(60)]
    first_crop = [any(o.startswith("Blur") for o in vs[0].ops) for vs in views]
    second_crop = [any(o.startswith("Blur") for o in vs[2].ops) for vs in views]
    assert all(first_crop) and np.mean(second_crop) < 0.3


def test_seeded_reproducible_and_picklable():
    t = _mvt(strategies=ALL, view_mode="random")
    clone = pickle.loads(pickle.dumps(t))  # DataLoader workers may receive a pickled copy
    torch.manual_seed(4)
    a = t(_textured())
    torch.manual_seed(4)
    b = clone(_textured())
    assert torch.equal(a["strategy"], b["strategy"])
    assert all(torch.equal(x, y) for x, y in zip(a["views"], b["views"], strict=True))


# ----------------------------------------------------------------------------- crops


@pytest.mark.parametrize("crop", ["rrc", "uniform"])
@pytest.mark.parametrize("shape", [(8, 8), (28, 28), (20, 45)])
def test_crops_give_requested_size(crop, shape):
    fn = build_crop(AugmentConfig(crop=crop), 32)
    for _ in range(20):
        assert fn(Image.new("RGB", shape)).size == (32, 32)


def test_uniform_crop_side_distribution():
    crop = UniformCrop(32, (0.5, 1.0))
    g = torch.Generator().manual_seed(0)
    params = [crop.params(60, 100, g) for _ in range(1000)]
    sides = np.array([s for _, _, s in params])
    assert sides.min() >= 30 and sides.max() <= 60
    assert sides.min() <= 31 and sides.max() >= 59 and abs(sides.mean() - 45) < 1.5
    assert all(0 <= top and top + s <= 60 and 0 <= left and left + s <= 100
               for top, left, s in params)
    lefts = np.array([left for _, left, _ in params])
    assert lefts.max() > 60  # positions spread over the long side too
    assert {UniformCrop(32, (1.0, 1.0)).params(60, 100, g)[2] for _ in range(10)} == {60}


@pytest.mark.parametrize("cfg", [AugmentConfig(), AugmentConfig(crop_scale=(0.3, 1.0)),
                                 AugmentConfig(crop="uniform", uniform_crop_range=(0.4, 1.0))])
@pytest.mark.parametrize("size", [32, 96])
def test_source_side_keeps_the_smallest_crop_at_full_detail(cfg, size):
    """An image whose shorter side is the transform's source_side (what a large JPEG is decoded
    down to) still gives every crop at least `size` source pixels: never an upscale."""
    from massrl.augment.batched import CropOnlyTransform
    from massrl.augment.crops import crop_source_side

    side = crop_source_side(cfg, size)
    assert MultiViewTransform(cfg, size, (0.5,), (0.5,)).source_side == side
    assert CropOnlyTransform(cfg, size).source_side == side
    torch.manual_seed(0)
    smallest = []
    for height, width in [(side, side), (side, 2 * side), (2 * side, side)]:
        for _ in range(3000):
            if cfg.crop == "rrc":
                _, _, h, w = RandomResizedCrop.get_params(
                    torch.empty(1, height, width), list(cfg.crop_scale), [3 / 4, 4 / 3])
            else:
                h = w = UniformCrop(size, cfg.uniform_crop_range).params(height, width)[2]
            smallest.append(min(h, w))
    assert min(smallest) >= size - 1  # (crop sides are rounded to pixels)
    assert min(smallest) <= size * 1.15  # and the bound is close: the smallest crops reach it


# ----------------------------------------------------------------------------- pair masks

T, F_ = True, False


def test_pair_mask_random_mode_three_views():
    strategy = torch.tensor([[0, 1, 0], [2, 2, 2]])
    crop = torch.tensor([[0, 1, 2], [0, 1, 2]])
    off = ~torch.eye(3, dtype=torch.bool)
    assert torch.equal(pair_mask(strategy, crop, "all"), off.expand(2, 3, 3))
    assert torch.equal(pair_mask(strategy, crop, "cross_crop"), off.expand(2, 3, 3))
    cross = pair_mask(strategy, crop, "cross_strategy")
    assert cross[0].tolist() == [[F_, T, F_], [T, F_, T], [F_, T, F_]]
    assert not cross[1].any()  # all three views share a strategy
    within = pair_mask(strategy, crop, "within_strategy")
    assert within[0].tolist() == [[F_, F_, T], [F_, F_, F_], [T, F_, F_]]
    assert torch.equal(within[1], off)


def test_pair_mask_crops_x_strategies_and_per_strategy():
    t = _mvt(strategies=["simclr", "randaugment"], view_mode="crops_x_strategies", num_crops=2)
    out = t(_textured())
    strategy, crop = out["strategy"][None], out["crop"][None]  # [1, 4]: s = 0 1 0 1, c = 0 0 1 1
    assert pair_mask(strategy, crop, "cross_crop")[0].tolist() == [
        [F_, F_, T, T], [F_, F_, T, T], [T, T, F_, F_], [T, T, F_, F_]
    ]
    assert pair_mask(strategy, crop, "within_strategy")[0].tolist() == [
        [F_, F_, T, F_], [F_, F_, F_, T], [T, F_, F_, F_], [F_, T, F_, F_]
    ]
    assert pair_mask(strategy, crop, "cross_strategy")[0].tolist() == [
        [F_, T, F_, T], [T, F_, T, F_], [F_, T, F_, T], [T, F_, T, F_]
    ]
    per = _mvt(strategies=ALL[:3], view_mode="per_strategy")(_textured())
    s, c = per["strategy"][None], per["crop"][None]
    assert torch.equal(pair_mask(s, c, "cross_strategy"), pair_mask(s, c, "all"))
    assert not pair_mask(s, c, "within_strategy").any()
    assert pair_mask(s, c, "all").sum() == 6


def test_pair_mask_rejects_unknown_setting():
    with pytest.raises(ValueError, match="unknown pairs"):
        pair_mask(torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long), "x")


@pytest.mark.parametrize("pairs, strategies, kept", [
    ("within_strategy", ALL[:4], 0.25), ("cross_strategy", ALL[:2], 0.5),
])
def test_sparse_pairs_note_states_the_fraction_random_views_keep(pairs, strategies, kept):
    from massrl.augment.views import sparse_pairs_note

    cfg = AugmentConfig(strategies=strategies, pairs=pairs)
    note = sparse_pairs_note(cfg)
    assert f"keeps about {kept:.0%} of the view pairs" in note
    # the fraction the note states is what the transform's strategy draws give the loss
    t = _mvt(strategies=strategies, pairs=pairs, size=8)
    torch.manual_seed(0)
    draws = [t(_textured(12)) for _ in range(400)]
    mask = pair_mask(torch.stack([d["strategy"] for d in draws]),
                     torch.stack([d["crop"] for d in draws]), pairs)
    assert mask.sum() / (len(draws) * 2) == pytest.approx(kept, abs=0.06)
    # no note where every pair can count
    for fine in (dict(pairs="all"), dict(pairs=pairs, view_mode="crops_x_strategies"),
                 dict(pairs="cross_strategy", strategies=ALL[:4])):
        assert sparse_pairs_note(AugmentConfig(**{"strategies": strategies, **fine})) is None


def test_per_strategys_one_simclr_view_takes_the_first_pipeline_wherever_it_sits():
    """Its position in augment.strategies chose the pipeline: [randaugment, simclr] gave the
    simclr view BYOL's second (blur 0.1, solarize 0.2), [simclr, randaugment] the first."""
    torch.manual_seed(0)
    for order in (["simclr", "randaugment"], ["randaugment", "simclr"]):
        t = _mvt(strategies=order, view_mode="per_strategy")
        views = [t.sample(_textured())[order.index("simclr")] for _ in range(40)]
        assert all(any(o.startswith("Blur") for o in v.ops) for v in views), order
        assert not any(o.startswith("Solarize") for v in views for o in v.ops), order


def test_images_up_to_64_px_are_evaluated_whole_and_larger_ones_centre_cropped():
    """solo-learn evaluates CIFAR (32 px) and STL-10 (64-96 px) whole, ImageNet with the 0.875
    crop: the boundary moves every kNN, linear and UMAP figure at the sizes between."""
    from massrl.data.eval_transform import test_resize

    assert test_resize(32) == (32, 1.0) and test_resize(64) == (64, 1.0)
    assert test_resize(65) == (74, 0.875) and test_resize(224) == (256, 0.875)
    assert test_resize(96, native_size=96) == (96, 1.0)  # seen at its own size: whole
