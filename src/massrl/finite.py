"""Where a model's numbers stopped being finite: the weights of a checkpoint saved after a run
diverged, or the features such a model gives. Said by name, where they are found, instead of a
0.00 % that reads as a result."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def first_nonfinite(named: Iterable[tuple[str, object]]) -> str | None:
    """The name of the first floating-point tensor holding a NaN or an infinity; None when every
    one is finite (other values are passed over)."""
    for name, value in named:
        if (torch.is_tensor(value) and value.is_floating_point() and value.numel()
                and not bool(torch.isfinite(value).all())):
            return name
    return None


def nonfinite_rows(x: torch.Tensor) -> int:
    """How many rows (samples) of `x` hold a NaN or an infinity."""
    return int((~torch.isfinite(x)).flatten(1).any(dim=1).sum()) if x.numel() else 0
