"""What the engine's GPU modes (eager) ask of memory, counted on the CPU.

Runs one BatchedAugmenter call in full mode, or (--planned) in grouped mode as the host plans
it, with the torch ops (what a GPU runs), and counts every aten op it dispatches and the bytes of
the tensors each op reads and writes (views such as slices count nothing), per op family. On a
GPU the eager ops are bound by memory traffic and by their number (one kernel launch each), so
the bytes per view divided by the card's bandwidth bound the engine's images/s from above;
torch.compile (augment.compile) fuses each family's passes.

    python benchmarks/full_mode_traffic.py --size 224 [--planned]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import default_collate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from augment_throughput import MEAN, STD, make_cfg, source_images  # noqa: E402

from massrl.augment.batched import (  # noqa: E402
    BatchedAugmenter,
    CropOnlyTransform,
    plan_batch,
)

# ops that return views of their input: no memory is read or written
VIEWS = {"slice", "select", "unbind", "view", "expand", "t", "transpose", "as_strided", "narrow",
         "unsqueeze", "squeeze", "permute", "split", "split_with_sizes", "_unsafe_view", "alias",
         "detach", "reshape", "diagonal"}


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _tensors(x) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for item in x for t in _tensors(item)]
    return []


class Traffic(TorchDispatchMode):
    """Counts aten ops and the bytes of their tensor arguments and results."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        name = func.overloadpacket.__name__
        if name == "index_select":  # reads and writes the gathered rows only
            self.bytes += 2 * _nbytes(out)
        elif name in ("index_copy_", "index_copy"):  # reads and writes the rows copied in
            self.bytes += 2 * _nbytes(args[3])
        elif name not in VIEWS:
            touched = _tensors(list(args)) + _tensors(list((kwargs or {}).values()))
            self.bytes += sum(_nbytes(t) for t in touched + _tensors(out))
        return out


def measure(size: int, strategy: str, batch: int, counted: bool = True,
            planned: bool = False) -> dict:
    torch.manual_seed(0)  # the workers' draws: crops and, in random mode, the strategies
    cfg = make_cfg(strategy, "torch")
    crop = CropOnlyTransform(cfg, size)
    aug = BatchedAugmenter(cfg, MEAN, STD, grouped=False)
    # the strategy counts read on the host, as the training loop does before the transfer
    # any device but the CPU gets a plan: the meta device stands for one here
    b = plan_batch(default_collate([crop(img) for img in source_images(batch, size)]), aug,
                   torch.device("meta"))
    kwargs = {"counts": b["strategy_counts"] if counted else None,
              "plan": b["plan"] if planned else None}
    per_family: dict[str, Counter] = {}

    def spied(fn):
        def wrapper(x, *args):
            with Traffic() as t:
                y = fn(x, *args)
            c = per_family.setdefault(fn.__name__, Counter())
            c.update(calls=1, ops=t.ops, bytes=t.bytes)
            return y
        return wrapper

    aug(b["views"], b["strategy"], torch.Generator().manual_seed(0), **kwargs)  # warm-up
    aug._families[False] = [(m, spied(fn)) for m, fn in aug._families[False]]
    with Traffic() as total:
        aug(b["views"], b["strategy"], torch.Generator().manual_seed(1), **kwargs)
    views = batch * b["strategy"].shape[1]
    view_bytes = 3 * size * size * 4  # one float32 view
    return {
        "size": size, "strategy": strategy, "batch": batch, "views": views, "counted": counted,
        "planned": planned,
        "aten_ops": total.ops, "mb_per_view": total.bytes / views / 1e6,
        "passes_per_view": total.bytes / views / view_bytes,
        "per_family": {k: {"calls": c["calls"], "aten_ops": c["ops"],
                           "mb_per_view": c["bytes"] / views / 1e6}
                       for k, c in sorted(per_family.items(), key=lambda kv: -kv[1]["bytes"])},
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--strategy", default="massrl", help="massrl (the full view set), "
                   "massrl_random (2 views of random strategies) or one strategy")
    p.add_argument("--no-counts", dest="counted", action="store_false",
                   help="without the host's strategy counts (random mode then runs every "
                   "family on every view)")
    p.add_argument("--planned", action="store_true", help="the GPU's grouped mode as the host "
                   "plans it (plan.py) instead of full mode")
    p.add_argument("--batch", type=int, default=32, help="images (the counts per view depend "
                   "on it only through random mode's draws of strategies)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    r = measure(args.size, args.strategy, args.batch, args.counted, args.planned)
    how = ("grouped mode as the host planned it" if r["planned"] else
           f"full mode {'with' if r['counted'] else 'without'} the host's strategy counts")
    print(f"{r['size']} px, {r['strategy']}, {how}, torch ops: {r['aten_ops']} aten ops per "
          f"call, {r['mb_per_view']:.1f} MB read + written per view ({r['passes_per_view']:.0f}x "
          f"a float32 view)")
    for name, f in r["per_family"].items():
        print(f"  {name:13s} {f['calls']:3d} calls {f['aten_ops']:5d} aten ops "
              f"{f['mb_per_view']:7.1f} MB/view")
    if args.out:
        args.out.write_text(json.dumps({"command": " ".join(sys.argv), **r}, indent=1))
    return r


if __name__ == "__main__":
    main()
