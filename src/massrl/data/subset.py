"""Seeded, class-balanced subsets (quick experiments) and label fractions (semi-supervised).

Both return sorted index lists, identical for the same inputs and seed. A negative label means
"unlabeled" (STL-10's unlabeled split, plain image folders).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch.utils.data import Dataset, Subset


def balanced_subset(labels: Sequence[int] | None, n: int, seed: int) -> list[int]:
    """``n`` indices, as equal per class as possible (counts differ by at most one, except where a
    class has fewer items than its share; the shortfall goes to the other classes).

    Any negative (unlabeled) label: a seeded uniform random subset, since class balance cannot be
    defined on partly unlabeled data. ``labels=None`` is an error (the size would be unknown).
    ``n >= len(labels)`` returns every index.
    """
    if n <= 0:
        raise ValueError(f"subset size must be positive, got {n}")
    if labels is None:
        raise ValueError(
            "balanced_subset needs one label per item; for unlabeled data pass [-1] * size "
            "(or call random_subset(size, n, seed))"
        )
    rng = np.random.default_rng(seed)
    arr = np.asarray(labels, dtype=np.int64)
    if n >= len(arr):
        return list(range(len(arr)))
    if (arr < 0).any():
        return random_subset(len(arr), n, seed)
    groups = _groups(arr, rng)
    quotas = _water_fill([len(g) for g in groups], n)
    chosen = np.concatenate([g[:q] for g, q in zip(groups, quotas, strict=True)])
    return sorted(int(i) for i in chosen)


def random_subset(size: int, n: int, seed: int) -> list[int]:
    """``min(n, size)`` seeded uniform random indices of ``range(size)``, sorted."""
    if n >= size:
        return list(range(size))
    rng = np.random.default_rng(seed)
    return sorted(int(i) for i in rng.choice(size, size=n, replace=False))


def fraction_subset(labels: Sequence[int] | None, fraction: float, seed: int) -> list[int]:
    """A seeded ``fraction`` of each class (rounded, at least one per class), for semi-supervised
    training with 1% / 10% of the labels. Unlabeled (negative) entries are never chosen.

    ``labels=None`` is not allowed: without labels there is nothing to take a label fraction of.
    """
    if not (isinstance(fraction, (int, float)) and 0.0 < fraction <= 1.0):
        raise ValueError(f"label fraction must be in (0, 1], got {fraction!r}")
    if labels is None:
        raise ValueError("fraction_subset needs labels: an unlabeled dataset has no label fraction")
    arr = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    groups = _groups(arr, rng, skip_negative=True)
    chosen = [g[: max(1, round(fraction * len(g)))] for g in groups]
    if not chosen:
        raise ValueError("fraction_subset: no labeled items")
    return sorted(int(i) for i in np.concatenate(chosen))


def _groups(arr: np.ndarray, rng: np.random.Generator, skip_negative: bool = False) -> list:
    """Per class (in a seeded random class order), that class's indices in a seeded random order.

    The class order is random so that the remainder of an uneven split goes to random classes,
    not always to the first ones.
    """
    classes = np.unique(arr)
    if skip_negative:
        classes = classes[classes >= 0]
    classes = classes[rng.permutation(len(classes))]
    return [rng.permutation(np.flatnonzero(arr == c)) for c in classes]


def _water_fill(sizes: list[int], n: int) -> list[int]:
    """Split ``n`` into per-group quotas as equal as possible without exceeding any group's size."""
    order = sorted(range(len(sizes)), key=lambda i: sizes[i])  # stable: keeps the seeded order
    quotas = [0] * len(sizes)
    remaining = n
    for rank, i in enumerate(order):
        # Floor shares: the remainder drifts to the last (largest) groups, at most one each.
        quotas[i] = min(sizes[i], remaining // (len(sizes) - rank))
        remaining -= quotas[i]
    return quotas


def base_and_indices(ds: Dataset) -> tuple[Dataset, list[int]]:
    """The dataset a (nested) Subset was drawn from, and the positions there of its items."""
    indices = list(range(len(ds)))
    while isinstance(ds, Subset):
        indices = [ds.indices[i] for i in indices]
        ds = ds.dataset
    return ds, indices
