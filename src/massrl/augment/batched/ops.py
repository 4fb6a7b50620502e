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

import math

import torch
import torch.nn.functional as F
from torch import Tensor

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


def _img(p: Tensor) -> Tensor:
    """A per-image parameter [N] broadcast against [N, C, H, W]."""
    return p.reshape(-1, 1, 1, 1)


def _reads_free(x: Tensor) -> bool:
    """Whether a shortcut may read tensor values on the host: free on the CPU, and never while
    torch.compile traces (a read would split the graph, and on a GPU would synchronise)."""
    return x.device.type == "cpu" and not torch.compiler.is_compiling()


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
    n, _, h, w = x.shape
    th = theta.to(x.dtype).view(n, 6, 1, 1).unbind(1)
    # output pixel centres in normalised coordinates (align_corners=False); built here because
    # F.affine_grid's batched matmul is 2x slower on the CPU
    xs = (torch.arange(w, device=x.device, dtype=x.dtype) + 0.5).mul_(2 / w).sub_(1).view(1, 1, w)
    ys = (torch.arange(h, device=x.device, dtype=x.dtype) + 0.5).mul_(2 / h).sub_(1).view(1, h, 1)
    # written straight into the interleaved grid: a row term [n, h, 1] broadcast over the
    # columns plus a column term [n, 1, w] (with the translation) broadcast over the rows
    grid = x.new_empty(n, h, w, 2)
    gx, gy = grid.unbind(-1)
    gx.copy_(th[1] * ys).add_(th[0] * xs + th[2])
    gy.copy_(th[4] * ys).add_(th[3] * xs + th[5])
    return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)


def translate_(x: Tensor, dx: Tensor, dy: Tensor) -> Tensor:
    """Shift each image by whole pixels (dx right, dy down), filling with 0: what a
    nearest-neighbour affine warp does for an integer translation, as slice copies (~7x less
    work than grid_sample on the CPU). Reads the shifts on the host: for the CPU's grouped mode."""
    h, w = x.shape[-2:]
    for img, tx, ty in zip(x, dx.tolist(), dy.tolist(), strict=True):
        tx, ty = int(tx), int(ty)
        if tx == ty == 0:
            continue
        if abs(tx) >= w or abs(ty) >= h:
            img.zero_()
            continue
        src = img[:, max(0, -ty) : h - max(0, ty), max(0, -tx) : w - max(0, tx)].clone()
        img.zero_()
        img[:, max(0, ty) : h - max(0, -ty), max(0, tx) : w - max(0, -tx)].copy_(src)
    return x


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
    f = _img(factor)
    # (1 - f) * target, built in place on the luma plane; then x * f + it in one pass
    mean = gray.mean((-3, -2, -1), keepdim=True).mul_(_img(mean_w) * (1 - f))
    gray.mul_(_img(gray_w) * (1 - f)).add_(mean)
    return torch.addcmul(gray, x, f, out=x).clamp_(0, 1)


def adjust_contrast(x: Tensor, factor: Tensor) -> Tensor:
    ones, zeros = torch.ones_like(factor), torch.zeros_like(factor)
    return gray_blend_(x.clone(), factor, zeros, ones)


def adjust_saturation(x: Tensor, factor: Tensor) -> Tensor:
    ones, zeros = torch.ones_like(factor), torch.zeros_like(factor)
    return gray_blend_(x.clone(), factor, ones, zeros)


def grayscale(x: Tensor) -> Tensor:
    zeros = x.new_zeros(x.shape[0])
    return gray_blend_(x.clone(), zeros, torch.ones_like(zeros), zeros)


