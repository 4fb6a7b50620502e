"""Weighted k-nearest-neighbour classification of frozen features (Wu et al. 2018, InstDisc).

Each test sample's k nearest training samples vote for their class with weight exp(sim / T). The
functions are pure tensor code, so the online monitor during pre-training and the offline `massrl
knn` command compute the same number on the same features.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

Distance = Literal["cosine", "euclidean"]


def _similarity(test: torch.Tensor, train: torch.Tensor, distance: Distance) -> torch.Tensor:
    if distance == "cosine":  # (of features knn_scores_per_k has normalised)
        return test @ train.T
    if distance == "euclidean":
        # Negative distance, so that "larger is nearer" holds for both metrics.
        return -torch.cdist(test, train)
    raise ValueError(f"distance must be 'cosine' or 'euclidean', not {distance!r}")


@torch.no_grad()
def knn_scores_per_k(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    ks: Sequence[int],
    temperature: float,
    num_classes: int,
    distance: Distance = "cosine",
    chunk_size: int = 256,
    mark_voted: bool = False,
) -> dict[int, torch.Tensor]:
    """Per-class vote totals for each k in `ks`, each of shape (num_test, num_classes), relative
    to the nearest neighbour. One similarity pass serves every k (the pass costs most: computed per
    k it doubled `massrl knn`'s time for k=20 and 200), as the k nearest are the first k of the
    largest k's nearest (topk sorts).

    Cosine similarity normalises the features itself; for euclidean the caller decides whether to
    L2-normalise first. A k larger than the training set is clamped to its size. Neighbours
    tied exactly at the k-th place (duplicate images, collapsed features) may be other ones than
    a pass for k alone would pick: topk breaks ties as it likes. With
    `mark_voted`, classes no neighbour voted for score -inf (a vote far from the nearest one
    underflows to 0: testing scores for 0 took such classes for unvoted ones).
    """
    ks = list(dict.fromkeys(ks))  # (each k once)
    if not ks or min(ks) < 1 or temperature <= 0:
        raise ValueError(f"need k >= 1 and temperature > 0, got k={list(ks)}, "
                         f"temperature={temperature}")
    train_feats = train_feats.float()
    test_feats = test_feats.to(train_feats.device, torch.float32)
    if distance == "cosine":  # once, not for every chunk (the same numbers, a fifth faster)
        train_feats, test_feats = F.normalize(train_feats, dim=1), F.normalize(test_feats, dim=1)
    labels = train_labels.to(train_feats.device, torch.long)
    largest = min(max(ks), train_feats.shape[0])
    out: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    # Chunk over test samples: the full test x train similarity matrix may not fit in memory.
    for start in range(0, test_feats.shape[0], chunk_size):
        sim = _similarity(test_feats[start:start + chunk_size], train_feats, distance)
        top_sim, top_idx = sim.topk(largest, dim=1)
        # Shifting by each row's nearest similarity scales that row's votes by a constant (the
        # ranking is unchanged) and keeps exp() finite for large euclidean distances.
        weights = ((top_sim - top_sim[:, :1]) / temperature).exp()
        top_labels = labels[top_idx]
        for k in ks:
            scores = torch.zeros(sim.shape[0], num_classes, device=sim.device)
            scores.scatter_add_(1, top_labels[:, :k], weights[:, :k])
            if mark_voted:
                voted = torch.zeros_like(scores, dtype=torch.bool)
                voted.scatter_(1, top_labels[:, :k], True)
                scores.masked_fill_(~voted, float("-inf"))
            out[k].append(scores)
    empty = torch.zeros(0, num_classes, device=train_feats.device)
    return {k: torch.cat(chunks) if chunks else empty for k, chunks in out.items()}


def knn_scores(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    k: int,
    temperature: float,
    num_classes: int,
    distance: Distance = "cosine",
    chunk_size: int = 256,
) -> torch.Tensor:
    """knn_scores_per_k for a single k."""
    return knn_scores_per_k(train_feats, train_labels, test_feats, (k,), temperature, num_classes,
                            distance, chunk_size)[k]


def topk_accuracy(
    scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)
) -> tuple[float, ...]:
    """Fraction of samples whose label is among the top-k scores, for each k (k capped at C).
    A class scored -inf (a kNN class without a vote) never counts, whatever its place."""
    if scores.shape[0] == 0:
        return tuple(0.0 for _ in ks)
    labels = labels.to(scores.device)
    top, ranked = scores.topk(min(max(ks), scores.shape[1]), dim=1)
    hits = (ranked == labels[:, None]) & (top > float("-inf"))
    return tuple(hits[:, :k].any(dim=1).float().mean().item() for k in ks)


def weighted_knn_per_k(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    ks: Sequence[int],
    temperature: float,
    num_classes: int,
    distance: Distance = "cosine",
    chunk_size: int = 256,
) -> dict[int, tuple[float, float]]:
    """(top-1, top-5) accuracy as fractions in [0, 1] of the weighted kNN classifier, for each k
    in `ks` from one similarity pass. Top-5 counts only classes that got votes: with fewer than 5
    voted classes (small k), the others are no guesses, whatever order a sort leaves them in."""
    for name, labels in (("train", train_labels), ("test", test_labels)):
        if len(labels) and not (0 <= int(labels.min()) and int(labels.max()) < num_classes):
            raise ValueError(f"weighted_knn: the {name} labels must lie in 0..{num_classes - 1} "
                             f"(num_classes={num_classes}): got {int(labels.min())}.."
                             f"{int(labels.max())}")
    per_k = knn_scores_per_k(
        train_feats, train_labels, test_feats, ks, temperature, num_classes, distance, chunk_size,
        mark_voted=True)
    return {k: topk_accuracy(scores, test_labels, (1, 5)) for k, scores in per_k.items()}


def weighted_knn(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    k: int,
    temperature: float,
    num_classes: int,
    distance: Distance = "cosine",
    chunk_size: int = 256,
) -> tuple[float, float]:
    """weighted_knn_per_k for a single k: (top-1, top-5)."""
    return weighted_knn_per_k(train_feats, train_labels, test_feats, test_labels, (k,),
                              temperature, num_classes, distance, chunk_size)[k]
