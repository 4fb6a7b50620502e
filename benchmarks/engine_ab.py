"""In-process A/B timing of the batched engine against its code at another git revision.

Separate processes on a VM differ by ±8 % or more (memory placement, page-fault costs), which
hides the few-percent effects of engine changes. This loads `engine.py` and `ops.py` of REV
beside the working tree's, runs both engines on the same batch in alternating order, one round
after another, and reports the median times and the per-round ratios. The rest of the package
(policies, draws, buffers, the crops) is the working tree's for both, so REV must take today's
batch format (commits from e27130f on, which hand over shared crops).

    python benchmarks/engine_ab.py --against HEAD~1 --size 224 --rounds 10

`--pipeline` times the whole batched backend instead (REV's and the working tree's
`transform.py` crops, the collate and the engine) and, in the same rounds, the per-image backend,
so that the ratio batched / per-image of both revisions is measured under the same conditions.

Measured: against b3bd397 (which had the output pool and the where-free solarize), 224 px,
6 rounds: the working tree's engine takes 0.917x the time (rounds 0.83-0.95).
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import torch
from torch.utils.data import default_collate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from augment_throughput import MEAN, STD, make_cfg, source_images, time_per_image  # noqa: E402

from massrl.augment.batched import CropOnlyTransform  # noqa: E402
from massrl.augment.batched import engine as current  # noqa: E402
from massrl.augment.batched import transform as current_transform  # noqa: E402
from massrl.memory import retain_freed_memory  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "massrl.augment.batched"


def load_revision(rev: str, workdir: Path, transform: bool = False):
    """REV's engine module, wired to REV's ops module (both loaded under new names); with
    `transform`, (engine, REV's transform module)."""
    modules = {}
    for name in ("ops", "engine", "transform")[: 3 if transform else 2]:
        source = subprocess.run(["git", "show", f"{rev}:src/massrl/augment/batched/{name}.py"],
                                cwd=ROOT, capture_output=True, text=True, check=True).stdout
        path = workdir / f"{name}_ab.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location(f"{PACKAGE}.{name}_ab", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        modules[name] = module
    modules["engine"].ops = modules["ops"]
    return (modules["engine"], modules["transform"]) if transform else modules["engine"]


def _call(aug, batch: dict, seed: int) -> list:
    """Per-view seeds where the engine takes them; a seeded generator for older engines."""
    if "seeds" in inspect.signature(aug.__call__).parameters:
        return aug(batch["views"], batch["strategy"], seeds=batch["seed"] + seed)
    return aug(batch["views"], batch["strategy"], torch.Generator().manual_seed(seed))


def run_pipeline(args: argparse.Namespace) -> dict:
    """Per round: the per-image backend, then each revision's crops + collate + engine."""
    torch.set_num_threads(args.threads)
    retain_freed_memory()
    cfg = make_cfg(args.strategy)
    images = source_images(args.batch, args.size)
    with tempfile.TemporaryDirectory() as tmp:
        engine, transform = load_revision(args.against, Path(tmp), transform=True)
        sides = {"old": (transform.CropOnlyTransform(cfg, args.size),
                         engine.BatchedAugmenter(cfg, MEAN, STD)),
                 "new": (current_transform.CropOnlyTransform(cfg, args.size),
                         current.BatchedAugmenter(cfg, MEAN, STD))}

        def batched(name: str, seed: int) -> float:
            crop, aug = sides[name]
            start = time.perf_counter()
            out = _call(aug, default_collate([crop(img) for img in images]), seed)
            seconds = time.perf_counter() - start
            del out
            return args.batch / seconds

        rates: dict[str, list[float]] = {"per_image": [], "old": [], "new": []}
        for name in ("old", "new"):  # warm-up
            batched(name, 0)
        for r in range(args.rounds):
            for name in ("per_image", "old", "new") if r % 2 == 0 else ("new", "old", "per_image"):
                if name == "per_image":
                    rates[name].append(args.batch / time_per_image(cfg, images, args.size)[0])
                else:
                    rates[name].append(batched(name, r))
    img_s = {name: median(v) for name, v in rates.items()}
    result = {"against": args.against, "size": args.size, "strategy": args.strategy,
              "img_s": img_s, "runs": rates,
              "ratio_old": img_s["old"] / img_s["per_image"],
              "ratio_new": img_s["new"] / img_s["per_image"],
              "new_over_old": median([n / o for o, n in zip(rates["old"], rates["new"],
                                                            strict=True)])}
    print(f"{args.size} px {args.strategy}, images/s (medians of {args.rounds} rounds): per-image "
          f"{img_s['per_image']:.1f}, batched {args.against} {img_s['old']:.1f} "
          f"({result['ratio_old']:.2f}x), working tree {img_s['new']:.1f} "
          f"({result['ratio_new']:.2f}x); working tree / {args.against} per round "
          f"{result['new_over_old']:.3f}")
    return result


def run(args: argparse.Namespace) -> dict:
    if args.pipeline:
        return run_pipeline(args)
    torch.set_num_threads(args.threads)
    retain_freed_memory()  # as training runs
    cfg = make_cfg(args.strategy)
    crop = CropOnlyTransform(cfg, args.size)
    batch = default_collate([crop(img) for img in source_images(args.batch, args.size)])
    with tempfile.TemporaryDirectory() as tmp:
        old = load_revision(args.against, Path(tmp))
        engines = {"old": old.BatchedAugmenter(cfg, MEAN, STD),
                   "new": current.BatchedAugmenter(cfg, MEAN, STD)}
        times: dict[str, list[float]] = {"old": [], "new": []}
        for name in engines:  # warm-up
            _call(engines[name], batch, 0)
        for r in range(args.rounds):
            for name in ("old", "new") if r % 2 == 0 else ("new", "old"):
                start = time.perf_counter()
                out = _call(engines[name], batch, r)
                times[name].append(time.perf_counter() - start)
                del out
    ratios = [n / o for o, n in zip(times["old"], times["new"], strict=True)]
    result = {"against": args.against, "size": args.size, "strategy": args.strategy,
              "old_s": median(times["old"]), "new_s": median(times["new"]),
              "new_over_old": median(times["new"]) / median(times["old"]), "round_ratios": ratios}
    print(f"{args.size} px {args.strategy}: {args.against} {result['old_s']:.4f} s, working tree "
          f"{result['new_s']:.4f} s, time ratio {result['new_over_old']:.3f} "
          f"(rounds {min(ratios):.3f}-{max(ratios):.3f})")
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--against", default="HEAD", help="git revision to compare with")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--strategy", default="massrl", help="a strategy, or massrl (8 views)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--pipeline", action="store_true",
                   help="time crops + collate + engine, and the per-image backend")
    p.add_argument("--out", type=Path, default=None, help="write the result as JSON")
    args = p.parse_args(argv)
    result = run(args)
    if args.out:
        args.out.write_text(json.dumps({"command": "python benchmarks/engine_ab.py "
                                        + " ".join(argv if argv is not None else sys.argv[1:]),
                                        **result}, indent=1))
    return result


if __name__ == "__main__":
    main()
