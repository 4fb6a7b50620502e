"""Pre-training throughput: images/s and peak memory of `massrl pretrain` on this machine.

Measured, each in its own subprocess (so peak memory is the run's own):

- byol, simclr and massrl in each view mode, per augmentation backend (per_image; batched when
  pre-training uses it at this commit),
- the speed levers on/off on BYOL: bf16 autocast (trainer.precision), channels_last, torch.compile,
  DataLoader workers 0/1/2, persistent workers, pinned memory,
- the same BYOL training written with the `lightly` package (same timm backbone, batch, views,
  LARS, bf16, Fashion-MNIST images), alternating runs with massrl so the ratio is measured under
  the same machine load. lightly is installed for the benchmark only, e.g.
  `pip install --no-deps --target /tmp/lightly_pkgs lightly` and `--lightly-path /tmp/lightly_pkgs`
  (its heads, loss, transforms, LARS and momentum helpers import without its other dependencies).

images/s is the last epoch's (the first one pays for worker start-up and compilation); each
measurement runs `--epochs` epochs of `--batches` batches. Peak memory is the maximum resident set
size of the training process (resource.getrusage), and separately of its largest child (a
DataLoader worker). Monitors are off (eval.knn_every=0, eval.probe=false): pure pre-training.

    python benchmarks/train_throughput.py --quick
"""

from __future__ import annotations

import argparse
import csv
import inspect
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark scripts
from quality import fmt, replace_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
METHODS: dict[str, tuple[str, list[str]]] = {
    "byol": ("fashion_mnist/byol", []),
    "simclr": ("fashion_mnist/simclr", []),
    "massrl_random": ("fashion_mnist/massrl", ["augment.view_mode=random"]),
    "massrl_per_strategy": ("fashion_mnist/massrl", ["augment.view_mode=per_strategy"]),
    "massrl_crops_x_strategies": ("fashion_mnist/massrl",
                                  ["augment.view_mode=crops_x_strategies", "augment.num_crops=2"]),
}
# lever name -> list of (setting label, overrides) measured on BYOL
LEVERS: dict[str, list[tuple[str, list[str]]]] = {
    "precision": [("bf16-mixed", ["trainer.precision=bf16-mixed"]),
                  ("32-true", ["trainer.precision=32-true"])],
    "channels_last": [("true", ["trainer.channels_last=true"]),
                      ("false", ["trainer.channels_last=false"])],
    "compile": [("false", ["trainer.compile=false"]), ("true", ["trainer.compile=true"])],
    "num_workers": [(str(n), [f"data.num_workers={n}"]) for n in (0, 1, 2)],
    "persistent_workers": [("true", ["data.persistent_workers=true"]),
                           ("false", ["data.persistent_workers=false"])],
    "pin_memory": [("true", ["data.pin_memory=true"]), ("false", ["data.pin_memory=false"])],
    "retain_freed_memory": [("true", ["trainer.retain_freed_memory=true"]),
                            ("false", ["trainer.retain_freed_memory=false"])],
}


# ---------------------------------------------------------------- worker side (one measurement)


