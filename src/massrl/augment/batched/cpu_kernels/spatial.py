"""Spatial ops: Gaussian blur, sharpness, the nearest affine warp, cutout."""

from __future__ import annotations

import math

import numpy as np
from torch import Tensor

from .base import (
    F0,
    F1,
    F4_13,
    F13,
    HALF,
    SIGMA_OFF,
    TAP_REACH,
    exact_kernel,
    helper,
    kernel,
    prange,
    run,
)

# ------------------------------------------------------------------------------ blur


def gaussian_blur_(x: Tensor, sigma: Tensor, radius: int) -> Tensor:
    """ops.gaussian_blur_: separable Gaussian, reflect padding, at most `radius` taps each side
    (fewer where an image's own sigma needs fewer); images with sigma ~0 are left as they are."""
    radius = min(radius, x.shape[-2] - 1, x.shape[-1] - 1)  # reflect padding stays inside
    return run(_blur, x, "image", sigma, radius=radius) if radius > 0 else x


@helper
def _reflect(i, n):
    return -i if i < 0 else (2 * n - 2 - i if i >= n else i)


@helper
def _taps(sigma, radius):
    """Normalised 1-D Gaussian taps for offsets -radius..radius (as ops.gaussian_kernels)."""
    k = np.empty(2 * radius + 1, np.float32)
    for j in range(2 * radius + 1):
        t = np.float32(j - radius) / np.float32(sigma)
        k[j] = math.exp(-HALF * t * t)
    return (k / k.sum()).astype(np.float32)


@helper
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


@kernel
def _blur(x, sigma, radius):
    n, c, h, w = x.shape
    for i in prange(n):
        s = sigma[i]
        if s > SIGMA_OFF:
            r = min(radius, int(math.ceil(TAP_REACH * s)))
            k = _taps(s, r)
            tmp, row = np.empty((h, w), np.float32), np.empty(w + 2 * r, np.float32)
            for ch in range(c):
                _blur_plane(x[i, ch], k, tmp, row)


# ------------------------------------------------------------------------------ geometry


def warp_nearest_(x: Tensor, theta: Tensor, active: Tensor) -> Tensor:
    """ops.affine_warp(x, theta, "nearest") for the images where `active` is true (the others
    are left as they are): each output pixel takes its source pixel's value, 0 outside."""
    return run(_warp_nearest, x, "image", theta.reshape(-1, 6), active)


# exact: the source coordinates must round as grid_sample's (IEEE float32, no fused
# multiply-adds) for the pixels to agree, ties included
@exact_kernel
def _warp_nearest(x, theta, active):
    n, c, h, w = x.shape
    # ops.affine_warp's normalised pixel centres, then grid_sample's unnormalisation
    xs = (np.arange(w).astype(np.float32) + HALF) * np.float32(2 / w) - F1
    ys = (np.arange(h).astype(np.float32) + HALF) * np.float32(2 / h) - F1
    half_w, half_h = np.float32(w / 2), np.float32(h / 2)
    for i in prange(n):
        if active[i] == 0:
            continue
        t = theta[i]
        # each plane copied with one 0 after it, where pixels from outside the image point
        src = np.empty((c, h * w + 1), np.float32)
        src[:, : h * w] = x[i].reshape(c, h * w)
        src[:, h * w] = F0
        index = np.empty(w, np.int64)
        for r in range(h):
            row_x, row_y = t[1] * ys[r], t[4] * ys[r]
            for col in range(w):
                sx = np.rint((row_x + (t[0] * xs[col] + t[2]) + F1) * half_w - HALF)
                sy = np.rint((row_y + (t[3] * xs[col] + t[5]) + F1) * half_h - HALF)
                inside = (sx >= F0) & (sx < w) & (sy >= F0) & (sy < h)
                index[col] = int(sy) * w + int(sx) if inside else h * w
            _gather_row(x[i, :, r], src, index)


@helper
def _gather_row(dst, src, index):
    for ch in range(dst.shape[0]):
        out, plane = dst[ch], src[ch]
        for col in range(index.shape[0]):
            out[col] = plane[index[col]]


# ------------------------------------------------------------------------------ sharpness, cutout


def sharpness_(x: Tensor, factor: Tensor) -> Tensor:
    """ops.sharpness_ (PIL's: blend with the 3x3 smoothed image, border kept); factor 1 leaves
    an image as it is."""
    return run(_sharpness, x, "image", factor) if min(x.shape[-2:]) > 2 else x


@helper
def _row_sums(src, out):  # out[j] = src[j] + src[j + 1] + src[j + 2]
    for j in range(out.shape[0]):
        out[j] = src[j] + src[j + 1] + src[j + 2]


@kernel
def _sharpness(x, factor):
    n, c, h, w = x.shape
    for i in prange(n):
        f = factor[i]
        if f == 1:
            continue
        a = f + (F1 - f) * F4_13  # x * a + box * b, box the 3x3 sum (as ops.sharpness_)
        b = (F1 - f) / F13
        sums = np.empty((3, w - 2), np.float32)  # row sums of the original rows y-1, y, y+1
        for ch in range(c):
            p = x[i, ch]
            _row_sums(p[0], sums[0])
            _row_sums(p[1], sums[1])
            for y in range(1, h - 1):
                # the sums of row y+1 are taken before row y is overwritten; row y-1 is already
                # written, its sums were taken from the original
                _row_sums(p[y + 1], sums[(y + 1) % 3])
                up, mid, down = sums[(y - 1) % 3], sums[y % 3], sums[(y + 1) % 3]
                row = p[y]
                for j in range(w - 2):
                    box = up[j] + mid[j] + down[j]
                    row[j + 1] = min(max(row[j + 1] * a + box * b, F0), F1)


def cutout_(x: Tensor, side: Tensor, centre: Tensor, fill: Tensor) -> Tensor:
    """ops.cutout_ (a side-pixel square of `fill`, clamped and clipped as the per-image
    backend); side 0 leaves an image as it is."""
    return run(_cutout, x, "image", side, centre, fill)


@exact_kernel
def _cutout(x, side, centre, fill):
    n, c, h, w = x.shape
    for i in prange(n):
        s = side[i]
        if s > 0:
            half = s / np.float32(2)
            x0 = np.floor(max(centre[i, 0] - half, F0))  # float32 throughout, as ops.cutout_
            y0 = np.floor(max(centre[i, 1] - half, F0))
            x1 = min(np.floor(x0 + s) + np.float32(1), np.float32(w))  # far edge included
            y1 = min(np.floor(y0 + s) + np.float32(1), np.float32(h))
            for ch in range(c):
                x[i, ch, int(y0) : int(y1), int(x0) : int(x1)] = fill[ch]
