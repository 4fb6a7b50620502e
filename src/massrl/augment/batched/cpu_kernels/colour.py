"""Colour and level ops: hue, gray blends, equalize, brightness, posterize, solarize,
autocontrast."""

from __future__ import annotations

import numpy as np
from torch import Tensor

from .base import (
    F0,
    F1,
    F2,
    F3,
    F4,
    F6,
    F255,
    HALF,
    LEVEL_EPS,
    SIXTH,
    TINY,
    WB,
    WG,
    WR,
    exact_kernel,
    helper,
    kernel,
    prange,
    run,
)

# ------------------------------------------------------------------------------ hue


def adjust_hue_(x: Tensor, hue: Tensor) -> Tensor:
    """ops.adjust_hue_ in one pass; images with hue 0 are left exactly as they are."""
    return run(_hue, x, "planes", hue * 6)


@helper
def _hue_plane(r_, g_, b_, s):  # separate row arrays: LLVM vectorises (no aliasing to rule out)
    for k in range(r_.shape[0]):
        r, g, b = r_[k], g_[k], b_[k]
        mx, mn = max(r, max(g, b)), min(r, min(g, b))
        c = mx - mn
        # ops.adjust_hue_'s sector choice with 0/1 masks: red wins ties, then green
        is_r = np.float32(r == mx)
        is_g = np.float32(g == mx) * (F1 - is_r)
        blue = r - g + F4 * c
        num = blue + is_r * (g - b - blue) + is_g * (b - r + F2 * c - blue)
        h = num / max(c, TINY) + s
        h -= np.floor(h * SIXTH) * F6  # (np.floor keeps float32; math.floor gives an int)
        r_[k] = mn + c * min(max(abs(h - F3) - F1, F0), F1)
        g_[k] = mx - c * min(max(abs(h - F2) - F1, F0), F1)
        b_[k] = mx - c * min(max(abs(h - F4) - F1, F0), F1)


@kernel
def _hue(x, shift6):
    for i in prange(x.shape[0]):
        if shift6[i] != 0:
            _hue_plane(x[i, 0], x[i, 1], x[i, 2], shift6[i])


# ------------------------------------------------------------------------------ gray blends


def gray_blend_(x: Tensor, factor: Tensor, gray_w: Tensor, mean_w: Tensor) -> Tensor:
    """ops.gray_blend_ (saturation, contrast, grayscale) in one pass, two with a mean; images with
    factor 1 are left as they are."""
    return run(_gray_blend, x, "planes", factor, gray_w, mean_w)


@helper
def _luma_mean(r_, g_, b_):
    total = 0.0
    for k in range(r_.shape[0]):
        total += WR * r_[k] + WG * g_[k] + WB * b_[k]
    return np.float32(total / r_.shape[0])


@helper
def _blend_plane(r_, g_, b_, f, a, b):  # x * f + a * luma + b, clamped to [0, 1]
    for k in range(r_.shape[0]):
        t = a * (WR * r_[k] + WG * g_[k] + WB * b_[k]) + b
        r_[k] = min(max(r_[k] * f + t, F0), F1)
        g_[k] = min(max(g_[k] * f + t, F0), F1)
        b_[k] = min(max(b_[k] * f + t, F0), F1)


@kernel
def _gray_blend(x, factor, gray_w, mean_w):
    for i in prange(x.shape[0]):
        f = factor[i]
        if f != 1:
            mean = _luma_mean(x[i, 0], x[i, 1], x[i, 2]) if mean_w[i] != 0 else F0
            _blend_plane(x[i, 0], x[i, 1], x[i, 2], f, gray_w[i] * (F1 - f),
                         mean_w[i] * (F1 - f) * mean)


# ------------------------------------------------------------------------------ equalize


def equalize_(x: Tensor, enabled: Tensor) -> Tensor:
    """ops.equalize_ (PIL's per-channel histogram equalisation on the 0..255 levels) in two
    passes per channel; disabled images and flat channels are left as they are."""
    return run(_equalize, x, "planes", enabled)


@helper
def _equalize_plane(p):
    hist = np.zeros(256, np.int64)
    for k in range(p.shape[0]):
        hist[min(max(int(p[k] * F255 + HALF), 0), 255)] += 1
    top = 0
    for level in range(256):  # the count of the brightest level present
        if hist[level]:
            top = hist[level]
    step = (p.shape[0] - top) // 255
    if step == 0:
        return
    lut = np.empty(256, np.float32)
    cum = 0
    lut[0] = F0
    for level in range(1, 256):
        cum += hist[level - 1]
        lut[level] = np.float32(min((cum + step // 2) // step, 255)) / F255
    for k in range(p.shape[0]):
        p[k] = lut[min(max(int(p[k] * F255 + HALF), 0), 255)]


@kernel
def _equalize(x, enabled):
    for i in prange(x.shape[0]):
        if enabled[i] != 0:
            for c in range(x.shape[1]):
                _equalize_plane(x[i, c])


# ------------------------------------------------------------------------------ pointwise


def brightness_(x: Tensor, factor: Tensor) -> Tensor:
    """ops.brightness_; images with factor 1 are left as they are."""
    return run(_brightness, x, "flat", factor)


@kernel
def _brightness(x, factor):
    for i in prange(x.shape[0]):
        f = factor[i]
        if f != 1:
            p = x[i]
            for k in range(p.shape[0]):
                p[k] = min(max(p[k] * f, F0), F1)


def posterize_(x: Tensor, bits: Tensor) -> Tensor:
    """ops.posterize_ (the top `bits` bits of each 0..255 level); bits 8 leaves an image as it
    is."""
    return run(_posterize, x, "flat", bits)


@exact_kernel
def _posterize(x, bits):
    for i in prange(x.shape[0]):
        if bits[i] < 8:
            q = np.float32(2.0 ** (8 - int(bits[i])))
            scale = F255 / q  # exact: q is a power of two, as in ops.posterize_
            p = x[i]
            for k in range(p.shape[0]):
                p[k] = np.floor(p[k] * scale + LEVEL_EPS) * q / F255


def solarize_(x: Tensor, threshold: Tensor) -> Tensor:
    """ops.solarize_ (levels >= threshold inverted; 0 inverts all); thresholds above 255 leave
    an image as it is."""
    return run(_solarize, x, "flat", threshold)


@exact_kernel
def _solarize(x, threshold):
    for i in prange(x.shape[0]):
        if threshold[i] <= 255:
            t = threshold[i] / F255
            p = x[i]
            for k in range(p.shape[0]):
                v = p[k]
                p[k] = F1 - v if v >= t else v


def autocontrast_(x: Tensor, enabled: Tensor) -> Tensor:
    """ops.autocontrast_ (each channel stretched to [0, 1]); flat channels and disabled images
    are left as they are."""
    return run(_autocontrast, x, "planes", enabled)


@helper
def _min_max(p):  # (exact in any order: fastmath only lets it vectorise)
    lo, hi = p[0], p[0]
    for k in range(1, p.shape[0]):
        lo, hi = min(lo, p[k]), max(hi, p[k])
    return lo, hi


@exact_kernel
def _autocontrast(x, enabled):
    for i in prange(x.shape[0]):
        if enabled[i] != 0:
            for c in range(x.shape[1]):
                p = x[i, c]
                lo, hi = _min_max(p)
                if hi > lo:
                    scale = F1 / (hi - lo)
                    for k in range(p.shape[0]):
                        p[k] = min(max((p[k] - lo) * scale, F0), F1)