def peak_rss_mib() -> tuple[float, float]:
    """(this process, its largest finished child) peak resident set size in MiB (Linux: KiB)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return round(own, 1), round(child, 1)


def massrl_worker(spec: dict[str, Any]) -> dict[str, Any]:
    from massrl.config import build_config
    from massrl.eval.checkpoint import load_pretrained
    from massrl.train import pretrain

    config, overrides = METHODS[spec["method"]]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = build_config(config_file=config, overrides=[
            *overrides, *spec["common"], *spec["overrides"], f"output_dir={tmp}"])
        summary = pretrain(cfg)
        rates = epoch_rates(Path(tmp) / "metrics.csv")
        out = {"images_per_s": rates[-1], "epoch_images_per_s": rates,
               "precision": cfg.trainer.precision, "images_seen": summary["images_seen"]}
        if spec.get("knn"):
            backbone = load_pretrained(Path(summary["last_checkpoint"]))[0]
            out["knn_top1"] = frozen_knn_top1(backbone, cfg)
    return out


def lightly_worker(spec: dict[str, Any]) -> dict[str, Any]:
    from lightly_byol import train_lightly_byol

    from massrl.config import build_config
    from massrl.data import load_dataset

    cfg = build_config(config_file="fashion_mnist/byol",
                       overrides=[*spec["common"], *spec["overrides"]])
    rates, backbone = train_lightly_byol(cfg, load_dataset(cfg.data, cfg.seed))
    out = {"images_per_s": rates[-1], "epoch_images_per_s": rates,
           "precision": cfg.trainer.precision}
    if spec.get("knn"):
        out["knn_top1"] = frozen_knn_top1(backbone, cfg)
    return out


def frozen_knn_top1(backbone: Any, cfg: Any) -> float:
    """The online monitor's protocol offline: weighted kNN (cfg.eval k and temperature) of frozen
    features, bank = labeled train split, queries = test split, both cut to data.eval_subset."""
    from massrl.data import load_dataset
    from massrl.data.eval_transform import EvalTransform
    from massrl.data.loading import labeled_images, make_loader
    from massrl.eval.features import extract_features
    from massrl.eval.knn import weighted_knn

    splits = load_dataset(cfg.data, 0)  # the same bank and test images for every run
    t = EvalTransform(cfg.data.image_size, splits.mean, splits.std)
    bank, test = (extract_features(backbone, make_loader(labeled_images(ds, t), 256))
                  for ds in (splits.train_labeled, splits.test))
    top1 = weighted_knn(*bank, *test, cfg.eval.knn_k, cfg.eval.knn_temperature,
                        splits.num_classes)[0]
    return round(float(top1), 4)


def epoch_rates(metrics_csv: Path) -> list[float]:
    with metrics_csv.open() as f:
        return [round(float(r["throughput/images_per_s"]), 1) for r in csv.DictReader(f)
                if r.get("throughput/images_per_s")]


def worker_main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    if spec.get("lightly_path"):
        sys.path.insert(0, spec["lightly_path"])
    t0 = time.perf_counter()
    out = lightly_worker(spec) if spec["kind"] == "lightly" else massrl_worker(spec)
    out["wall_seconds"] = round(time.perf_counter() - t0, 1)
    out["peak_rss_mib"], out["peak_rss_child_mib"] = peak_rss_mib()
    out["load_average_1min"] = round(os.getloadavg()[0], 2)  # is anything else running?
    print("RESULT " + json.dumps(out), flush=True)


# ---------------------------------------------------------------- driver side


def measure(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One measurement in a fresh interpreter; an error row instead of raising."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    row = {k: spec[k] for k in ("kind", "method", "label")} | {"overrides": spec["overrides"]}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return row | {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout)[-800:]
        return row | {"error": f"exit {proc.returncode}: {tail}"}
    result = row | json.loads(lines[-1][len("RESULT "):])
    print(f"{row['kind']:>7} {row['method']:<26} {row['label']:<28} "
          f"{result['images_per_s']:>8.1f} img/s  peak {result['peak_rss_mib']:.0f} MiB",
          flush=True)
    return result


def batched_status() -> tuple[bool, str]:
    """Whether pre-training at this commit runs the batched backend (not only that it exists)."""
    try:
        from massrl.augment.batched import BatchedAugmenter  # noqa: F401
    except ImportError as exc:
        return False, f"massrl.augment.batched has no BatchedAugmenter ({exc})"
    import massrl.data.datamodule as dm
    import massrl.methods.base as base
    import massrl.train as train

    wired = any(w in inspect.getsource(mod) for mod in (train, dm, base)
                for w in ("augment_batch", "BatchedAugmenter", "CropOnlyTransform"))
    if not wired:
        return False, ("BatchedAugmenter exists, but pre-training at this commit does not use it "
                       "(augment.backend=batched would still run the per-image transform)")
    return True, "wired into pre-training"


def spec(kind: str, method: str, label: str, common: list[str], overrides: list[str],
         lightly_path: str | None) -> dict[str, Any]:
    return {"kind": kind, "method": method, "label": label, "common": common,
            "overrides": overrides, "lightly_path": lightly_path}


def plan(a: argparse.Namespace, common: list[str], batched: bool) -> list[dict[str, Any]]:
    specs = []
    backends = ["per_image", "batched"] if batched else ["per_image"]
    for method in a.methods:
        for b in backends:
            specs.append(spec("massrl", method, f"backend={b}", common,
                              [f"augment.backend={b}"], None))
    for lever in a.levers:
        for label, ov in LEVERS[lever]:
            # (the levers are measured on the per-image backend, as the docs' heading says)
            specs.append(spec("massrl", "byol", f"{lever}={label}", common,
                              ["augment.backend=per_image", *ov], None))
    return specs


def lightly_available(path: str | None) -> tuple[bool, str]:
    code = "import lightly.loss, lightly.models.modules, lightly.transforms, lightly.utils.lars"
    env = dict(os.environ)
    if path:
        env["PYTHONPATH"] = path + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", code + "; print(lightly.__version__)"],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return False, proc.stderr.strip().splitlines()[-1] if proc.stderr else "import failed"
    return True, proc.stdout.strip()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help="fewer batches, no torch.compile")
    p.add_argument("--batches", type=int, default=None, help="batches per epoch")
    p.add_argument("--epochs", type=int, default=2, help="epochs; the last one is reported")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS),
                   help="(none: only the levers and the lightly pairs)")
    p.add_argument("--levers", nargs="*", default=None, choices=list(LEVERS))
    p.add_argument("--lightly-path", default=None, help="directory holding the lightly package")
    p.add_argument("--lightly-repeats", type=int, default=None,
                   help="massrl/lightly pairs, one seed each (default 3; quick 1)")
    p.add_argument("--pair-batches", type=int, default=None,
                   help="batches per epoch of the lightly pairs (default 20; quick 3)")
    p.add_argument("--pair-epochs", type=int, default=None, help="default 3; quick 2")
    p.add_argument("--pair-backends", nargs="+", default=["per_image", "batched"],
                   choices=["per_image", "batched"], help="massrl's side of each lightly pair")
    p.add_argument("--pair-eval-subset", type=int, default=2000,
                   help="kNN bank and test images after the lightly pairs")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--docs", type=Path, default=ROOT / "docs", help="'none': no markdown")
    return p.parse_args(argv)


def lightly_pairs(a: argparse.Namespace, common: list[str]) -> tuple[list[dict], str]:
    """Alternating massrl / lightly BYOL runs (so both see the same machine load), one seed per
    pair, longer than the other rows so that the kNN accuracy after training means something."""
    ok, version = lightly_available(a.lightly_path)
    if not ok:
        return [], f"lightly not importable: {version}"
    rows = []
    for seed in range(a.lightly_repeats):
        longer = [f"seed={seed}", f"data.subset={a.batch_size * a.pair_batches}",
                  f"trainer.max_epochs={a.pair_epochs}", f"data.eval_subset={a.pair_eval_subset}"]
        runs = [("massrl", f"vs-lightly backend={b}", [f"augment.backend={b}", *longer], None)
                for b in a.pair_backends]
        runs.append(("lightly", "vs-lightly", longer, a.lightly_path))
        for kind, label, ov, path in runs:
            s = spec(kind, "byol", label, common, ov, path)
            rows.append(measure(s | {"knn": True}, a.timeout))
    return rows, version


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    if a.worker:
        worker_main(a.worker)
        return {}
    a.batches = a.batches or (3 if a.quick else 8)
    a.lightly_repeats = a.lightly_repeats or (1 if a.quick else 3)
    a.pair_batches = a.pair_batches or (3 if a.quick else 20)
    a.pair_epochs = a.pair_epochs or (2 if a.quick else 3)
    if a.levers is None:
        a.levers = [k for k in LEVERS if not (a.quick and k == "compile")]
    common = [f"data.subset={a.batch_size * a.batches}", f"data.batch_size={a.batch_size}",
              f"model.width={a.width}", f"trainer.max_epochs={a.epochs}", "eval.knn_every=0",
              "eval.probe=false", "trainer.progress_bar=false", "optimizer.warmup_epochs=0"]
    batched, batched_note = batched_status()
    t0 = time.perf_counter()
    rows = [measure(s, a.timeout) for s in plan(a, common, batched)]
    pairs, lightly_note = lightly_pairs(a, common)
    data = {"meta": meta(a, argv, common, batched_note, lightly_note, time.perf_counter() - t0),
            "results": rows + pairs}
    mode = "quick" if a.quick else "full"
    out = a.out or ROOT / "benchmarks" / "results" / f"train_throughput_{mode}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2))
    if str(a.docs) != "none":
        write_section(data, a.docs / "benchmarks.md")
    return data


def meta(a: argparse.Namespace, argv: list[str] | None, common: list[str], batched: str,
         lightly: str, seconds: float) -> dict[str, Any]:
    import torch

    import massrl

    cmd = "python benchmarks/train_throughput.py " + shlex.join(
        argv if argv is not None else sys.argv[1:])
    pairs = {"repeats": a.lightly_repeats, "batches": a.pair_batches, "epochs": a.pair_epochs,
             "eval_subset": a.pair_eval_subset}
    return {"command": cmd, "common_overrides": common, "batched_backend": batched,
            "lightly_pairs": pairs,
            "lightly": lightly, "torch": torch.__version__, "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "massrl_path": str(Path(massrl.__file__).parent), "total_seconds": round(seconds, 1),
            "git_commit": os.environ.get("MASSRL_COMMIT") or _commit()}


def _commit() -> str:
    proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return proc.stdout.strip() or "unknown"


# ---------------------------------------------------------------- markdown


def _cell(r: dict[str, Any]) -> tuple[str, str]:
    if "error" in r:
        return "error", r["error"].splitlines()[0][:60]
    return f"{r['images_per_s']:.0f}", f"{r['peak_rss_mib']:.0f} / {r['peak_rss_child_mib']:.0f}"


def table(rows: list[dict[str, Any]], first: str) -> list[str]:
    knn = any("knn_top1" in r for r in rows)
    out = [f"| {first} | setting | images/s | peak RSS MiB (main / largest worker) | "
           + ("kNN top-1 | " if knn else "") + "load average at the end |",
           "|---" * (6 if knn else 5) + "|"]
    for r in rows:
        rate, mem = _cell(r)
        name = r["method"] if r["kind"] == "massrl" else f"{r['kind']} {r['method']}"
        if r["label"].startswith("vs-lightly"):
            name += f" (seed {_seed(r)})"
        acc = (f"{100 * r['knn_top1']:.1f} | " if "knn_top1" in r else "- | ") if knn else ""
        out.append(f"| {name} | {r['label']} | {rate} | {mem} | {acc}"
                   f"{r.get('load_average_1min', '-')} |")
    return out


def _seed(r: dict[str, Any]) -> str:
    return next((o.split("=")[1] for o in r["overrides"] if o.startswith("seed=")), "0")


def lightly_summary(rows: list[dict[str, Any]]) -> list[str]:
    ok = [r for r in rows if r["label"].startswith("vs-lightly") and "error" not in r]
    theirs = [r for r in ok if r["kind"] == "lightly"]
    if not theirs:
        return ["No lightly run finished (see the errors above)."]
    out = []
    for label in sorted({r["label"] for r in ok if r["kind"] == "massrl"}):
        ours = [r for r in ok if r["label"] == label]
        ratios = [a["images_per_s"] / b["images_per_s"]
                  for a, b in zip(ours, theirs, strict=False)]
        out.append(
            f"- massrl ({label.removeprefix('vs-lightly ')}) / lightly images/s per alternating "
            f"pair: {', '.join(f'{x:.2f}' for x in ratios)} (mean "
            f"{sum(ratios) / len(ratios):.2f}); peak RSS of the main process: massrl "
            f"{max(r['peak_rss_mib'] for r in ours):.0f} MiB, lightly "
            f"{max(r['peak_rss_mib'] for r in theirs):.0f} MiB; kNN top-1 after the same "
            f"epochs: massrl {_knn(ours)}, lightly {_knn(theirs)} (mean ± std over the seeds).")
    return out


def _knn(rows: list[dict[str, Any]]) -> str:
    return fmt([r["knn_top1"] for r in rows if "knn_top1" in r])


def write_section(data: dict[str, Any], doc: Path) -> None:
    m, rows = data["meta"], data["results"]
    mode = "quick" if "--quick" in m["command"] else "full"
    methods = [r for r in rows if r["label"].startswith("backend=")]
    levers = [r for r in rows if r["kind"] == "massrl" and not r["label"].startswith("backend=")
              and not r["label"].startswith("vs-lightly")]
    pairs = [r for r in rows if r["label"].startswith("vs-lightly")]
    body = [
        f"## Pre-training throughput on the CPU ({mode} run)", "",
        f"Produced by `{m['command']}` ({m['total_seconds'] / 60:.0f} min, {m['cpus']} "
        f"CPU cores, torch {m['torch']}, commit `{m['git_commit'][:10]}`). Every run: "
        f"`{' '.join(m['common_overrides'])}`, the shipped fashion_mnist config otherwise; "
        "images/s of the last epoch (the first pays for start-up), in its own process, one run "
        "per row. Several lever rows are the shipped setting itself (e.g. bf16-mixed, "
        "channels_last=true, compile=false, num_workers=0 on 2 cores): their spread is the "
        "run-to-run noise. The last column is the machine's load average when the run ended.", "",
        f"Batched backend: {m['batched_backend']}.", "",
        "### Methods and view modes", "", *table(methods, "method"), "",
        "### Speed levers (BYOL, per_image backend; every other setting as shipped)", "",
        *table(levers, "method"), "",
        f"### Same BYOL written with lightly ({m['lightly']})", "",
        "Alternating runs, one seed per pair ({repeats} pairs), each {batches} batches × {epochs} "
        "epochs, then the frozen-feature kNN (the online monitor's k=200, T=0.07) on {eval_subset} "
        "train / {eval_subset} test images, the same code for both. ".format(**m["lightly_pairs"])
        + "lightly's BYOLTransform (same asymmetric blur / solarize), heads, "
        "NegativeCosineSimilarity, LARS, cosine momentum; the same timm ResNet-18 CIFAR stem, "
        "batch, bf16 autocast, channels_last and DataLoader settings, in a plain PyTorch loop.", "",
        *table(pairs, "run"), "", *lightly_summary(rows), "",
    ]
    replace_section(doc, f"throughput-{mode}", "\n".join(body))


if __name__ == "__main__":
    main()
