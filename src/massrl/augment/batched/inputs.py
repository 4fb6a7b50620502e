"""What the batched engine accepts, checked up front with messages that say how to fix it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .plan import Plan


def check_call(views: Sequence[Tensor], strategy: Tensor, seeds: Tensor | None,
               strategies: Sequence[str], read_values: bool = True) -> None:
    """The arguments of BatchedAugmenter(views, strategy, seeds=...), checked before any kernel
    runs: the numba kernels index 3 channels and the strategy ids without bounds checks (a grey
    batch wrote out of bounds), and the output is split by the first view's batch size.
    `read_values=False` (a host plan, which checked the ids) reads no tensor value."""
    if isinstance(views, Tensor) or not all(isinstance(v, Tensor) for v in views):
        raise ValueError("views must be a list of uint8 [B, 3, S, S] batches, one per view "
                         "(one per crop in crops_x_strategies mode)")
    for v in views:
        if v.dtype != torch.uint8 or v.dim() != 4 or v.shape[1] != 3:
            raise ValueError(f"views must be uint8 [B, 3, S, S] (RGB; repeat a grey channel "
                             f"3 times), got {v.dtype} {list(v.shape)}")
        if v.shape[2] != v.shape[3]:
            raise ValueError(f"views must be square (the policies' magnitudes and cutout "
                             f"positions follow the side S), got {v.shape[2]}x{v.shape[3]}: "
                             f"crop them square")
        if v.shape != views[0].shape:
            raise ValueError(f"every view batch must have one shape, got {list(v.shape)} "
                             f"and {list(views[0].shape)}")
    check_plan_inputs(strategy, seeds)
    named = (("views", views[0] if views else None), ("strategy", strategy), ("seeds", seeds))
    devices = {name: t.device for name, t in named if t is not None}
    if len(set(devices.values())) > 1:  # (an op deep inside would fail, naming none of them)
        listed = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"views, strategy and seeds must be on one device, got {listed}: "
                         f"move them with .to(device)")
    if views and strategy.shape[0] != views[0].shape[0]:
        raise ValueError(f"strategy must be [B, V] for batches of B = "
                         f"{views[0].shape[0] if views else '?'}, got {list(strategy.shape)}")
    if read_values and strategy.device.type == "cpu":  # (reading is free here)
        check_strategy_ids(strategy, strategies)


def check_layout(strategy: Tensor, groups: Sequence[int] | None, view_mode: str) -> None:
    """Where the view mode fixes each view's strategy (`groups`, view v's), the ids must say so:
    full mode (the GPU's) runs a view with its layout strategy's op families only, and would
    drop the ops of any other. Checked where reading the ids is free, on the CPU, in every mode:
    a loop written on the CPU then runs the same on a GPU."""
    if groups is None or strategy.device.type != "cpu":
        return
    if not torch.equal(strategy, torch.tensor(groups).to(strategy.dtype).expand_as(strategy)):
        raise ValueError(f"{view_mode} mode expects view v to have strategy {list(groups)} "
                         "(CropOnlyTransform's layout); view_mode=random takes ids of one's own")


def check_plan_inputs(strategy: Tensor, seeds: Tensor | None) -> None:
    """strategy and seeds as [B, V] integer tensors (a float id would be truncated to no
    strategy at all: the view would come out un-augmented)."""
    if strategy.dim() != 2:
        raise ValueError(f"strategy must be [B, V] (each view's strategy id), got "
                         f"{list(strategy.shape)}")
    dtype = strategy.dtype
    if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
        raise ValueError(f"strategy ids must be an integer tensor, got {strategy.dtype}")
    if seeds is not None and (seeds.shape != strategy.shape or seeds.dtype != torch.int64):
        raise ValueError(f"seeds must be int64 [B, V] like strategy {list(strategy.shape)}, "
                         f"got {seeds.dtype} {list(seeds.shape)}")


def check_plan(plan: Plan, size: int, strategy: Tensor, seeds: Tensor | None) -> None:
    """A plan serves only the views it was drawn for: their size, and (checked where reading
    the tensors is free, on the CPU) their strategy ids and seeds."""
    if plan.size != size:
        raise ValueError(f"the plan was drawn for {plan.size} px views, these are {size} px: "
                         f"draw it with aug.plan(strategy, seeds, {size})")
    drawn = plan.drawn_from
    given = (strategy, seeds)
    if seeds is None or any(t.device.type != "cpu" for t in (*drawn, *given)):
        return
    if not all(a.shape == b.shape and torch.equal(a.to(b.dtype), b)
               for a, b in zip(drawn, given, strict=True)):
        raise ValueError("the plan was drawn from other strategy ids or seeds than this call's: "
                         "pass the ones it was drawn from, or draw it again with "
                         "aug.plan(strategy, seeds, size)")


def check_strategy_ids(strategy: Tensor, strategies: Sequence[str]) -> None:
    """Ids index `strategies`: others would draw no op at all (a host read of the tensor)."""
    n = len(strategies)
    if strategy.numel():
        low, high = int(strategy.min()), int(strategy.max())
        if low < 0 or high >= n:
            raise ValueError(f"strategy ids must be in 0..{n - 1} (indices into "
                             f"{list(strategies)}), got {low}..{high}")
