"""Image ops vectorised over a batch, each image with its own parameters.

Images are float tensors [N, 3, H, W] with values in [0, 1]. Every parameter is a tensor with one
entry per image, and every op has an identity value for its parameter (factor 1, bits 8, threshold
above 1, sigma ~0, side 0, ...). That lets the engine run an op on a whole batch where only some
images want it, without a host-device synchronisation, or on a gathered subset on the CPU.

Ops whose name ends in `_` work in place on their input and return it. Discrete ops (posterize,
solarize, equalize) follow torchvision's uint8 semantics on the 0..255 level of each pixel, because
the per-image backend runs them on uint8 PIL images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


def _img(p: Tensor) -> Tensor:
    """A per-image parameter [N] broadcast against [N, C, H, W]."""
    return p.reshape(-1, 1, 1, 1)


def to_gray(x: Tensor) -> Tensor:
    """Luma [N, 1, H, W]."""
    r, g, b = x.unbind(1)
    return r.mul(GRAY_WEIGHTS[0]).add_(g, alpha=GRAY_WEIGHTS[1]).add_(b, alpha=GRAY_WEIGHTS[2])[
        :, None
    ]


# ------------------------------------------------------------------------------ geometry


def warp_theta(kind: Tensor, mag: Tensor, height: int, width: int) -> Tensor:
    """Per-image inverse affine maps [N, 2, 3] in grid_sample's normalised coordinates.

    kind: 0 identity, 1 shear x, 2 shear y, 3 translate x, 4 translate y, 5 rotate. The
    conventions are torchvision's auto-augment ones: shears (coefficient `mag`) pivot on the
    top-left corner, translations are in pixels, rotations in degrees counter-clockwise about the
    centre. Each map sends an output pixel (centred pixel coordinates) to its input pixel.
    """
    n = kind.shape[0]
    one, zero = torch.ones_like(mag), torch.zeros_like(mag)
    rad = torch.deg2rad(mag)
    cos, sin = torch.cos(rad), torch.sin(rad)
    rot = kind == 5
    a00 = torch.where(rot, cos, one)
    a01 = torch.where(kind == 1, mag, torch.where(rot, -sin, zero))
    a10 = torch.where(kind == 2, mag, torch.where(rot, sin, zero))
    a11 = a00
    t0 = torch.where(kind == 1, mag * (height / 2), torch.where(kind == 3, -mag, zero))
    t1 = torch.where(kind == 2, mag * (width / 2), torch.where(kind == 4, -mag, zero))
    # pixel -> normalised: x_n = x / (W/2), y_n = y / (H/2)
    theta = torch.stack(
        [a00, a01 * (height / width), t0 * (2 / width),
         a10 * (width / height), a11, t1 * (2 / height)], dim=1,
    )
    return theta.view(n, 2, 3)


def affine_warp(x: Tensor, theta: Tensor, mode: str = "nearest") -> Tensor:
    """One grid_sample for the whole batch; outside the image is filled with 0 (torchvision's)."""
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)


def hflip_(x: Tensor, flip: Tensor) -> Tensor:
    """Horizontal flip of the images where `flip` is true."""
    return x.copy_(torch.where(_img(flip), x.flip(-1), x))


# ------------------------------------------------------------------------------ colour blends


def brightness_(x: Tensor, factor: Tensor) -> Tensor:
    return x.mul_(_img(factor)).clamp_(0, 1)


def gray_blend_(x: Tensor, factor: Tensor, gray_w: Tensor, mean_w: Tensor) -> Tensor:
    """Blend with gray_w * luma + mean_w * mean luma: saturation (1, 0), contrast (0, 1),
    grayscale (1, 0 with factor 0); gray_w = mean_w = 0 is brightness."""
    gray = to_gray(x)
    target = gray * _img(gray_w) + gray.mean((-3, -2, -1), keepdim=True) * _img(mean_w)
    f = _img(factor)
    return x.mul_(f).add_(target.mul_(1 - f)).clamp_(0, 1)


