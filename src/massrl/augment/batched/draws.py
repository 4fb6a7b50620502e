"""Random numbers per image from the image's own seed: a counter-based generator on tensors.

The k-th draw of image i is a hash of (seeds[i], k), so what an image draws depends on its seed
alone, never on the batch it is in, its position there or the number of devices: 2 ranks x B
images augment exactly as 1 x 2B. The seeds are drawn per view by CropOnlyTransform from torch's
generator, which the dataset seeds for each image from (run seed, epoch, image index)
(data/sampler.py), where the per-image backend draws its augmentations: so the batched backend's
views of an image are the same whatever the batch size, worker count or number of ranks.

The generator is SplitMix64 (Steele et al. 2014) on int64 tensors: only tensor integer ops, the
same bits on every device, and no host-device synchronisation.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)  # 2^64 / phi, as a signed int64
_BLOCK = 32  # values hashed per image at a time: ~what one sampling pass of massrl's view set uses


def _signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


def _shr(x: Tensor, s: int) -> Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def mix64(z: Tensor) -> Tensor:
    """SplitMix64's finaliser on int64 tensors (products wrap modulo 2^64, as two's complement
    integer multiplication does on CPUs and GPUs)."""
    z = (z ^ _shr(z, 30)) * _signed(0xBF58476D1CE4E5B9)
    z = (z ^ _shr(z, 27)) * _signed(0x94D049BB133111EB)
    return z ^ _shr(z, 31)


def new_seeds(shape: tuple[int, ...], generator: torch.Generator | None = None,
              device: torch.device | str | None = None) -> Tensor:
    """Fresh 62-bit seeds (int64) from a torch generator (the process's when None)."""
    return torch.randint(1 << 62, shape, generator=generator, device=device, dtype=torch.int64)


class ImageDraws:
    """`rand(*trailing)` -> [n, *trailing] uniforms in [0, 1), each image from its own seed.

    Image i's j-th value is SplitMix64's j-th output from the state mix64(seed_i); calls take
    successive values, so a sampling pass that makes the same calls in the same order gives
    every image the same values wherever it sits in the batch. Values are hashed in blocks (one
    pass of ~12 integer ops serves many small calls)."""

    def __init__(self, seeds: Tensor) -> None:
        if seeds.dim() != 1 or seeds.dtype != torch.int64:
            raise ValueError(f"seeds must be int64 [N], got {seeds.dtype} {list(seeds.shape)}")
        self.n, self.device = seeds.shape[0], seeds.device
        self._key = mix64(seeds)[:, None]
        self._bits = torch.empty(self.n, 0, dtype=torch.int64, device=self.device)
        self._used = 0  # values of _bits already handed out
        self._hashed = 0  # values hashed so far: the index j of _bits' next new column

    def bits(self, *trailing: int) -> Tensor:
        """Uniform 64-bit integers (int64 [n, *trailing], any sign)."""
        count = math.prod(trailing)
        if self._used + count > self._bits.shape[1]:
            size = max(count, _BLOCK)
            j = torch.arange(self._hashed + 1, self._hashed + 1 + size, device=self.device)
            block = mix64(self._key + j * _GOLDEN)
            self._bits = torch.cat([self._bits[:, self._used :], block], 1)
            self._used, self._hashed = 0, self._hashed + size
        out = self._bits[:, self._used : self._used + count]
        self._used += count
        return out.reshape(self.n, *trailing)

    def rand(self, *trailing: int) -> Tensor:
        """Uniform float32 in [0, 1) on a 2^-24 grid (exact in float32)."""
        return _shr(self.bits(*trailing), 40).to(torch.float32) * (1.0 / (1 << 24))

    def randint(self, high: int, *trailing: int) -> Tensor:
        """Uniform integers in [0, high) (int64)."""
        return (self.rand(*trailing) * high).long().clamp_max_(high - 1)
