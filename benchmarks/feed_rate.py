"""Can the batched engine feed a training step? Images/s of each, on the same device.

engine:  BatchedAugmenter on uint8 224 px crops already on the device (the workers' share,
         decode + crop, is not timed), for the full MASSRL view set (4 strategies x 2 crops =
         8 views per image), for the shipped massrl configs' 2 views of random strategies
         (massrl_random) and for BYOL's 2 SimCLR views.
step:    one BYOL training step of massrl's own method (the packaged imagenet/byol config:
         ResNet-50, 2 views, LARS), forward + backward + optimizer + EMA update, under bf16
         autocast and channels_last, on already augmented float views.

The engine keeps up when its images/s exceed the step's. Meant for a GPU:

    python benchmarks/feed_rate.py --compile --out benchmarks/results/feed_rate_gpu.json

Engine modes: "default", what training runs on the device (grouped mode on the CPU; on a GPU,
grouped mode as the host planned it, plan.py), and "full" (every op family on all the views of
the strategies that can draw it); with --compile also "compiled", full mode through torch.compile
(augment.compile), whose first call compiles.

and runs anywhere with smaller settings (--device cpu --size 32 --batch 8 --backbone resnet18).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from statistics import median

import torch
from lightning.pytorch.utilities import move_data_to_device

sys.path.insert(0, str(Path(__file__).resolve().parent))
from augment_throughput import MEAN, STD, make_cfg, source_images  # noqa: E402

from massrl.augment.batched import BatchedAugmenter, CropOnlyTransform, plan_batch  # noqa: E402
from massrl.config import build_config, resolve_config_path  # noqa: E402
from massrl.methods import build_method  # noqa: E402
from massrl.optim import build_optimizer  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device: torch.device, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


# engine modes: "default" is what training runs on the device (grouped mode on the CPU; on a
# GPU the grouped mode the host planned), "full" every family on all views of the strategies
# that can draw it, "compiled" that through torch.compile (augment.compile)
MODES = ("default", "full")


def engine_rate(strategy: str, size: int, batch: int, device: torch.device,
                repeats: int, mode: str = "default", profile: Path | None = None) -> dict:
    """Images/s of the engine for one view set, on crops already on the device, in `mode`;
    with `profile`, one more call under torch.profiler, its table of ops written there."""
    cfg = make_cfg(strategy).model_copy(update={"compile": mode == "compiled"})
    if mode == "compiled":
        torch._dynamo.reset()  # each view set's graphs from scratch, within dynamo's cache limit
    crop = CropOnlyTransform(cfg, size)
    items = [crop(img) for img in source_images(batch, size)]
    aug = BatchedAugmenter(cfg, MEAN, STD, grouped=None if mode == "default" else False)
    # what the training loop does on the host before the transfer: the strategy counts and,
    # for the default mode off the CPU, the plan (its host time is reported apart: it overlaps
    # the device's work in training)
    collate = torch.utils.data.default_collate(items)
    plan_for = device if mode == "default" else torch.device("cpu")
    plan_s = [_host_seconds(lambda: plan_batch(collate, aug, plan_for)) for _ in range(3)]
    host = plan_batch(collate, aug, plan_for)
    b = move_data_to_device(host, device)

    def call() -> None:
        aug(b["views"], b["strategy"], None, b["seed"], b["strategy_counts"], b.get("plan"))

    start = time.perf_counter()
    call()
    _sync(device)
    first = time.perf_counter() - start
    times = _timed(call, device, 2, repeats)
    if profile is not None:
        try:
            _profile(call, device, profile)
        except Exception as exc:  # the timings above still count
            profile.write_text(f"profiling failed: {exc!r}\n")
    return {"view_set": strategy, "mode": mode, "planned": "plan" in b,
            "views_per_image": b["strategy"].shape[1], "img_s": batch / median(times),
            "runs_s": times, "first_call_s": first, "host_plan_s": median(plan_s)}


def _profile(fn, device: torch.device, out: Path) -> None:
    """Where one call's time goes, op by op (the kernels' own time on a GPU)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        fn()
        _sync(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(prof.key_averages().table(sort_by=key, row_limit=40))


def _host_seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def step_rate(backbone: str, size: int, batch: int, device: torch.device, repeats: int) -> dict:
    """Images/s of a BYOL training step (2 views per image)."""
    cfg = build_config(config_file=resolve_config_path("imagenet/byol"), overrides=[
        f"model.backbone={backbone}", f"data.image_size={size}", f"data.batch_size={batch}",
        "eval.probe=false"])
    method = build_method(cfg).to(device).to(memory_format=torch.channels_last)
    params = [(n, p) for n, p in method.named_parameters() if p.requires_grad]
    opt = build_optimizer(cfg.optimizer, params, cfg.optimizer.lr)
    g = torch.Generator(device).manual_seed(0)
    views = [torch.randn(batch, 3, size, size, device=device, generator=g)
             .contiguous(memory_format=torch.channels_last) for _ in range(2)]
    sid = torch.zeros(batch, 2, dtype=torch.long, device=device)
    crop = torch.arange(2, device=device).expand(batch, 2)
    data = {"views": views, "strategy": sid, "crop": crop}

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = method.ssl_step(data)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        method.ema_update(cfg.loss.tau_base)

    method.train()
    times = _timed(step, device, 3, repeats)
    return {"backbone": backbone, "views_per_image": 2, "img_s": batch / median(times),
            "runs_s": times}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--repeats", type=int, default=10, help="timed calls each (medians)")
    p.add_argument("--compile", action="store_true",
                   help="also time the engine through torch.compile (augment.compile)")
    p.add_argument("--profile", type=Path, default=None,
                   help="write the op table of one profiled default-mode call (full view set)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__}, {name}, {args.size} px, batch {args.batch}", flush=True)
    result = {"meta": {"torch": torch.__version__, "device": name, "size": args.size,
                       "batch": args.batch, "repeats": args.repeats, "command":
                       "python benchmarks/feed_rate.py " + " ".join(argv or sys.argv[1:])},
              "engine": []}
    # the step first and the JSON rewritten after each row: a compile that fails or runs past
    # a time limit leaves every figure measured before it
    step = result["step"] = step_rate(args.backbone, args.size, args.batch, device, args.repeats)
    print(f"BYOL step {args.backbone}, 2 views/image: {step['img_s']:9.1f} img/s", flush=True)
    _write(result, args.out)
    rows = [(v, m) for m in MODES for v in ("massrl", "massrl_random", "simclr")]
    rows += [(v, "compiled") for v in ("massrl", "massrl_random", "simclr") if args.compile]
    for view_set, mode in rows:
        try:
            profile = args.profile if (view_set, mode) == ("massrl", "default") else None
            e = engine_rate(view_set, args.size, args.batch, device, args.repeats, mode, profile)
        except Exception as exc:  # recorded: the rows before it still count
            e = {"view_set": view_set, "mode": mode, "error": repr(exc)}
            print(f"engine {view_set} ({mode}) failed: {exc!r}", flush=True)
        else:
            e["vs_step"] = e["img_s"] / step["img_s"]
            extra = f", first call {e['first_call_s']:.1f} s" if mode == "compiled" else ""
            if e["planned"]:
                extra += f", host plan {1e3 * e['host_plan_s']:.1f} ms"
            print(f"engine {view_set:<13} {mode:<8} {e['views_per_image']} views/image: "
                  f"{e['img_s']:9.1f} img/s = {e['vs_step']:5.2f}x the step{extra}", flush=True)
        result["engine"].append(e)
        _write(result, args.out)
    return result


def _write(result: dict, out: Path | None) -> None:
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))

if __name__ == "__main__":
    main()
