"""The engine's op families: the ops that share one pass over the images, and how each runs.

A family `fn(x, op, mag, aux)` applies its ops to the images that drew one of them and leaves
every other image exactly as it is (identity parameters), so the engine can run it on a whole
chunk, a whole batch or only the gathered images that drew it. Each family runs as a fused numba
kernel on the CPU (cpu_kernels/, augment.cpu_kernels) or as torch ops (ops.py) elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType, SimpleNamespace

import torch
from torch import Tensor

from . import cpu_kernels, ops
from .policies import CUTOUT_FILL, Op, on_device

FamilyFn = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]

# the op ids as plain ints for the families' comparisons: torch.compile traces
# `tensor == Op.X` (an IntEnum member) as a Python bool, not as a tensor comparison
OP = SimpleNamespace(**{o.name: int(o) for o in Op})

# member fraction of a chunk above which a family runs on the whole chunk: where running it on
# the others costs less than gathering and scattering the members (~2 passes each), so cheap ops
# go dense early (gray blend ~6 passes: 0.75, 0.979x against 0.4 at 224 px; brightness ~2
# passes: 0.5). translate: 0, it skips the images that do not move, so it never needs a gather
_DENSE = {"brightness": 0.5, "gray_blend": 0.75, "solarize": 0.4, "posterize": 0.5,
          "autocontrast": 0.5, "cutout": 0.3, "translate": 0.0}

# families with a fused CPU kernel (cpu_kernels/; translate is slice copies already)
_FUSED = {"gray_blend", "equalize", "hue", "blur", "warp", "brightness", "sharpness", "posterize",
          "solarize", "autocontrast", "cutout"}  # (warp: nearest only)


def use_cpu_kernels(choice: str) -> bool:
    """Whether augment.cpu_kernels=`choice` runs the fused kernels here."""
    if choice == "numba" and not cpu_kernels.available():
        from massrl.config import ConfigError  # (a one-line error on the command line)

        raise ConfigError("augment.cpu_kernels=numba needs numba, which is not installed: "
                         "`pip install numba`, or set augment.cpu_kernels=auto (torch ops then)")
    return choice != "torch" and cpu_kernels.available()


def blur_radius(size: int) -> int:
    """Match the per-image backend: kernel ~10% of the side (odd, >= 3) while it is <= 5 px;
    beyond that PIL's untruncated blur, which 3 sigma_max (= 6 px) covers to 0.3% of its mass."""
    k = max(3, int(0.1 * size) | 1)
    return k // 2 if k <= 5 else 6