def sharpness_(x: Tensor, factor: Tensor) -> Tensor:
    """PIL's sharpness: blend with a smoothed copy (3x3 kernel of ones, centre 5, / 13); the
    1-pixel border is left as is. The kernel is a 3x3 box sum plus 4x the centre, so the blend
    f x + (1 - f) smooth is x (f + 4 (1 - f) / 13) + box (1 - f) / 13: the box sum from shifted
    slices (8x faster than a depthwise conv2d on the CPU), then two passes over the interior."""
    rows = torch.add(x[..., :, :-2], x[..., :, 1:-1]).add_(x[..., :, 2:])
    box = torch.add(rows[..., :-2, :], rows[..., 1:-1, :]).add_(rows[..., 2:, :])
    f = _img(factor)
    inner = x[..., 1:-1, 1:-1]
    inner.mul_(f + (1 - f) * (4 / 13)).addcmul_(box, (1 - f) / 13).clamp_(0, 1)
    return x


# ------------------------------------------------------------------------------ pointwise / LUTs


def posterize_(x: Tensor, bits: Tensor) -> Tensor:
    """Keep the top `bits` bits of each 0..255 level; bits = 8 leaves the image untouched
    (non-integer levels too, so that it is an exact identity)."""
    q = _img(torch.exp2(8 - bits.to(x.dtype)))
    if _reads_free(x) and bool((q > 1).all()):
        # every image is posterized (reading values is free on the CPU): in place, no blend.
        # x * (255 / q) is (x * 255) / q exactly, q being a power of two
        return x.mul_(255 / q).add_(1e-3).floor_().mul_(q).div_(255)
    # +1e-3: a level that is a multiple of q must not fall one step down through rounding
    posterized = (x * 255).div_(q).add_(1e-3).floor_().mul_(q).div_(255)
    # exact 0/1 blend per image (torch.where is ~8x slower than an arithmetic pass on the CPU)
    use = (q > 1).to(x.dtype)
    return x.mul_(1 - use).addcmul_(posterized, use)


def solarize_(x: Tensor, threshold: Tensor) -> Tensor:
    """Invert levels >= `threshold` (0..255 scale; 0 = invert all, > 255 = none)."""
    # |m - x| with m = 1 where inverted, else 0: exactly 1 - x or x, in 3 arithmetic passes
    # (torch.where on a per-pixel mask is ~8x slower than one pass on the CPU)
    solar = torch.ge(x, _img(threshold.to(x.dtype) / 255), out=torch.empty_like(x))
    return torch.sub(solar, x, out=x).abs_()


