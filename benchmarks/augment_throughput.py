"""Augmentation throughput: per-image backend vs batched backend, images per second.

per_image: massrl.augment.MultiViewTransform on each PIL image (crop, strategies, flip, to float,
           normalise), as DataLoader workers run it.
batched:   CropOnlyTransform on each PIL image (crop + resize to uint8, the worker's share),
           collate, then BatchedAugmenter on the batch. Both halves are timed, so the two
           backends do the same work from the same PIL images on the same cores.

Both run in this process with torch.set_num_threads(--threads) (default 1: images/s per core).
On a GPU (--device cuda) only the engine is timed, on uint8 views already on the device.

    python benchmarks/augment_throughput.py --quick --out results.json
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from pathlib import Path
from statistics import median

import torch
from lightning.pytorch.utilities import move_data_to_device
from PIL import Image

try:
    import resource
except ImportError:  # not on Windows
    resource = None
from torch.utils.data import default_collate

from massrl.augment import MultiViewTransform
from massrl.augment.batched import BatchedAugmenter, CropOnlyTransform, plan_batch
from massrl.config import AugmentConfig
from massrl.memory import retain_freed_memory

MASSRL = ["simclr", "randaugment", "autoaugment", "fastautoaugment"]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def source_images(n: int, size: int, seed: int = 0) -> list[Image.Image]:
    """Textured colour pictures a little larger than the crop (as datasets are)."""
    g = torch.Generator().manual_seed(seed)
    side = int(size * 1.15) + 1
    yy, xx = torch.meshgrid(torch.linspace(0, 1, side), torch.linspace(0, 1, side), indexing="ij")
    out = []
    for _ in range(n):
        phase = torch.rand(3, 1, 1, generator=g)
        base = torch.stack([xx, yy, 1 - xx]) * 0.6 + phase * 0.3
        img = base * 200 + torch.rand(3, side, side, generator=g) * 55
        out.append(Image.fromarray(img.clamp(0, 255).byte().permute(1, 2, 0).numpy()))
    return out


def make_cfg(strategy: str, cpu_kernels: str = "auto") -> AugmentConfig:
    if strategy == "massrl":  # the full view set: 2 crops x 4 strategies = 8 views
        return AugmentConfig(strategies=MASSRL, view_mode="crops_x_strategies", num_crops=2,
                             cpu_kernels=cpu_kernels)
    if strategy == "massrl_random":  # the shipped massrl configs: 2 views, a strategy each
        return AugmentConfig(strategies=MASSRL, view_mode="random", num_views=2,
                             cpu_kernels=cpu_kernels)
    return AugmentConfig(strategies=[strategy], view_mode="random", num_views=2,
                         cpu_kernels=cpu_kernels)


def _faults() -> int:
    """Minor page faults of this process so far (0 where the resource module is missing)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource else 0


def time_per_image(cfg: AugmentConfig, images: list[Image.Image], size: int) -> tuple[float, int]:
    """(seconds, minor page faults) for len(images) images."""
    tf = MultiViewTransform(cfg, size, MEAN, STD)
    tf(images[0])  # warm-up
    gc.collect()  # (see time_batched)
    faults, start = _faults(), time.perf_counter()
    default_collate([tf(img) for img in images])
    return time.perf_counter() - start, _faults() - faults


def time_batched(cfg: AugmentConfig, images: list[Image.Image], size: int, batch: int,
                 device: str) -> tuple[float, float, int]:
    """(crop seconds, engine seconds, minor page faults) for len(images) images in batches of
    `batch`. As in training: the crops and, on the host, the batch's plan (plan_batch; on the
    CPU only the strategy counts) are the first share, the engine the second."""
    crop_tf, aug = CropOnlyTransform(cfg, size), BatchedAugmenter(cfg, MEAN, STD)

    def on_device(host: dict) -> dict:
        b = move_data_to_device(host, torch.device(device))
        _sync(device)
        return b

    def engine(b: dict) -> None:
        aug(b["views"], b["strategy"], None, b["seed"], b["strategy_counts"], b.get("plan"))

    def crops(part: list[Image.Image]) -> dict:
        return plan_batch(default_collate([crop_tf(img) for img in part]), aug, device)

    engine(on_device(crops(images[:batch])))  # warm-up
    # a full garbage collection costs ~0.2 s in this process (torch, numba): one falling into a
    # timed region made the first 32 px timing 8x too slow
    gc.collect()
    crop_s = engine_s = 0.0
    faults = _faults()
    for a in range(0, len(images), batch):
        t0 = time.perf_counter()
        host = crops(images[a : a + batch])
        t1 = time.perf_counter()
        b = on_device(host)  # (the transfer is not timed)
        t2 = time.perf_counter()
        engine(b)
        _sync(device)
        crop_s, engine_s = crop_s + t1 - t0, engine_s + time.perf_counter() - t2
    return crop_s, engine_s, _faults() - faults


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run(args: argparse.Namespace) -> list[dict]:
    before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(before)


