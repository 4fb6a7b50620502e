"""Horizontal flips in the batched engine: before the ops where that is exact, after them otherwise.

Every view flips with probability 1/2 after its ops, as in the per-image backend
(massrl.augment.views). On the CPU the engine flips large images before the ops instead, as
uint8: a quarter of the bytes of the float result it would otherwise flip and copy back.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .policies import Op, Program, on_device

# flip(op(m)) == op(-m)(flip): these ops run mirrored on images flipped before them
_MIRRORED = (Op.SHEAR_X, Op.ROTATE, Op.TRANSLATE_X)
# a shear along y pivots on the left column and a cutout square is clamped at the left edge:
# their mirror images are not ops of the same kind, so their images flip after the ops
_FLIP_LAST = (Op.SHEAR_Y, Op.CUTOUT)


def flip_first(prog: Program) -> tuple[Program, Tensor]:
    """(the program with the flips left for after the ops, the images to flip before them).

    Flipping the uint8 image before the ops costs a quarter of flipping the float result, and
    gives the same image where every op commutes with the flip (colour ops, blur, sharpness,
    equalize...) or has a mirrored op of the same kind (shear x, rotation, translation x with the
    opposite sign, whose magnitudes the policies draw with a random sign anyway). The one
    difference: a nearest warp's source pixel at an exact rounding tie (a shear of 0.2 at row
    2: 0.2 * 2.5 = 0.5 px) is rounded to the even side of the mirrored image."""
    mirrored = on_device(("mirrored",), prog.op.device, lambda: torch.tensor(_MIRRORED))
    last = on_device(("flip_last",), prog.op.device, lambda: torch.tensor(_FLIP_LAST))
    last = torch.isin(prog.op, last).any(1)
    early = prog.flip & ~last
    mirror = early[:, None] & torch.isin(prog.op, mirrored)
    mag = torch.where(mirror, -prog.mag, prog.mag)
    return Program(prog.op, mag, prog.aux, prog.flip & last), early


def load_flipped(x: Tensor, u8: Tensor, flip: Tensor) -> None:
    """x = u8 / 255, the images where `flip` is set mirrored left-right: image by image, the
    others copied in runs (reading `flip` is free on the CPU)."""
    start = 0
    for t in flip.nonzero().squeeze(1).tolist():
        if t > start:
            x[start:t].copy_(u8[start:t])
        x[t].copy_(u8[t].flip(-1))
        start = t + 1
    if start < x.shape[0]:
        x[start:].copy_(u8[start:])
    x.mul_(1 / 255)


def flip_after(x: Tensor, flip: Tensor, image_bytes: int) -> None:
    """Flip the images where `flip` is set: in place, image by image, for large images (2
    passes, no gather); with one gather / flip / scatter for small ones (fewer calls)."""
    idx = flip.nonzero().squeeze(1)
    if not idx.numel():
        return
    if image_bytes >= 64 << 10:
        for t in idx.tolist():
            x[t].copy_(x[t].flip(-1))
    else:
        x.index_copy_(0, idx, x.index_select(0, idx).flip(-1))
