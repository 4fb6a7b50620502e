"""Fused CPU kernels (numba) for the batched engine's costliest ops.

Each kernel does in one or two passes over an image what its torch version in ops.py does in many
(hue ~15 passes, gray blend ~6, blur one multiply-add pass per tap, the nearest warp a grid and a
sample pass over 2-channel coordinates), and skips the images whose
parameter is the identity, so the engine runs them on a whole chunk instead of gathering the
images that drew them. Images are processed in parallel over torch's thread count. Results match
ops.py within float rounding (tests/test_batched_ops.py runs both); without numba, ops.py runs.

Kernels take float32 C-contiguous CPU tensors [N, 3, H, W] with values in [0, 1] and work in
place. Why numba rather than torch.compile: inductor's CPU code needs a C++ compiler at run time
and compiled the blur slower than eager; numba ships its own LLVM.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

try:
    import numba
except ImportError:  # the torch ops in ops.py run instead
    numba = None

from .ops import GRAY_WEIGHTS

prange = numba.prange if numba else range  # (a global numba recognises as its parallel loop)
# float32 constants: with Python numbers numba would compute in float64, at half the vector width
_0, _1, _2, _3, _4, _6 = (np.float32(v) for v in (0, 1, 2, 3, 4, 6))
_SIXTH = np.float32(1 / 6)
_TINY = np.float32(np.finfo(np.float32).tiny)
_WR, _WG, _WB = (np.float32(w) for w in GRAY_WEIGHTS)
_HALF, _255 = np.float32(0.5), np.float32(255)
# sigma at or below which a blur is the identity (the engine's identity sigma is 1e-4; the
# strategies' smallest is 0.1); taps beyond 6.44 sigma weigh < 1e-9 of the centre (as ops.py)
_SIGMA_OFF, _TAP_REACH = 1e-3, 6.44


def available() -> bool:
    return numba is not None


def _kernel(fn):
    """Parallel over images (numba.prange); fastmath lets LLVM vectorise the per-pixel loops."""
    return numba.njit(fn, parallel=True, fastmath=True, nogil=True, cache=True) if numba else fn


def _helper(fn):
    return numba.njit(fn, fastmath=True, nogil=True, cache=True) if numba else fn


def _arrays(x: Tensor, *params: Tensor) -> tuple[np.ndarray, ...]:
    if x.device.type != "cpu" or x.dtype != torch.float32 or not x.is_contiguous():
        raise ValueError(f"cpu_kernels need a contiguous float32 CPU tensor, got {x.dtype} on "
                         f"{x.device} (contiguous: {x.is_contiguous()})")
    # numba runs as many threads as torch would (training sets torch's count per process)
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
    return (x.numpy(), *(p.detach().to("cpu", torch.float32).contiguous().numpy()
                         for p in params))


# ------------------------------------------------------------------------------ hue


def adjust_hue_(x: Tensor, hue: Tensor) -> Tensor:
    """ops.adjust_hue_ in one pass; images with hue 0 are left exactly as they are."""
    a, shift = _arrays(x, hue * 6)
    if a.size:
        _hue(a.reshape(a.shape[0], 3, -1), shift)
    return x


@_helper
def _hue_plane(r_, g_, b_, s):  # separate row arrays: LLVM vectorises (no aliasing to rule out)
    for k in range(r_.shape[0]):
        r, g, b = r_[k], g_[k], b_[k]
        mx, mn = max(r, max(g, b)), min(r, min(g, b))
        c = mx - mn
        # ops.adjust_hue_'s sector choice with 0/1 masks: red wins ties, then green
        is_r = np.float32(r == mx)
        is_g = np.float32(g == mx) * (_1 - is_r)
        blue = r - g + _4 * c
        num = blue + is_r * (g - b - blue) + is_g * (b - r + _2 * c - blue)
        h = num / max(c, _TINY) + s
        h -= math.floor(h * _SIXTH) * _6
        r_[k] = mn + c * min(max(abs(h - _3) - _1, _0), _1)
        g_[k] = mx - c * min(max(abs(h - _2) - _1, _0), _1)
        b_[k] = mx - c * min(max(abs(h - _4) - _1, _0), _1)


@_kernel
def _hue(x, shift6):
    for i in prange(x.shape[0]):
        if shift6[i] != 0:
            _hue_plane(x[i, 0], x[i, 1], x[i, 2], shift6[i])


# ------------------------------------------------------------------------------ gray blends


def gray_blend_(x: Tensor, factor: Tensor, gray_w: Tensor, mean_w: Tensor) -> Tensor:
    """ops.gray_blend_ (saturation, contrast, grayscale) in one pass, two with a mean; images with
    factor 1 are left as they are."""
    a, f, gw, mw = _arrays(x, factor, gray_w, mean_w)
    if a.size:
        _gray_blend(a.reshape(a.shape[0], 3, -1), f, gw, mw)
    return x


@_helper
def _luma_mean(r_, g_, b_):
    total = 0.0
    for k in range(r_.shape[0]):
        total += _WR * r_[k] + _WG * g_[k] + _WB * b_[k]
    return np.float32(total / r_.shape[0])


@_helper
def _blend_plane(r_, g_, b_, f, a, b):  # x * f + a * luma + b, clamped to [0, 1]
    for k in range(r_.shape[0]):
        t = a * (_WR * r_[k] + _WG * g_[k] + _WB * b_[k]) + b
        r_[k] = min(max(r_[k] * f + t, _0), _1)
        g_[k] = min(max(g_[k] * f + t, _0), _1)
        b_[k] = min(max(b_[k] * f + t, _0), _1)


@_kernel
def _gray_blend(x, factor, gray_w, mean_w):
    for i in prange(x.shape[0]):
        f = factor[i]
        if f != 1:
            mean = _luma_mean(x[i, 0], x[i, 1], x[i, 2]) if mean_w[i] != 0 else _0
            _blend_plane(x[i, 0], x[i, 1], x[i, 2], f, gray_w[i] * (_1 - f),
                         mean_w[i] * (_1 - f) * mean)


# ------------------------------------------------------------------------------ equalize


def equalize_(x: Tensor, enabled: Tensor) -> Tensor:
    """ops.equalize_ (PIL's per-channel histogram equalisation on the 0..255 levels) in two
    passes per channel; disabled images and flat channels are left as they are."""
    a, on = _arrays(x, enabled)
    if a.size:
        _equalize(a.reshape(a.shape[0], a.shape[1], -1), on)
    return x


@_helper
def _equalize_plane(p):
    hist = np.zeros(256, np.int64)
    for k in range(p.shape[0]):
        hist[min(max(int(p[k] * _255 + _HALF), 0), 255)] += 1
    top = 0
    for level in range(256):  # the count of the brightest level present
        if hist[level]:
            top = hist[level]
    step = (p.shape[0] - top) // 255
    if step == 0:
        return
    lut = np.empty(256, np.float32)
    cum = 0
    lut[0] = _0
    for level in range(1, 256):
        cum += hist[level - 1]
        lut[level] = np.float32(min((cum + step // 2) // step, 255)) / _255
    for k in range(p.shape[0]):
        p[k] = lut[min(max(int(p[k] * _255 + _HALF), 0), 255)]


@_kernel
def _equalize(x, enabled):
    for i in prange(x.shape[0]):
        if enabled[i] != 0:
            for c in range(x.shape[1]):
                _equalize_plane(x[i, c])


# ------------------------------------------------------------------------------ blur


def gaussian_blur_(x: Tensor, sigma: Tensor, radius: int) -> Tensor:
    """ops.gaussian_blur_: separable Gaussian, reflect padding, at most `radius` taps each side
    (fewer where an image's own sigma needs fewer); images with sigma ~0 are left as they are."""
    radius = min(radius, x.shape[-2] - 1, x.shape[-1] - 1)  # reflect padding stays inside
    a, s = _arrays(x, sigma)
    if a.size and radius > 0:
        _blur(a, s, radius)
    return x


@_helper
def _reflect(i, n):
    return -i if i < 0 else (2 * n - 2 - i if i >= n else i)


@_helper
def _taps(sigma, radius):
    """Normalised 1-D Gaussian taps for offsets -radius..radius (as ops.gaussian_kernels)."""
    k = np.empty(2 * radius + 1, np.float32)
    for j in range(2 * radius + 1):
        t = np.float32(j - radius) / np.float32(sigma)
        k[j] = math.exp(-_HALF * t * t)
    return (k / k.sum()).astype(np.float32)


@_helper
def _blur_plane(p, k, tmp, row):
    """p [H, W] in place; tmp [H, W] and row [W + 2r] scratch."""
    h, w = p.shape
    t = k.shape[0]
    r = (t - 1) // 2
    for y in range(h):  # vertical: whole rows times a tap, accumulated in tmp
        acc = tmp[y]
        src = p[_reflect(y - r, h)]
        for xx in range(w):
            acc[xx] = k[0] * src[xx]
        for j in range(1, t):
            src, kj = p[_reflect(y + j - r, h)], k[j]
            for xx in range(w):
                acc[xx] += kj * src[xx]
    for y in range(h):  # horizontal: each row reflect-padded into `row`, then the taps
        src = tmp[y]
        row[r : r + w] = src
        for j in range(r):
            row[j] = src[r - j]
            row[r + w + j] = src[w - 2 - j]
        dst = p[y]
        for xx in range(w):
            dst[xx] = k[0] * row[xx]
        for j in range(1, t):
            kj = k[j]
            for xx in range(w):
                dst[xx] += kj * row[xx + j]


@_kernel
def _blur(x, sigma, radius):
    n, c, h, w = x.shape
    for i in prange(n):
        s = sigma[i]
        if s > _SIGMA_OFF:
            r = min(radius, int(math.ceil(_TAP_REACH * s)))
            k = _taps(s, r)
            tmp, row = np.empty((h, w), np.float32), np.empty(w + 2 * r, np.float32)
            for ch in range(c):
                _blur_plane(x[i, ch], k, tmp, row)


# ------------------------------------------------------------------------------ geometry


def warp_nearest_(x: Tensor, theta: Tensor, active: Tensor) -> Tensor:
    """ops.affine_warp(x, theta, "nearest") for the images where `active` is true (the others
    are left as they are): each output pixel takes its source pixel's value, 0 outside."""
    a, th, on = _arrays(x, theta.reshape(-1, 6), active)
    if a.size:
        _warp_nearest(a, th, on)
    return x


# no fastmath: the source coordinates must round as grid_sample's (IEEE float32, no fused
# multiply-adds) for the pixels to agree, ties included
@(numba.njit(parallel=True, nogil=True, cache=True) if numba else (lambda fn: fn))
def _warp_nearest(x, theta, active):
    n, c, h, w = x.shape
    # ops.affine_warp's normalised pixel centres, then grid_sample's unnormalisation
    xs = (np.arange(w).astype(np.float32) + _HALF) * np.float32(2 / w) - _1
    ys = (np.arange(h).astype(np.float32) + _HALF) * np.float32(2 / h) - _1
    half_w, half_h = np.float32(w / 2), np.float32(h / 2)
    for i in prange(n):
        if active[i] == 0:
            continue
        t = theta[i]
        # each plane copied with one 0 after it, where pixels from outside the image point
        src = np.empty((c, h * w + 1), np.float32)
        src[:, : h * w] = x[i].reshape(c, h * w)
        src[:, h * w] = _0
        index = np.empty(w, np.int64)
        for r in range(h):
            row_x, row_y = t[1] * ys[r], t[4] * ys[r]
            for col in range(w):
                sx = np.rint((row_x + (t[0] * xs[col] + t[2]) + _1) * half_w - _HALF)
                sy = np.rint((row_y + (t[3] * xs[col] + t[5]) + _1) * half_h - _HALF)
                inside = (sx >= _0) & (sx < w) & (sy >= _0) & (sy < h)
                index[col] = int(sy) * w + int(sx) if inside else h * w
            _gather_row(x[i, :, r], src, index)


@_helper
def _gather_row(dst, src, index):
    for ch in range(dst.shape[0]):
        out, plane = dst[ch], src[ch]
        for col in range(index.shape[0]):
            out[col] = plane[index[col]]