def _run(args: argparse.Namespace) -> list[dict]:
    rows = []
    for size in args.sizes:
        for strategy in args.strategies:
            if args.quick and strategy != "massrl" and size != min(args.sizes):
                continue  # quick: single strategies only at the smallest size
            cfg = make_cfg(strategy, args.cpu_kernels)
            n_pi = args.per_image_images or args.batch
            images = source_images(max(n_pi, args.batch), size)
            row = {"strategy": strategy, "size": size, "batch": args.batch,
                   "threads": args.threads, "views_per_image": _views(cfg)}
            # alternating repeats: one process's memory state moves single timings by up to 2x
            pi, bt, share, pi_faults, bt_faults = [], [], [], [], []
            for _ in range(args.repeats):
                seconds, faults = time_per_image(cfg, images[:n_pi], size)
                pi.append(n_pi / seconds)
                pi_faults.append(faults / n_pi)
                crop_s, eng_s, faults = time_batched(cfg, images[: args.batch], size, args.batch,
                                                     "cpu")
                bt.append(args.batch / (crop_s + eng_s))
                share.append(crop_s / (crop_s + eng_s))
                bt_faults.append(faults / args.batch)
            row["per_image_img_s"], row["batched_img_s"] = median(pi), median(bt)
            row["batched_crop_share"] = median(share)
            row["ratio"] = row["batched_img_s"] / row["per_image_img_s"]
            row["per_image_runs"], row["batched_runs"] = pi, bt
            row["pair_ratios"] = [b / a for a, b in zip(pi, bt, strict=True)]
            # first-touch page faults per source image: their cost varies several-fold between
            # runs on a VM, and the per-image side allocates ~2 fresh float copies of its views
            row["per_image_faults_per_img"] = median(pi_faults)
            row["batched_faults_per_img"] = median(bt_faults)
            if args.cuda:
                _, gpu_s, _ = time_batched(cfg, images[: args.batch], size, args.batch, "cuda")
                row["gpu_engine_img_s"] = args.batch / gpu_s
            rows.append(row)
            print(_fmt(row), flush=True)
    return rows


def _views(cfg: AugmentConfig) -> int:
    return cfg.num_crops * len(cfg.strategies) if cfg.view_mode == "crops_x_strategies" else 2


HEADER = (f"{'strategy':<16}{'px':>5}{'views':>6}{'per-image img/s':>17}{'batched img/s':>15}"
          f"{'ratio':>7}  {'pair ratios':<30}{'crop share':>10}{'faults/img pi|bt':>17}"
          f"{'GPU engine img/s':>18}")


def _fmt(r: dict) -> str:
    gpu = f"{r['gpu_engine_img_s']:>18.0f}" if "gpu_engine_img_s" in r else f"{'-':>18}"
    return (f"{r['strategy']:<16}{r['size']:>5}{r['views_per_image']:>6}"
            f"{r['per_image_img_s']:>17.1f}{r['batched_img_s']:>15.1f}{r['ratio']:>7.2f}"
            f"  {' '.join(f'{x:.2f}' for x in r['pair_ratios']):<30}"
            f"{r['batched_crop_share']:>10.0%}"
            f"{r['per_image_faults_per_img']:>10.0f} |{r['batched_faults_per_img']:>5.0f}{gpu}")


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="< 1 minute: fewer images, batch 64")
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 96, 224])
    p.add_argument("--strategies", nargs="+", default=[*MASSRL, "trivialaugment", "massrl"])
    p.add_argument("--batch", type=int, default=None, help="default 256 (64 with --quick)")
    p.add_argument("--per-image-images", type=int, default=None,
                   help="images timed for the per-image backend (default: one batch)")
    p.add_argument("--threads", type=int, default=1, help="CPU cores given to each backend")
    p.add_argument("--repeats", type=int, default=None,
                   help="alternating per-image / batched timings per row, medians reported "
                        "(default 3; quick 1)")
    p.add_argument("--cuda", action="store_true", help="also time the engine on the GPU")
    p.add_argument("--cpu-kernels", default="auto", choices=["auto", "numba", "torch"],
                   help="the batched engine's CPU ops (augment.cpu_kernels)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    p.add_argument("--no-retain-freed-memory", dest="retain", action="store_false",
                   help="leave glibc's malloc as it is (training sets trainer.retain_freed_memory)")
    args = p.parse_args(argv)
    if args.retain:  # as `massrl pretrain` runs, both backends in this process
        retain_freed_memory()
    args.batch = args.batch or (64 if args.quick else 256)
    args.repeats = args.repeats or (1 if args.quick else 3)
    if args.quick and args.per_image_images is None:
        args.per_image_images = 32
    if args.cuda and not torch.cuda.is_available():
        p.error("--cuda given but no CUDA device is available")
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"threads={args.threads}, batch={args.batch}")
    print(HEADER)
    rows = run(args)
    if args.out:
        meta = {"torch": torch.__version__, "threads": args.threads, "batch": args.batch,
                "repeats": args.repeats, "command": "python benchmarks/augment_throughput.py "
                + " ".join(argv if argv is not None else sys.argv[1:]),
                "quick": args.quick, "cuda": torch.cuda.get_device_name() if args.cuda else None,
                "retain_freed_memory": args.retain, "cpu_kernels": args.cpu_kernels}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