def adjust_contrast(x: Tensor, factor: Tensor) -> Tensor:
    ones, zeros = torch.ones_like(factor), torch.zeros_like(factor)
    return gray_blend_(x.clone(), factor, zeros, ones)


def adjust_saturation(x: Tensor, factor: Tensor) -> Tensor:
    ones, zeros = torch.ones_like(factor), torch.zeros_like(factor)
    return gray_blend_(x.clone(), factor, ones, zeros)


def grayscale(x: Tensor) -> Tensor:
    zeros = x.new_zeros(x.shape[0])
    return gray_blend_(x.clone(), zeros, torch.ones_like(zeros), zeros)


_SHARP_KERNEL = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13


def sharpness_(x: Tensor, factor: Tensor) -> Tensor:
    """PIL's sharpness: blend with a 3x3-smoothed copy; the 1-pixel border is left as is."""
    c = x.shape[1]
    w = _SHARP_KERNEL.to(x.device, x.dtype).expand(c, 1, 3, 3)
    smooth = F.conv2d(x, w, groups=c)
    f = _img(factor)
    inner = x[..., 1:-1, 1:-1]
    inner.mul_(f).add_(smooth.mul_(1 - f)).clamp_(0, 1)
    return x


# ------------------------------------------------------------------------------ pointwise / LUTs


def posterize_solarize_(x: Tensor, bits: Tensor, threshold: Tensor) -> Tensor:
    """Keep the top `bits` bits of each 0..255 level, then invert levels >= `threshold` (0..255;
    0 = invert, > 255 = none). bits = 8 leaves the image untouched, non-integer levels too."""
    q = _img(torch.exp2(8 - bits.to(x.dtype)))
    levels = x * 255
    # +1e-3: a level that is a multiple of q must not fall one step down through rounding
    posterized = levels.div_(q).add_(1e-3).floor_().mul_(q).div_(255)
    x = x.copy_(torch.where(q > 1, posterized, x))
    solar = x >= _img(threshold.to(x.dtype) / 255)
    return x.copy_(torch.where(solar, 1 - x, x))


def posterize(x: Tensor, bits: Tensor) -> Tensor:
    return posterize_solarize_(x.clone(), bits, torch.full_like(bits, 256.0, dtype=x.dtype))


def solarize(x: Tensor, threshold: Tensor) -> Tensor:
    return posterize_solarize_(x.clone(), torch.full_like(threshold, 8.0), threshold)


def invert(x: Tensor) -> Tensor:
    zeros = x.new_zeros(x.shape[0])
    return posterize_solarize_(x.clone(), zeros + 8, zeros)


def autocontrast_(x: Tensor, enabled: Tensor) -> Tensor:
    """Stretch each channel to [0, 1]; flat channels and disabled images are left as they are."""
    lo = x.amin((-2, -1), keepdim=True)
    hi = x.amax((-2, -1), keepdim=True)
    ok = (hi > lo) & _img(enabled)
    scale = torch.where(ok, 1 / (hi - lo).clamp_min(1e-12), torch.ones_like(hi))
    lo = torch.where(ok, lo, torch.zeros_like(lo))
    return x.sub_(lo).mul_(scale).clamp_(0, 1)


