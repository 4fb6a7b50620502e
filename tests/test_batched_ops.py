"""Each batched op against torchvision.transforms.v2.functional on the same image and parameters.

The ops with a fused CPU kernel (cpu_kernels.py: every op but the whole-pixel translation and the
flip) are checked in both implementations, with the same tolerances.

Tolerances (pixel levels on the 0..255 scale unless said otherwise):
  colour blends, hue, sharpness, blur, autocontrast: float in and out,
    max |diff| <= 1e-5 (on [0, 1])
  posterize, solarize, invert, equalize: uint8 reference, exact
  geometry (nearest): at most 0.5% of pixels differ (grid rounding at exact pixel boundaries)
  cutout: exact against the per-image backend's rule
"""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from massrl.augment.batched import cpu_kernels, ops

N, S = 6, 24
FUSED = [pytest.param(ops, id="torch"),
         pytest.param(cpu_kernels, id="numba", marks=pytest.mark.skipif(
             not cpu_kernels.available(), reason="numba is not installed"))]


@pytest.fixture(scope="module")
def u8() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (N, 3, S, S), dtype=torch.uint8, generator=g)
    img[1] = img[1] // 2 + 40  # a low-contrast image for autocontrast / equalize
    img[2, :, :, :] = 77  # a flat image (autocontrast / equalize must leave it)
    return img


def _f(u8: torch.Tensor) -> torch.Tensor:
    return u8.float().div(255)


def _per_image_ref(x: torch.Tensor, params: list, fn) -> torch.Tensor:
    return torch.stack([fn(x[i], p) for i, p in enumerate(params)])


def _close(a: torch.Tensor, b: torch.Tensor, atol: float) -> None:
    assert a.shape == b.shape
    assert (a - b).abs().max().item() <= atol, (a - b).abs().max().item()


@pytest.mark.parametrize("impl", FUSED)
def test_brightness(u8, impl):
    f = torch.linspace(0.1, 1.9, N)
    ref = _per_image_ref(_f(u8), f.tolist(), TF.adjust_brightness)
    _close(impl.brightness_(_f(u8), f), ref, 1e-6)


@pytest.mark.parametrize("impl", FUSED)
@pytest.mark.parametrize("name", ["contrast", "saturation"])
def test_contrast_saturation(u8, name, impl):
    f = torch.linspace(0.0, 1.9, N)
    tv = {"contrast": TF.adjust_contrast, "saturation": TF.adjust_saturation}[name]
    gray_w = torch.full((N,), float(name == "saturation"))
    mine = impl.gray_blend_(_f(u8), f, gray_w, 1 - gray_w)
    _close(mine, _per_image_ref(_f(u8), f.tolist(), tv), 1e-5)
    # the wrappers the torch path offers
    wrapper = {"contrast": ops.adjust_contrast, "saturation": ops.adjust_saturation}[name]
    _close(wrapper(_f(u8), f), mine, 1e-5)


@pytest.mark.parametrize("impl", FUSED)
def test_grayscale(u8, impl):
    ref = TF.rgb_to_grayscale(_f(u8), num_output_channels=3)
    zeros = torch.zeros(N)
    _close(impl.gray_blend_(_f(u8), zeros, zeros + 1, zeros), ref, 1e-6)
    _close(ops.grayscale(_f(u8)), ref, 1e-6)


@pytest.mark.parametrize("impl", FUSED)
def test_sharpness(u8, impl):
    f = torch.linspace(0.1, 1.9, N)
    ref = _per_image_ref(_f(u8), f.tolist(), TF.adjust_sharpness)
    _close(impl.sharpness_(_f(u8), f), ref, 1e-5)


@pytest.mark.parametrize("impl", FUSED)
def test_hue(u8, impl):
    h = torch.linspace(-0.5, 0.5, N)
    ref = _per_image_ref(_f(u8), h.tolist(), TF.adjust_hue)
    _close(impl.adjust_hue_(_f(u8), h), ref, 2e-5)


