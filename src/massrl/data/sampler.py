"""A training sampler that makes runs exactly resumable and independent of the worker count.

- The shuffle of epoch e is a permutation seeded by (seed, e): the same on every rank and after a
  restart, without storing any generator state.
- It shards the epoch across ranks like torch's DistributedSampler (it is one, so Lightning keeps
  it instead of injecting its own).
- It yields `(index, sample_seed)`: the dataset seeds the augmentation of that image with
  sample_seed = f(seed, epoch, index), so the views of an image depend on neither the number of
  DataLoader workers nor on where a run was interrupted.
- `state_dict()` / `load_state_dict()` record the epoch and how many batches of it were consumed; a
  resumed run skips exactly those.
"""

from __future__ import annotations

import atexit
import weakref
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, DistributedSampler

# the iterators of ResumableLoaders with workers that may still be running
_LIVE: weakref.WeakSet = weakref.WeakSet()


@atexit.register  # (after multiprocessing's, so it runs before it)
def _end_workers() -> None:
    """A pre-training loader's workers ignore SIGTERM (run_worker_init_fn), which is how
    multiprocessing ends the workers left at interpreter exit: a script that left an iterator
    alive (an exception in its loop, one batch taken) waited for them forever. Each live
    iterator ends its workers as it does when it closes."""
    for it in list(_LIVE):
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed per (run seed, epoch, image) (splitmix64-style mixing)."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 31
    x = (x * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 29)) & 0x7FFFFFFFFFFFFFFF


def seed_torch(seed: int, device: torch.device | str = "cpu") -> None:
    """Seed torch's CPU generator, and `device`'s when it is a GPU (that one only: host-side,
    no synchronisation). Not torch.manual_seed: it seeds every accelerator type torch knows of,
    each through a lazy call that formats a stack trace, ~0.5 ms; once per image that was 8-10 %
    of a CPU pre-training's time."""
    torch.random.default_generator.manual_seed(seed)
    if torch.device(device).type == "cuda":
        with torch.cuda.device(device):  # (that GPU, not the current one)
            torch.cuda.manual_seed(seed)


class ResumableSampler(DistributedSampler):
    def __init__(self, size: int, seed: int, batch_size: int, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True) -> None:
        super().__init__(range(size), num_replicas=world_size, rank=rank, shuffle=shuffle,
                         seed=seed, drop_last=False)
        self.size = size
        self.batch_size = batch_size
        self.skip_batches = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:  # a new epoch starts from its first batch
            self.skip_batches = 0
        self.epoch = epoch

    def _shard(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, -1))
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        order += order[: self.total_size - len(order)]  # pad so every rank gets as many
        return order[self.rank: self.total_size: self.num_replicas]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        shard = self._shard()[self.skip_batches * self.batch_size:]
        # seeds as the loader asks for them: the epoch's whole list of (index, seed) pairs cost
        # 3 s and 161 MiB at every ImageNet epoch's start (1.28 M images)
        seed, epoch = self.seed, self.epoch  # (bound now: set_epoch may come before the end)
        return ((i, sample_seed(seed, epoch, i)) for i in shard)

    def __len__(self) -> int:
        # the whole epoch, skipped part included: Lightning counts the batches it restored as
        # already fetched, and ends the epoch at this length
        return self.num_samples

    def batches_per_epoch(self) -> int:
        return self.num_samples // self.batch_size  # the loader drops the last partial batch


class ResumableLoader(DataLoader):
    """A DataLoader whose position Lightning saves in checkpoints (the `_Stateful` protocol).

    `consumed` tells how many batches of the current epoch the training loop has used (counted
    from the epoch's start, across restarts); it comes from the trainer, because the loader itself
    runs ahead (prefetching) of what was trained on.
    """

    consumed: Callable[[], int] | None = None
    # the epoch the training loop is about to run (from the trainer)
    next_epoch: Callable[[], int] | None = None

    def __iter__(self) -> Iterator:
        # Lightning builds a resumed fit's first iterator before it sets the sampler's epoch,
        # and a loader with workers draws its indices at once: from a checkpoint saved at an
        # epoch's end (whose loader state Lightning does not restore) it replayed epoch 0
        sampler: ResumableSampler = self.sampler
        if self.next_epoch is not None and self.next_epoch() > sampler.epoch:
            sampler.set_epoch(self.next_epoch())
        it = super().__iter__()
        if self.num_workers > 0:
            _LIVE.add(it)
        return it

    def state_dict(self) -> dict[str, int]:
        sampler: ResumableSampler = self.sampler
        batches = self.consumed() if self.consumed is not None else sampler.skip_batches
        return {"epoch": sampler.epoch, "batches": batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        sampler: ResumableSampler = self.sampler
        epoch, batches = int(state["epoch"]), int(state["batches"])
        if batches >= sampler.batches_per_epoch():  # saved at the end of an epoch
            epoch, batches = epoch + 1, 0
        sampler.epoch = epoch
        sampler.skip_batches = batches