def equalize_(x: Tensor, enabled: Tensor) -> Tensor:
    """PIL's histogram equalisation per channel on the 0..255 levels, as a per-channel LUT."""
    n, c, h, w = x.shape
    levels = (x * 255).round_().clamp_(0, 255).to(torch.long).view(n * c, h * w)
    hist = torch.zeros(n * c, 256, dtype=torch.long, device=x.device)
    hist.scatter_add_(1, levels, torch.ones(1, dtype=torch.long, device=x.device).expand_as(levels))
    # PIL: step = (pixels - count of the brightest level) // 255,
    # lut[k] = (cum[k-1] + step // 2) // step
    top = hist.gather(1, levels.amax(1, keepdim=True))
    step = (h * w - top).div(255, rounding_mode="floor")
    cum = hist.cumsum(1)[:, :-1]
    lut = (cum + step // 2).div(step.clamp_min(1), rounding_mode="floor").clamp_(0, 255)
    lut = torch.cat([torch.zeros_like(lut[:, :1]), lut], 1)
    use = (step > 0) & enabled.repeat_interleave(c)[:, None]
    lut = torch.where(use, lut, torch.arange(256, device=x.device).expand_as(lut))
    return x.copy_(lut.gather(1, levels).view(n, c, h, w).to(x.dtype).div_(255))


# ------------------------------------------------------------------------------ hue


def adjust_hue_(x: Tensor, hue: Tensor) -> Tensor:
    """Rotate the HSV hue by `hue` (a fraction of the circle, in [-0.5, 0.5])."""
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    chroma = maxc - minc
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    # sector of the hue circle from which channel is the maximum (red wins ties, then green)
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2 + rc - bc, 4 + gc - rc))
    h = h.div_(6).add_(_img(hue)[:, 0]).remainder_(1).mul_(6)
    # HSV -> RGB: channel n = max - chroma * clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6
    for i, shift in enumerate((5.0, 3.0, 1.0)):
        k = (h + shift).remainder_(6)
        k = torch.minimum(k, 4 - k).clamp_(0, 1)
        x[:, i] = maxc - chroma * k
    return x


# ------------------------------------------------------------------------------ blur and cutout


def gaussian_kernels(sigma: Tensor, radius: int) -> Tensor:
    """Normalised 1-D Gaussian kernels [N, 2 * radius + 1], one per image."""
    t = torch.arange(-radius, radius + 1, device=sigma.device, dtype=sigma.dtype)
    k = torch.exp(-0.5 * (t[None] / sigma[:, None].clamp_min(1e-3)) ** 2)
    return k / k.sum(1, keepdim=True)


def gaussian_blur(x: Tensor, sigma: Tensor, radius: int) -> Tensor:
    """Separable Gaussian blur, reflect padding, per-image sigma (~0 = identity)."""
    n, c, h, w = x.shape
    radius = min(radius, h - 1, w - 1)  # reflect padding must stay inside the image
    k = gaussian_kernels(sigma.to(x.dtype), radius).repeat_interleave(c, 0)
    y = x.reshape(1, n * c, h, w)
    g = n * c
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), k[:, None, :, None], groups=g)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), k[:, None, None, :], groups=g)
    return y.view(n, c, h, w)


def cutout_(x: Tensor, side: Tensor, centre: Tensor, fill: Tensor) -> Tensor:
    """Fill a `side`-pixel square with `fill` [3] (in [0, 1]); centre [N, 2] = (x, y) pixels.

    As the per-image backend: the left/top edge is clamped at 0, the square keeps its side and is
    then clipped at the right/bottom edge (integer pixel bounds by truncation).
    """
    n, _, h, w = x.shape
    x0 = (centre[:, 0] - side / 2).clamp_min(0).floor()
    y0 = (centre[:, 1] - side / 2).clamp_min(0).floor()
    x1 = (x0 + side).clamp_max(w).floor()
    y1 = (y0 + side).clamp_max(h).floor()
    cols = torch.arange(w, device=x.device, dtype=x0.dtype)
    rows = torch.arange(h, device=x.device, dtype=x0.dtype)
    in_x = (cols >= x0[:, None]) & (cols < x1[:, None])
    in_y = (rows >= y0[:, None]) & (rows < y1[:, None])
    mask = (in_y[:, :, None] & in_x[:, None, :])[:, None]
    return x.copy_(torch.where(mask, fill.to(x.dtype).view(1, -1, 1, 1), x))
