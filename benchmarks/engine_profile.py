"""Where the batched engine's time goes: seconds per op family, per engine call.

Runs BatchedAugmenter on one collated batch of the benchmark's pictures (augment_throughput.py's
source images and view set) and times every op-family call, the gathered and dense runs around
them, and the whole call; the rest (loading, normalising, flips, sampling, bookkeeping) is the
difference. One torch thread by default, as augment_throughput.py.

    python benchmarks/engine_profile.py --size 224 --kernels numba
    python benchmarks/engine_profile.py --size 224 --kernels torch --out profile.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch.utils.data import default_collate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from augment_throughput import MEAN, STD, make_cfg, source_images  # noqa: E402

from massrl.augment.batched import BatchedAugmenter, CropOnlyTransform  # noqa: E402
from massrl.memory import retain_freed_memory  # noqa: E402


def _timed(fn, seconds: Counter, calls: Counter, images: Counter, name: str):
    def wrapper(x, *args):
        start = time.perf_counter()
        out = fn(x, *args)
        seconds[name] += time.perf_counter() - start
        calls[name] += 1
        images[name] += x.shape[0]
        return out

    wrapper.__name__ = fn.__name__  # the engine picks dense thresholds by name
    return wrapper


def profile(size: int, strategy: str, kernels: str, batch: int, rounds: int) -> dict:
    cfg = make_cfg(strategy, kernels)
    crop = CropOnlyTransform(cfg, size)
    views = default_collate([crop(img) for img in source_images(batch, size)])
    aug = BatchedAugmenter(cfg, MEAN, STD)
    seconds, calls, images = Counter(), Counter(), Counter()
    aug._families = {mode: [(members, _timed(fn, seconds, calls, images, fn.__name__))
                            for members, fn in families]
                     for mode, families in aug._families.items()}
    runs = Counter()
    for name in ("_run_gathered", "_run_dense"):  # the family calls plus their gathers
        setattr(aug, name, _timed(getattr(aug, name), seconds, runs, Counter(), name))
    aug(views["views"], views["strategy"], torch.Generator().manual_seed(0))  # warm-up
    for counter in (seconds, calls, images, runs):
        counter.clear()
    start = time.perf_counter()
    for r in range(rounds):
        aug(views["views"], views["strategy"], torch.Generator().manual_seed(r + 1))
    total = (time.perf_counter() - start) / rounds
    families = {k: v for k, v in seconds.items() if not k.startswith("_")}
    run_s = seconds["_run_gathered"] + seconds["_run_dense"]
    return {
        "size": size, "strategy": strategy, "kernels": kernels, "batch": batch,
        "rounds": rounds, "threads": torch.get_num_threads(), "engine_s": total,
        "families_s": sum(families.values()) / rounds,
        "gathers_scatters_s": (run_s - sum(families.values())) / rounds,
        "outside_families_s": total - run_s / rounds,
        "gathered_runs": runs["_run_gathered"] // rounds,
        "dense_runs": runs["_run_dense"] // rounds,
        "per_family": {k: {"s": v / rounds, "calls": calls[k] // rounds,
                           "images": images[k] // rounds, "us_per_image": 1e6 * v / images[k]}
                       for k, v in sorted(families.items(), key=lambda kv: -kv[1])},
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--strategy", default="massrl", help="massrl (the full view set) or one")
    p.add_argument("--kernels", default="auto", choices=["auto", "numba", "torch"])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    retain_freed_memory()  # as massrl pretrain and augment_throughput.py run
    r = profile(args.size, args.strategy, args.kernels, args.batch, args.rounds)
    print(f"{r['size']} px, {r['strategy']}, kernels={r['kernels']}, batch {r['batch']}: engine "
          f"{r['engine_s']:.3f} s per call ({1e3 * r['engine_s'] / r['batch']:.2f} ms/image); "
          f"families {r['families_s']:.3f}, gathers/scatters {r['gathers_scatters_s']:.3f}, "
          f"outside the families {r['outside_families_s']:.3f}; family runs on gathered images "
          f"{r['gathered_runs']}, on whole chunks {r['dense_runs']}")
    for name, f in r["per_family"].items():
        print(f"  {name:13s} {f['s']:.3f} s  {f['calls']:4d} calls  {f['images']:5d} images  "
              f"{f['us_per_image']:6.0f} us/image")
    if args.out:
        args.out.write_text(json.dumps({"command": " ".join(sys.argv), **r}, indent=1))
    return r


if __name__ == "__main__":
    main()
