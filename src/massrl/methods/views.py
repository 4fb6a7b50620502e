"""The layout of a batch's views inside a method: view-major [V*B, ...] tensors (all views
concatenated along the batch), through the encoders in one pass or view by view."""

from __future__ import annotations

import torch


def per_view(module: torch.nn.Module, x: torch.Tensor, num_views: int,
             separately: bool) -> torch.Tensor:
    """`module` on view-major [V*B, ...] inputs: in one pass, or (model.bn_per_view) view by
    view, so that its batch-norm layers normalise each view by its own statistics."""
    # (batch norm cannot train on one image: a view of a batch of one goes with the others)
    if not separately or num_views == 1 or len(x) < 2 * num_views:
        return module(x)
    return torch.cat([module(chunk) for chunk in x.chunk(num_views)])


def views_last(x: torch.Tensor, num_views: int) -> torch.Tensor:
    """[V*B, D] (views concatenated along the batch) -> [B, V, D]."""
    return x.reshape(num_views, -1, x.shape[-1]).transpose(0, 1)
