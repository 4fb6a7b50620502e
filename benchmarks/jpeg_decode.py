"""What reduced JPEG decoding (massrl.data.images.decode_at_least) gains on a folder of photos.

For JPEGs of a phone camera (4000x3000) and of ImageNet's typical size (500x375), times one
training item (decode + the per-image MASSRL views, or the batched backend's decode + crops) and
one evaluation item (decode + EvalTransform), with the file decoded at full size and decoded down
to the transform's `source_side`, in one process with one torch thread:

    python benchmarks/jpeg_decode.py --out benchmarks/results/jpeg_decode.json

The photos are synthetic (smooth colour fields with grain, saved at quality 90); a JPEG's decode
time depends on its pixel count and quality far more than on its content.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from statistics import median

import numpy as np
import torch
from PIL import Image

from massrl.augment import MultiViewTransform
from massrl.augment.batched import CropOnlyTransform
from massrl.config import AugmentConfig
from massrl.data.eval_transform import EvalTransform
from massrl.data.images import decode_at_least, load_image

PHOTOS = ["4000x3000", "500x375"]  # a phone camera's, ImageNet's typical
MASSRL = AugmentConfig(strategies=["simclr", "randaugment", "autoaugment", "fastautoaugment"],
                       view_mode="random", num_views=2)


def make_photo(path: Path, size: tuple[int, int], seed: int) -> Path:
    rng = np.random.default_rng(seed)
    w, h = size
    field = Image.fromarray(rng.integers(0, 256, (max(2, h // 64), max(2, w // 64), 3), np.uint8))
    smooth = np.asarray(field.resize(size, Image.Resampling.BICUBIC), dtype=np.int16)
    grain = rng.integers(-12, 13, smooth.shape, dtype=np.int16)
    Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8)).save(path, quality=90)
    return path


def items_per_s(files: list[Path], transform: Callable, side: int | None, seconds: float) -> float:
    """Items per second of decode + transform over the files, median of 3 timed rounds."""
    rates = []
    for _ in range(3):
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 3:
            with decode_at_least(side):
                transform(load_image(files[n % len(files)]))
            n += 1
        rates.append(n / (time.perf_counter() - start))
    return median(rates)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--photos", nargs="+", default=PHOTOS, help="photo sizes, WxH")
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 96, 224])
    ap.add_argument("--seconds", type=float, default=6.0, help="per measurement")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.photos:
            size = tuple(int(v) for v in name.split("x"))
            files = [make_photo(Path(tmp) / f"{name}_{i}.jpg", size, i) for i in range(4)]
            for s in args.sizes:
                pipelines = {
                    "per_image massrl (2 views)": MultiViewTransform(MASSRL, s, (0.5,), (0.5,)),
                    "batched crops (2 views)": CropOnlyTransform(MASSRL, s),
                    "eval": EvalTransform(s, (0.5,), (0.5,)),
                }
                for label, transform in pipelines.items():
                    side = transform.source_side
                    full = items_per_s(files, transform, None, args.seconds)
                    reduced = items_per_s(files, transform, side, args.seconds)
                    with decode_at_least(side):
                        decoded = load_image(files[0]).size
                    rows.append({"photo": name, "size": s, "pipeline": label,
                                 "source_side": side, "decoded": list(decoded),
                                 "full_items_per_s": round(full, 1),
                                 "reduced_items_per_s": round(reduced, 1),
                                 "speedup": round(reduced / full, 2)})
                    r = rows[-1]
                    print(f"{name:9} {s:4d} {label:27} side {side:4d} -> {decoded[0]}x"
                          f"{decoded[1]}: {full:7.1f} -> {reduced:7.1f} items/s "
                          f"(x{r['speedup']})", flush=True)
    result = {"threads": 1, "seconds": args.seconds, "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
