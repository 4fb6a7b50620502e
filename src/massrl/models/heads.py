"""Projector / predictor MLPs (Linear-BN-ReLU-Linear), as in BYOL and SimCLR, and the linear
classifier of the online probe and the offline linear evaluation."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def mlp(in_dim: int, hidden_dim: int, out_dim: int, last_bn: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Linear(in_dim, hidden_dim, bias=False),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim, bias=not last_bn),
    ]
    if last_bn:
        layers.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*layers)


class FeatureStandardiser(nn.Module):
    """Standardises each feature, without affine parameters: by the batch's statistics in
    training and the running ones in evaluation, as a BatchNorm1d(affine=False) does. Its
    running statistics start as the plain average of the first batches (momentum 1/t, then
    0.1): from BatchNorm's (0, 1) at 0.1 per step they took 50-70 steps to reach features whose
    variance is ~1e-3, and a short run (few labels, few epochs) was evaluated with the stale
    ones, near chance. A batch of fewer than two is standardised by the running statistics and
    updates nothing. Not a BatchNorm subclass, so that trainer.sync_batchnorm leaves the online
    probe's alone: converted, it lost that start, and a rank whose batch held no labeled image
    would have left the others waiting in its collective."""

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        self.steps = 0  # (num_batches_tracked on the host: reading the buffer would wait)

    def restart(self) -> None:
        """Back to the state of a new one."""
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self.num_batches_tracked.zero_()
        self.steps = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        learn = self.training and x.shape[0] > 1
        if learn:
            self.steps += 1
            self.num_batches_tracked.add_(1)
        return F.batch_norm(x, self.running_mean, self.running_var, training=learn,
                            momentum=max(0.1, 1 / max(self.steps, 1)), eps=self.eps)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)
        self.steps = int(self.num_batches_tracked)  # (a resumed run continues the count)


def linear_head(feature_dim: int, num_classes: int) -> nn.Sequential:
    """A linear classifier behind a parameter-free batch-norm (as in MAE's linear probing).

    It only standardises each feature (it is still a linear classifier), which makes one lr
    work whatever the backbone's feature scale: narrow or briefly trained backbones have features
    with a std of a few hundredths, on which a plain linear head barely moves at lr 0.1.
    """
    return nn.Sequential(FeatureStandardiser(feature_dim), nn.Linear(feature_dim, num_classes))


@torch.no_grad()
def restart_linear_head(head: nn.Sequential) -> None:
    """A linear_head from zero weights and fresh statistics: the same on every rank (a random
    initialisation would draw each rank's own)."""
    standardiser, linear = head
    standardiser.restart()
    linear.weight.zero_()
    linear.bias.zero_()