class OpFamilies:
    """Builds the families and decides, per family and tensor, which implementation runs."""

    def __init__(self, fused: bool, interpolation: str) -> None:
        self.fused = fused
        self.interpolation = interpolation
        self.fill = torch.tensor(CUTOUT_FILL, dtype=torch.float32) / 255

    def fused_on(self, x: Tensor) -> bool:
        """Whether the fused CPU kernels run on x."""
        # (torch.compile traces the torch ops; it cannot trace into the numba kernels)
        return (self.fused and x.device.type == "cpu" and x.dtype == torch.float32
                and not torch.compiler.is_compiling() and cpu_kernels.usable_here())

    def kernel_for(self, family: str, x: Tensor) -> bool:
        """Whether `family` runs as a fused CPU kernel on x (the warp only when nearest)."""
        fused = family in _FUSED and (family != "warp" or self.interpolation == "nearest")
        return fused and self.fused_on(x)

    def impl(self, x: Tensor) -> ModuleType:
        """The module whose ops run on x: the fused CPU kernels or the torch ops."""
        return cpu_kernels if self.fused_on(x) else ops

    def dense_threshold(self, family: str, x: Tensor) -> float:
        """Grouped mode: the member fraction above which `family` runs on the whole chunk."""
        # the fused kernels skip the images whose parameter is the identity: never gather
        return 0.0 if self.kernel_for(family, x) else _DENSE.get(family, 0.8)

    def build(self, grouped: bool) -> list[tuple[set[int], FamilyFn]]:
        """(op ids, fn(x, op, mag, aux)); each fn is the identity on images of other ops.
        Grouped mode runs whole-pixel translations as slice copies instead of in the warp."""
        fill, mode, impl = self.fill, self.interpolation, self.impl
        # translations are whole pixels (policies.py): with nearest sampling the warp is a shift
        shift = grouped and mode == "nearest"
        moves = {OP.TRANSLATE_X, OP.TRANSLATE_Y}

        def warp(x, op, mag, aux):  # (identity for translations when they have their own family)
            warped = (op >= OP.SHEAR_X) & (op <= OP.ROTATE)
            if shift:
                warped &= (op != OP.TRANSLATE_X) & (op != OP.TRANSLATE_Y)
            kind = torch.where(warped, op, 0)
            theta = ops.warp_theta(kind, mag, x.shape[-2], x.shape[-1])
            if self.kernel_for("warp", x):
                return cpu_kernels.warp_nearest_(x, theta, kind != 0)
            return ops.affine_warp(x, theta, mode)

        def translate(x, op, mag, aux):
            zero = torch.zeros_like(mag)
            return ops.translate_(x, torch.where(op == OP.TRANSLATE_X, mag, zero),
                                  torch.where(op == OP.TRANSLATE_Y, mag, zero))

        def brightness(x, op, mag, aux):
            return impl(x).brightness_(x, torch.where(op == OP.BRIGHTNESS, mag, 1.0))

        def gray_blend(x, op, mag, aux):
            sat, con, gray = op == OP.SATURATION, op == OP.CONTRAST, op == OP.GRAYSCALE
            factor = torch.where(sat | con, mag, torch.where(gray, 0.0, 1.0))
            return impl(x).gray_blend_(x, factor, (sat | gray).to(x.dtype), con.to(x.dtype))

        def sharpness(x, op, mag, aux):
            return impl(x).sharpness_(x, torch.where(op == OP.SHARPNESS, mag, 1.0))

        def posterize(x, op, mag, aux):
            return impl(x).posterize_(x, torch.where(op == OP.POSTERIZE, mag, 8.0))

        def solarize(x, op, mag, aux):  # invert = solarize at threshold 0
            thr = torch.where(op == OP.SOLARIZE, mag, torch.where(op == OP.INVERT, 0.0, 256.0))
            return impl(x).solarize_(x, thr)

        def autocontrast(x, op, mag, aux):
            return impl(x).autocontrast_(x, op == OP.AUTOCONTRAST)

        def equalize(x, op, mag, aux):
            return impl(x).equalize_(x, op == OP.EQUALIZE)

        def hue(x, op, mag, aux):
            return impl(x).adjust_hue_(x, torch.where(op == OP.HUE, mag, 0.0))

        def blur(x, op, mag, aux):
            sigma = torch.where(op == OP.BLUR, mag, 1e-4)
            return impl(x).gaussian_blur_(x, sigma, blur_radius(x.shape[-1]))

        def cutout(x, op, mag, aux):
            side = torch.where(op == OP.CUTOUT, mag, 0.0)
            return impl(x).cutout_(x, side, aux, on_device(("fill",), x.device, lambda: fill))

        geometric = {OP.SHEAR_X, OP.SHEAR_Y, OP.ROTATE}
        geometry = [(geometric, warp), (moves, translate)] if shift else [(geometric | moves, warp)]
        return [
            *geometry,
            ({OP.BRIGHTNESS}, brightness),
            ({OP.SATURATION, OP.CONTRAST, OP.GRAYSCALE}, gray_blend),
            ({OP.SHARPNESS}, sharpness),
            ({OP.POSTERIZE}, posterize),
            ({OP.SOLARIZE, OP.INVERT}, solarize),
            ({OP.AUTOCONTRAST}, autocontrast),
            ({OP.EQUALIZE}, equalize),
            ({OP.HUE}, hue),
            ({OP.BLUR}, blur),
            ({OP.CUTOUT}, cutout),
        ]
