"""Grouped mode's bookkeeping, and the same worked out on the host for a GPU.

Grouped mode runs each op family only on the images that drew it: per slot it sorts the images by
family and slices the sorted run of each family, which needs the group sizes as host ints. On the
CPU reading them is free; on a GPU it would synchronise at every batch, so a GPU without a plan
runs full mode, every family on all the views that may draw it (3.8x the bytes of the planned
grouped mode for the full MASSRL view set at 224 px; benchmarks/full_mode_traffic.py).
`plan_batch` instead samples each view's program on the host, from the seeds the workers drew,
while the batch is still there (the training loop's `on_before_batch_transfer`), and sorts it:
the plan travels to the device with the batch, and the engine runs grouped mode there with the
sizes already known.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .families import FamilyFn
from .policies import Op, Program, can_copy_async

if TYPE_CHECKING:
    from .engine import BatchedAugmenter


@dataclass
class Grouping:
    """Each slot's images sorted by op family: `order` [K, n] (slot k's image indices, family by
    family), the parameters in that order (op, mag [n, K], aux [n, K, 2]) and `sizes` [K][F + 1],
    host ints, the number of images of each family (the last: the identity)."""

    order: Tensor
    op: Tensor
    mag: Tensor
    aux: Tensor
    sizes: list[list[int]]

    def map(self, fn: Callable[[Tensor], Tensor]) -> Grouping:
        """fn applied to every tensor (the sizes stay host ints)."""
        return Grouping(*(fn(t) for t in (self.order, self.op, self.mag, self.aux)), self.sizes)


@dataclass
class Plan:
    """A batch's programs, drawn on the host from its views' seeds for views of `size` px, and
    their grouping. It is valid only for the strategy ids and seeds it was drawn from (kept in
    `drawn_from`, so that a call on the CPU can check them)."""

    prog: Program
    grouping: Grouping
    size: int
    drawn_from: tuple[Tensor, Tensor]  # (strategy, seeds), [B, V] each

    def map(self, fn: Callable[[Tensor], Tensor]) -> Plan:
        """fn applied to every tensor of the programs, the grouping and `drawn_from`."""
        strategy, seeds = self.drawn_from
        return Plan(self.prog.map(fn), self.grouping.map(fn), self.size, (fn(strategy), fn(seeds)))

    def to(self, device: torch.device) -> Plan:
        """The plan on `device`, copied without waiting (the group sizes stay host ints). The
        training loop's transfer does this itself; a loop of one's own calls it."""
        return self.map(lambda t: t.to(device, non_blocking=can_copy_async(device)))


def family_lut(families: Sequence[tuple[set[int], FamilyFn]]) -> Tensor:
    """Op id -> index of its family (len(families) for the identity)."""
    lut = torch.full((max(int(o) for o in Op) + 1,), len(families), dtype=torch.long)
    for f, (members, _) in enumerate(families):
        lut[sorted(members)] = f
    return lut


def group_by_family(prog: Program, lut: Tensor, num_families: int) -> Grouping:
    """One stable sort of the images by family per slot, for every slot together, and one read
    of all group sizes: on the host, where that read is free. `lut`: family_lut's, on the
    program's device."""
    family = lut[prog.op]  # [n, K]
    slots = family.shape[1]
    groups = num_families + 1  # and the identity
    order = torch.argsort(family, dim=0, stable=True)  # [n, K]
    slot_base = torch.arange(slots, device=family.device) * groups
    sizes = torch.bincount((family + slot_base).view(-1), minlength=slots * groups)
    op, mag = prog.op.gather(0, order), prog.mag.gather(0, order)
    aux = prog.aux.gather(0, order[..., None].expand(-1, -1, prog.aux.shape[-1]))
    return Grouping(order.t().contiguous(), op, mag, aux, sizes.view(slots, groups).tolist())


def consecutive_runs(images: list[int]) -> list[tuple[int, int, int]]:
    """(position in `images`, first image, length) of each run of consecutive image indices."""
    out: list[tuple[int, int, int]] = []
    for j, i in enumerate(images):
        if out and out[-1][1] + out[-1][2] == i:
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + 1)
        else:
            out.append((j, i, 1))
    return out


def count_strategies(batch: dict, augmenter: BatchedAugmenter) -> dict:
    """Add batch["strategy_counts"]: how many views of each strategy the batch holds, a list of
    ints, read while the batch is still on the host (`on_before_batch_transfer`), where reading
    is free. It travels to the device unchanged and lets the engine's full mode run each
    strategy's views apart in random view mode (`BatchedAugmenter.__call__`)."""
    if not _crops_on_host(batch):
        return batch
    out = dict(batch)
    num = len(augmenter.cfg.strategies)
    out["strategy_counts"] = torch.bincount(batch["strategy"].flatten(), minlength=num).tolist()
    return out


def plan_batch(batch: dict, augmenter: BatchedAugmenter, device: torch.device | str) -> dict:
    """Before the transfer to `device`: the strategy counts and, for a device other than the CPU
    (whose grouped mode plans for itself, for free), batch["plan"], the views' programs and
    their grouping (pinned, so that the transfer does not wait for the device). With
    augment.compile the device draws the programs itself: no plan."""
    batch = count_strategies(batch, augmenter)
    if (torch.device(device).type == "cpu" or augmenter.cfg.compile
            or not _crops_on_host(batch) or "seed" not in batch):
        return batch
    size = batch["views"][0].shape[-1]
    plan = augmenter.plan(batch["strategy"], batch["seed"], size)
    if torch.cuda.is_available():
        plan = plan.map(Tensor.pin_memory)
    return {**batch, "plan": plan}


def _crops_on_host(batch: dict) -> bool:
    views = batch.get("views") if isinstance(batch, dict) else None
    return bool(views) and views[0].dtype == torch.uint8 and batch["strategy"].device.type == "cpu"