def test_posterize_solarize_invert_exact(u8):
    bits = torch.tensor([1, 2, 4, 5, 7, 8])
    ref = _per_image_ref(u8, bits.tolist(), TF.posterize)
    assert torch.equal((ops.posterize(_f(u8), bits.float()) * 255).round().byte(), ref)
    if cpu_kernels.available():
        out = cpu_kernels.posterize_(_f(u8), bits.float())
        assert torch.equal(out, ops.posterize(_f(u8), bits.float()))  # the same float values
    # every image posterized: the CPU's in-place path without the blend
    out = ops.posterize(_f(u8[:5]), bits[:5].float())
    assert torch.equal((out * 255).round().byte(), ref[:5])
    thr = torch.tensor([0.0, 1.0, 113.33, 128.0, 254.0, 255.0])
    ref = _per_image_ref(u8, thr.tolist(), TF.solarize)
    assert torch.equal((ops.solarize(_f(u8), thr) * 255).round().byte(), ref)
    if cpu_kernels.available():
        assert torch.equal(cpu_kernels.solarize_(_f(u8), thr), ops.solarize(_f(u8), thr))
        assert torch.equal(cpu_kernels.solarize_(_f(u8), torch.zeros(N)), ops.invert(_f(u8)))
    assert torch.equal((ops.invert(_f(u8)) * 255).round().byte(), TF.invert(u8))
    # Fast AutoAugment's threshold range ends at 256 (PIL): nothing is inverted
    assert torch.equal(ops.solarize(_f(u8), torch.full((N,), 256.0)), _f(u8))


@pytest.mark.parametrize("impl", FUSED)
def test_autocontrast(u8, impl):
    on = torch.tensor([True] * (N - 1) + [False])
    ref = TF.autocontrast(_f(u8))
    ref[-1] = _f(u8)[-1]
    _close(impl.autocontrast_(_f(u8), on), ref, 1e-6)


@pytest.mark.parametrize("impl", FUSED)
def test_equalize_exact(u8, impl):
    on = torch.tensor([True] * (N - 1) + [False])
    ref = TF.equalize(u8)
    ref[-1] = u8[-1]
    assert torch.equal((impl.equalize_(_f(u8), on) * 255).round().byte(), ref)


