"""Fused CPU kernels (numba) for the batched engine's ops.

Each kernel does in one or two passes over an image what its torch version in ops.py does in many
(hue ~15 passes, gray blend ~6, blur one multiply-add pass per tap, the nearest warp a grid and a
sample pass), and skips the images whose parameter is the identity, so the engine runs them on a
whole chunk instead of gathering the images that drew them. Images are processed in parallel over
torch's thread count. Results match ops.py within float rounding, or exactly where the kernel
keeps IEEE float32 (tests/test_batched_ops.py and tests/test_cpu_kernels.py run both); without
numba, ops.py runs.

Kernels take float32 C-contiguous CPU tensors [N, 3, H, W] with values in [0, 1] and work in
place. Why numba rather than torch.compile: inductor's CPU code needs a C++ compiler at run time
and compiled the blur slower than eager; numba ships its own LLVM (and comes with umap-learn).
"""

from .base import available, usable_here
from .colour import (
    adjust_hue_,
    autocontrast_,
    brightness_,
    equalize_,
    gray_blend_,
    posterize_,
    solarize_,
)
from .spatial import cutout_, gaussian_blur_, sharpness_, warp_nearest_

__all__ = [
    "adjust_hue_", "autocontrast_", "available", "brightness_", "cutout_", "equalize_",
    "gaussian_blur_", "gray_blend_", "posterize_", "sharpness_", "solarize_", "usable_here",
    "warp_nearest_",
]