def posterize_solarize_(x: Tensor, bits: Tensor, threshold: Tensor) -> Tensor:
    return solarize_(posterize_(x, bits), threshold)


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
    """PIL's histogram equalisation per channel on the 0..255 levels, as a per-channel LUT.

    One flat index (level + 256 * channel row) per pixel, as int32: one count (bincount on the
    CPU, a scatter-add elsewhere) gives every histogram and an index_select applies every LUT
    (no gather). Values are in [0, 1] (every op clamps), so the index needs no clamp."""
    n, c, h, w = x.shape
    rows = n * c
    # round-half-up of x * 255 (levels k / 255 never tie), then the row offset, in int32: added
    # in float32 the offset would eat the level's fraction (from ~1,500 rows a level near .5
    # rounds by its row; from 65,536 rows every odd level slips into the next bin)
    offset = torch.arange(rows, device=x.device, dtype=torch.int32).mul_(256)
    flat = x.mul(255).add_(0.5).to(torch.int32).add_(offset.view(n, c, 1, 1)).view(-1)
    if _reads_free(x):
        hist = torch.bincount(flat, minlength=rows * 256)
    else:  # a GPU's bincount reads the values' min and max on the host (two synchronisations),
        # and under torch.compile its output size depends on the values
        hist = flat.new_zeros(rows * 256, dtype=torch.int64)
        hist = hist.scatter_add_(0, flat.long(), hist.new_ones(1).expand(flat.numel()))
    hist = hist.view(rows, 256)
    # PIL: step = (pixels - count of the brightest level) // 255,
    # lut[k] = (cum[k-1] + step // 2) // step
    levels = torch.arange(256, device=x.device)
    brightest = torch.where(hist > 0, levels, 0).amax(1, keepdim=True)
    top = hist.gather(1, brightest)
    step = (h * w - top).div(255, rounding_mode="floor")
    cum = hist.cumsum(1)[:, :-1]
    lut = (cum + step // 2).div(step.clamp_min(1), rounding_mode="floor").clamp_(0, 255)
    lut = torch.cat([torch.zeros_like(lut[:, :1]), lut], 1).to(x.dtype).div_(255).view(-1)
    # images left alone keep their exact (possibly non-integer) levels
    use = (step > 0) & enabled.repeat_interleave(c)[:, None]
    if _reads_free(x) and x.is_contiguous() and bool(use.all()):
        # reading a value is free on the CPU: every channel is equalised, written in one pass
        return torch.index_select(lut, 0, flat, out=x.view(-1)).view(n, c, h, w)
    eq = lut.index_select(0, flat).view(n, c, h, w)
    blend = use.to(x.dtype).view(n, c, 1, 1)  # exact 0/1 blend
    return x.mul_(1 - blend).addcmul_(eq, blend)


# ------------------------------------------------------------------------------ hue


def adjust_hue_(x: Tensor, hue: Tensor) -> Tensor:
    """Rotate the HSV hue by `hue` (a fraction of the circle, in [-0.5, 0.5]); value and
    chroma are kept, so only the hue angle h6 in [0, 6) is computed and shifted.

    Written for the CPU's vector units: no torch.where on per-pixel masks (~20x slower than an
    arithmetic pass there) and no remainder. The sector is picked with exact 0/1 float masks
    (m * a + (1 - m) * b is exactly a or b), h6 is wrapped into [0, 6] with a floor, and each
    output channel is max - chroma * clamp(|h6 - p| - 1, 0, 1) (green p = 2, blue p = 4), red
    min + chroma * clamp(|h6 - 3| - 1, 0, 1)."""
    r, g, b = x.unbind(1)
    maxc = torch.maximum(r, g)
    torch.maximum(maxc, b, out=maxc)
    minc = torch.minimum(r, g)
    torch.minimum(minc, b, out=minc)
    chroma = maxc - minc
    # the maximum channel picks the sector (red wins ties, then green)
    is_r = torch.eq(r, maxc, out=torch.empty_like(maxc))
    is_g = torch.eq(g, maxc, out=torch.empty_like(maxc))
    is_g.addcmul_(is_g, is_r, value=-1)  # green max and red not
    # chroma * h6 before the shift: red g - b, green b - r + 2c, blue r - g + 4c; as the blue
    # value plus each mask times (its sector's value - blue's), which needs no blue mask
    num = torch.sub(r, g).add_(chroma, alpha=4)
    t = torch.sub(g, b).sub_(num)
    num.addcmul_(t, is_r)
    torch.add(b, g, out=t).sub_(r, alpha=2).sub_(chroma, alpha=2)  # (b - r + 2c) - blue's
    num.addcmul_(t, is_g)
    # chroma 0 (gray) has num 0, and any positive divisor then keeps the pixel gray
    h6 = num.div_(torch.clamp_min(chroma, torch.finfo(x.dtype).tiny))
    h6.add_(_img(hue)[:, 0] * 6)
    torch.mul(h6, 1 / 6, out=t).floor_()
    h6.add_(t, alpha=-6)
    for i, (centre, sign) in enumerate(((3.0, 1.0), (2.0, -1.0), (4.0, -1.0))):
        torch.sub(h6, centre, out=t).abs_().sub_(1).clamp_(0, 1)
        base = minc if sign > 0 else maxc
        if torch.compiler.is_compiling():  # traced: no out= into a strided view of x
            x[:, i].copy_(torch.addcmul(base, t, chroma, value=sign))
        else:
            torch.addcmul(base, t, chroma, value=sign, out=x[:, i])
    return x


# ------------------------------------------------------------------------------ blur and cutout


def gaussian_kernels(sigma: Tensor, radius: int) -> Tensor:
    """Normalised 1-D Gaussian kernels [N, 2 * radius + 1], one per image."""
    t = torch.arange(-radius, radius + 1, device=sigma.device, dtype=sigma.dtype)
    k = torch.exp(-0.5 * (t[None] / sigma[:, None].clamp_min(1e-3)) ** 2)
    return k / k.sum(1, keepdim=True)


def _reflect_pad(x: Tensor, r: int, dim: int) -> Tensor:
    """Reflect padding by `r` along `dim` (r < size) with slice copies: F.pad's reflect mode is
    ~8x slower on the CPU."""
    size = x.shape[dim]
    shape = list(x.shape)
    shape[dim] = size + 2 * r
    xp = x.new_empty(shape)
    xp.narrow(dim, r, size).copy_(x)
    if r:
        xp.narrow(dim, 0, r).copy_(x.narrow(dim, 1, r).flip(dim))
        xp.narrow(dim, r + size, r).copy_(x.narrow(dim, size - 1 - r, r).flip(dim))
    return xp


def _conv1d(x: Tensor, k: Tensor, dim: int, out: Tensor | None = None) -> Tensor:
    """Per-image 1-D convolution along `dim` (-2 or -1) with reflect padding, as a sum of
    shifted slices (one multiply-add pass per tap; faster than a grouped conv2d on the CPU);
    into `out` if given (it may be x: the taps read a padded copy)."""
    r = (k.shape[1] - 1) // 2
    size = x.shape[dim]
    xp = _reflect_pad(x, r, dim)
    out = torch.mul(xp.narrow(dim, 0, size), _img(k[:, 0]), out=out)
    for j in range(1, 2 * r + 1):
        out.addcmul_(xp.narrow(dim, j, size), _img(k[:, j]))
    return out


def gaussian_blur_(x: Tensor, sigma: Tensor, radius: int) -> Tensor:
    """Separable Gaussian blur in place, reflect padding, per-image sigma (~0 = identity)."""
    radius = min(radius, x.shape[-2] - 1, x.shape[-1] - 1)  # reflect padding stays inside
    sigma = sigma.to(x.dtype)
    if _reads_free(x) and sigma.numel():
        # reading values is free on the CPU: drop outer taps that weigh < 1e-9 of the centre
        # tap for every image (exp(-t^2 / 2 sigma^2) < 1e-9 beyond t = 6.44 sigma); sigma ~0
        # (images without blur) needs no tap at all
        needed = math.ceil(6.44 * float(sigma.max()))
        radius = min(radius, max(needed, 0))
    k = gaussian_kernels(sigma, radius)
    # the second pass writes into x: no output to allocate and copy back
    return _conv1d(_conv1d(x, k, -2), k, -1, out=x)


def cutout_(x: Tensor, side: Tensor, centre: Tensor, fill: Tensor) -> Tensor:
    """Fill a `side`-pixel square with `fill` [3] (in [0, 1]); centre [N, 2] = (x, y) pixels.

    As the per-image backend (Fast AutoAugment's rule): the left/top edge is clamped at 0 and
    truncated, the square then covers columns x0 .. floor(x0 + side) inclusive, clipped at the
    right/bottom edge.
    """
    n, _, h, w = x.shape
    x0 = (centre[:, 0] - side / 2).clamp_min(0).floor()
    y0 = (centre[:, 1] - side / 2).clamp_min(0).floor()
    x1 = ((x0 + side).floor() + 1).clamp_max(w)
    y1 = ((y0 + side).floor() + 1).clamp_max(h)
    cols = torch.arange(w, device=x.device, dtype=x0.dtype)
    rows = torch.arange(h, device=x.device, dtype=x0.dtype)
    in_x = (cols >= x0[:, None]) & (cols < x1[:, None]) & (side[:, None] > 0)  # 0: no square
    in_y = (rows >= y0[:, None]) & (rows < y1[:, None])
    mask = (in_y[:, :, None] & in_x[:, None, :])[:, None]
    return torch.where(mask, fill.to(x.dtype).view(1, -1, 1, 1), x, out=x)