@pytest.mark.parametrize("impl", FUSED)
def test_equalize_of_an_image_does_not_depend_on_its_batch(impl):
    """Non-integer levels (as after a colour blend) equalise alike alone and deep in a big batch,
    and a call over more than 65,536 channel rows (21,846 RGB images) works."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (2000, 3, 16, 16), generator=g).float().div_(255).mul_(0.93)
    x = x.add_(0.01).clamp_(0, 1)
    on = torch.ones(len(x), dtype=torch.bool)
    together = impl.equalize_(x.clone(), on)
    alone = torch.cat([impl.equalize_(x[i:i + 1].clone(), on[:1]) for i in range(len(x))])
    assert torch.equal(together, alone)
    many = torch.randint(0, 256, (22000, 3, 17, 17), dtype=torch.uint8, generator=g)
    out = impl.equalize_(_f(many), torch.ones(len(many), dtype=torch.bool))
    assert torch.equal((out * 255).round().byte(), TF.equalize(many))


@pytest.mark.parametrize("impl", FUSED)
def test_blur(u8, impl):
    sigma = torch.linspace(0.1, 2.0, N)
    k = 13
    ref = _per_image_ref(_f(u8), sigma.tolist(), lambda im, s: TF.gaussian_blur(im, [k, k], [s, s]))
    _close(impl.gaussian_blur_(_f(u8), sigma, k // 2), ref, 1e-5)
    # sigma ~ 0 is the identity, which the engine relies on for images without blur
    _close(impl.gaussian_blur_(_f(u8), torch.full((N,), 1e-4), 6), _f(u8), 0)


def _warp(x: torch.Tensor, kind: int, mag: torch.Tensor, impl=ops) -> torch.Tensor:
    theta = ops.warp_theta(torch.full((N,), kind), mag, S, S)
    if impl is cpu_kernels:
        return cpu_kernels.warp_nearest_(x, theta, torch.full((N,), kind != 0))
    return ops.affine_warp(x, theta, "nearest")


def _tv_geom(kind: int):
    nearest = InterpolationMode.NEAREST

    def fn(im: torch.Tensor, m: float) -> torch.Tensor:
        if kind == 1:
            shear = [math.degrees(math.atan(m)), 0.0]
            return TF.affine(im, angle=0.0, translate=[0, 0], scale=1.0, shear=shear,
                             interpolation=nearest, center=[0, 0])
        if kind == 2:
            shear = [0.0, math.degrees(math.atan(m))]
            return TF.affine(im, angle=0.0, translate=[0, 0], scale=1.0, shear=shear,
                             interpolation=nearest, center=[0, 0])
        if kind in (3, 4):
            t = [int(m), 0] if kind == 3 else [0, int(m)]
            return TF.affine(im, angle=0.0, translate=t, scale=1.0, shear=[0.0, 0.0],
                             interpolation=nearest)
        return TF.rotate(im, angle=m, interpolation=nearest)

    return fn


@pytest.mark.parametrize(
    "kind,mags",
    [(1, [-0.3, -0.1, 0.0, 0.17, 0.3, 0.99]), (2, [-0.3, -0.1, 0.0, 0.17, 0.3, 0.99]),
     (3, [-10, -3, 0, 1, 5, 11]), (4, [-10, -3, 0, 1, 5, 11]), (5, [-135, -30, -7.5, 0, 12, 90])],
)
@pytest.mark.parametrize("impl", FUSED)
def test_geometry(u8, kind, mags, impl):
    mag = torch.tensor(mags, dtype=torch.float32)
    ref = _per_image_ref(_f(u8), mags, _tv_geom(kind))
    mine = _warp(_f(u8), kind, mag, impl)
    differ = (mine - ref).abs().amax(1) > 1e-6
    assert differ.float().mean().item() <= 0.005


def test_translate_matches_nearest_warp_exactly(u8):
    """Whole-pixel shifts by slice copies = the nearest warp of the same translation."""
    for kind, dx, dy in ((3, 1, 0), (4, 0, 1)):
        mag = torch.tensor([-30.0, -7.0, -1.0, 0.0, 5.0, 23.0])  # beyond the side: all zeros
        ref = _warp(_f(u8), kind, mag)
        mine = ops.translate_(_f(u8), dx * mag, dy * mag)
        assert torch.equal(mine, ref), kind


def test_identity_warp_is_exact(u8):
    assert torch.equal(_warp(_f(u8), 0, torch.zeros(N)), _f(u8))


@pytest.mark.parametrize("impl", FUSED)
def test_cutout(impl):
    x = torch.zeros(2, 3, 10, 10)
    fill = torch.tensor([125, 123, 114]) / 255
    out = impl.cutout_(x, torch.tensor([4.0, 0.0]), torch.tensor([[1.0, 8.5], [5.0, 5.0]]), fill)
    # image 0: x0 = max(0, 1 - 2) = 0, x1 = 4 inclusive; y0 = floor(6.5) = 6, y1 = 10 (clipped)
    expect = torch.zeros(10, 10, dtype=torch.bool)
    expect[6:10, 0:5] = True
    assert torch.equal(out[0, 0] > 0, expect)
    assert torch.allclose(out[0, :, 7, 1], fill)
    assert out[1].abs().sum() == 0  # side 0: untouched


def test_hflip():
    x = torch.arange(2 * 3 * 2 * 4, dtype=torch.float32).view(2, 3, 2, 4)
    out = ops.hflip_(x.clone(), torch.tensor([True, False]))
    assert torch.equal(out[0], x[0].flip(-1)) and torch.equal(out[1], x[1])
