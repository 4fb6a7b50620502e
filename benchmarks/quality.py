"""Quality benchmark: MASSRL vs BYOL vs SimCLR on Fashion-MNIST, per epoch and at equal compute.

Every method gets the same backbone (ResNet-18, CIFAR stem, narrow), optimizer, schedule, batch size
and epochs; only the method and the way views are made differ. For each (method, seed):

1. `massrl pretrain` in a subprocess (isolation; online kNN top-1 per epoch in metrics.csv),
2. offline kNN and linear top-1 on the last checkpoint: the functions behind `massrl knn` and
   `massrl linear features_cached=true`, called in this process (the dataset is read once),

then two baselines without training: the same backbone at random init, and kNN / linear on raw
pixels. Results: one JSON per run under --out-dir, all runs in quality_<mode>.csv / .json, a
markdown section in docs/benchmarks.md and accuracy-per-epoch curves in docs/quality_curves.png.

    python benchmarks/quality.py --quick          # < 10 minutes, 1 seed
    nohup python benchmarks/quality.py > /tmp/quality.log 2>&1 &   # full, 3 seeds, ~75 min

Set PYTHONPATH to a fixed source tree (e.g. a `git archive` of a commit) to benchmark that commit
while the working tree changes; the commit and massrl path are recorded in the results.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = "[simclr,randaugment,autoaugment,fastautoaugment]"

# name -> (shipped config, overrides that make the method / view mode)
METHODS: dict[str, tuple[str, list[str]]] = {
    "byol": ("fashion_mnist/byol", []),
    "simclr": ("fashion_mnist/simclr", []),
    "massrl_random": ("fashion_mnist/massrl", ["augment.view_mode=random", "augment.num_views=2"]),
    "massrl_per_strategy": ("fashion_mnist/massrl", ["augment.view_mode=per_strategy"]),
    "massrl_crops_x_strategies": (
        "fashion_mnist/massrl", ["augment.view_mode=crops_x_strategies", "augment.num_crops=2"]),
}
VIEWS = {"byol": 2, "simclr": 2, "massrl_random": 2, "massrl_per_strategy": 4,
         "massrl_crops_x_strategies": 8}


@dataclass
class Setup:
    """Everything shared by all runs of one benchmark invocation."""

    mode: str
    epochs: int
    subset: int
    eval_subset: int
    offline_subset: int
    width: int
    batch_size: int
    num_workers: int
    linear_epochs: int
    seeds: list[int]
    methods: list[str]
    runs_dir: Path
    out_dir: Path
    docs: Path | None
    extra: list[str] = field(default_factory=list)

    def common_overrides(self, seed: int) -> list[str]:
        return [
            f"seed={seed}", f"data.subset={self.subset}", f"data.eval_subset={self.eval_subset}",
            f"data.batch_size={self.batch_size}", f"data.num_workers={self.num_workers}",
            f"model.width={self.width}", f"trainer.max_epochs={self.epochs}",
            "trainer.progress_bar=false", "eval.knn_every=1",
            # the published tables' backend (auto picks the engine on the CPU); --override
            # augment.backend=batched measures the engine
            "augment.backend=per_image", *self.extra,
        ]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 seed, small subset, few epochs")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3; quick 1)")
    p.add_argument("--first-seed", type=int, default=0,
                   help="seeds first-seed, first-seed+1, ...: two processes can split the seeds")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--subset", type=int, default=None, help="pre-training images (class-balanced)")
    p.add_argument("--eval-subset", type=int, default=None,
                   help="bank and test images of the online kNN monitor")
    p.add_argument("--offline-subset", type=int, default=None,
                   help="bank and test images of the offline kNN / linear evaluation")
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--num-workers", type=int, default=0,
                   help="0 (augment between steps) was fastest on 2 cores")
    p.add_argument("--linear-epochs", type=int, default=None)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--runs-dir", type=Path, default=Path("/tmp/massrl_quality"))
    p.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--docs", type=Path, default=ROOT / "docs",
                   help="where benchmarks.md and quality_curves.png go ('none': nowhere)")
    p.add_argument("--resume", action="store_true", help="reuse finished runs in --runs-dir")
    p.add_argument("--override", nargs="*", default=[], help="extra KEY=VALUE for every run")
    p.add_argument("--report-only", type=Path, default=None, metavar="RESULTS_JSON",
                   help="only (re)write docs from a results file (e.g. of a run still going)")
    return p.parse_args(argv)


def make_setup(a: argparse.Namespace) -> Setup:
    q = a.quick

    def pick(value: int | None, quick: int, full: int) -> int:
        return value if value is not None else (quick if q else full)

    return Setup(
        mode="quick" if q else "full", epochs=pick(a.epochs, 3, 8),
        subset=pick(a.subset, 600, 4000), eval_subset=pick(a.eval_subset, 1000, 1000),
        offline_subset=pick(a.offline_subset, 2000, 5000), width=a.width,
        batch_size=a.batch_size, num_workers=a.num_workers,
        linear_epochs=pick(a.linear_epochs, 20, 30),
        seeds=list(range(a.first_seed, a.first_seed + pick(a.seeds, 1, 3))),
        methods=a.methods, runs_dir=a.runs_dir, out_dir=a.out_dir,
        docs=None if str(a.docs) == "none" else a.docs, extra=list(a.override),
    )


# ---------------------------------------------------------------- one run


def massrl_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "massrl", *args]


def run_logged(cmd: list[str], log: Path) -> float:
    """Run a command, output to `log`; seconds taken. Raises with the log's tail on failure."""
    t0 = time.perf_counter()
    with log.open("w") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=log.parent)
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"command failed ({proc.returncode}): {shlex.join(cmd)}\n{tail}")
    return time.perf_counter() - t0


def read_curve(metrics_csv: Path, images_per_epoch: int, views: int) -> list[dict[str, Any]]:
    """Per-epoch online kNN top-1 and epoch seconds from Lightning's metrics.csv."""
    knn: dict[int, float] = {}
    secs: dict[int, float] = {}
    with metrics_csv.open() as f:
        for row in csv.DictReader(f):
            e = int(row["epoch"])
            if row.get("val/knn_top1"):
                knn[e] = float(row["val/knn_top1"])
            if row.get("throughput/epoch_seconds"):
                secs[e] = float(row["throughput/epoch_seconds"])
    curve, elapsed = [], 0.0
    for e in sorted(knn):
        elapsed += secs.get(e, float("nan"))
        curve.append({"epoch": e + 1, "knn_top1": knn[e], "train_seconds": round(elapsed, 2),
                      "images": images_per_epoch * (e + 1),
                      "image_views": images_per_epoch * views * (e + 1)})
    return curve


def offline_eval(setup: Setup, run_dir: Path, evaluator: Evaluator) -> dict[str, Any]:
    """The `massrl knn` / `massrl linear features_cached=true` protocol (same functions, same test
    transform), in this process so the dataset is read once for all runs."""
    from massrl.eval.checkpoint import load_pretrained

    backbone = load_pretrained(run_dir / "checkpoints" / "last.ckpt")[0]
    return evaluator(backbone)


def one_run(setup: Setup, method: str, seed: int, resume: bool, evaluator: Evaluator
            ) -> dict[str, Any]:
    run_dir = setup.runs_dir / setup.mode / f"{method}_seed{seed}"
    result_file = run_dir / "result.json"
    if resume and result_file.is_file():
        return json.loads(result_file.read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    config, method_overrides = METHODS[method]
    cmd = massrl_cmd("pretrain", "-c", config, *method_overrides,
                     *setup.common_overrides(seed), f"output_dir={run_dir}")
    wall = run_logged(cmd, run_dir / "pretrain.log")
    summary = json.loads((run_dir / "summary.json").read_text())
    per_epoch = summary["images_seen"] // max(summary["epochs"], 1)
    result = {
        "method": method, "seed": seed, "views": VIEWS[method], "epochs": setup.epochs,
        "pretrain_command": "python -m massrl " + shlex.join(cmd[3:]),
        "pretrain_wall_seconds": round(wall, 1), "train_seconds": summary["train_seconds"],
        "images_seen": summary["images_seen"], "online_knn_top1": summary["knn_top1"],
        "probe_top1": summary["probe_top1"],
        "curve": read_curve(run_dir / "metrics.csv", per_epoch, VIEWS[method]),
        **offline_eval(setup, run_dir, evaluator),
    }
    result_file.write_text(json.dumps(result, indent=2))
    return result


# ---------------------------------------------------------------- baselines


class Evaluator:
    """Frozen-feature kNN (cosine, T=0.07, k=200 and 20) and linear top-1 on fixed labeled splits
    (class-balanced `n` train images as the bank / linear training set, `n` test images)."""

    def __init__(self, setup: Setup, n: int) -> None:
        from massrl.config import build_config
        from massrl.data import load_dataset
        from massrl.data.eval_transform import EvalTransform

        self.cfg = build_config(config_file="fashion_mnist/byol", overrides=[
            f"model.width={setup.width}", f"data.eval_subset={n}", "seed=0"])
        self.splits = load_dataset(self.cfg.data, self.cfg.seed)
        self.transform = EvalTransform(self.cfg.data.image_size, self.splits.mean,
                                       self.splits.std)
        self.linear_epochs = setup.linear_epochs

    def features(self, ds: Any, net: Any) -> tuple[Any, Any]:
        from massrl.data.loading import labeled_images, make_loader
        from massrl.eval.features import extract_features

        return extract_features(net, make_loader(labeled_images(ds, self.transform), 256), "cpu")

    def __call__(self, net: Any) -> dict[str, float]:
        train = self.features(self.splits.train_labeled, net)
        test = self.features(self.splits.test, net)
        out = evaluate_features(train, test, self.splits.num_classes, self.linear_epochs)
        return out | {"num_bank": len(train[1]), "num_test": len(test[1])}

    def random_backbone(self) -> Any:
        import torch

        from massrl.methods import build_method

        torch.manual_seed(0)
        return build_method(self.cfg, num_classes=self.splits.num_classes,
                            strategy_names=["simclr"]).backbone


def baseline_features(setup: Setup, offline: Evaluator) -> dict[str, Any]:
    """Random-init backbone and raw pixels, with the offline protocol's split sizes and with the
    online monitor's."""
    import torch

    out: dict[str, Any] = {}
    for protocol, ev in (("offline", offline), ("online", Evaluator(setup, setup.eval_subset))):
        nets = (("random_init", ev.random_backbone()), ("raw_pixels", torch.nn.Flatten()))
        for name, net in nets:
            out.setdefault(name, {})[protocol] = ev(net)
    return out


def evaluate_features(train: tuple, test: tuple, num_classes: int, epochs: int) -> dict[str, float]:
    from massrl.eval.knn import weighted_knn_per_k
    from massrl.eval.linear import SGDRecipe, train_linear_on_features

    (xtr, ytr), (xte, yte) = train, test
    knn = weighted_knn_per_k(xtr, ytr, xte, yte, (200, 20), 0.07, num_classes)
    k200, k20 = knn[200][0], knn[20][0]
    lin = train_linear_on_features(xtr, ytr, xte, yte, num_classes, SGDRecipe(epochs=epochs))
    return {"offline_knn_top1_k200": k200, "offline_knn_top1_k20": k20, "linear_top1": lin.top1}


# ---------------------------------------------------------------- report

LABELS = {"byol": "BYOL", "simclr": "SimCLR", "massrl_random": "MASSRL random (2 views)",
          "massrl_per_strategy": "MASSRL per_strategy (4 views)",
          "massrl_crops_x_strategies": "MASSRL crops_x_strategies (8 views)"}
COLOURS = {"byol": "tab:blue", "simclr": "tab:grey", "massrl_random": "tab:red",
           "massrl_per_strategy": "tab:orange", "massrl_crops_x_strategies": "tab:purple"}


def mean_std(values: list[float]) -> tuple[float, float]:
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    m = sum(values) / n
    sd = (sum((v - m) ** 2 for v in values) / (n - 1)) ** 0.5 if n > 1 else 0.0
    return m, sd


def fmt(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    m, sd = mean_std([v * scale for v in values])
    if m != m:
        return "-"
    return f"{m:.{digits}f} ± {sd:.{digits}f}" if len(values) > 1 else f"{m:.{digits}f}"


def by_method(runs: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in runs:
        out.setdefault(r["method"], []).append(r)
    return out


def at_budget(run: dict, key: str, budget: float) -> dict | None:
    """The last epoch whose cumulative `key` (image_views, train_seconds) fits the budget."""
    fits = [c for c in run["curve"] if c[key] <= budget * 1.001]
    return fits[-1] if fits else None


def equal_epochs_table(groups: dict[str, list[dict]], baselines: dict) -> list[str]:
    rows = ["| method | seeds | views | online kNN (last epoch) | offline kNN k=200 | "
            "offline kNN k=20 | offline linear | pre-training s | image-views (k) |",
            "|---" * 9 + "|"]
    for m, rs in groups.items():
        rows.append(
            f"| {LABELS[m]} | {len(rs)} | {rs[0]['views']} | "
            f"{fmt([r['online_knn_top1'] for r in rs])} | "
            f"{fmt([r['offline_knn_top1_k200'] for r in rs])} | "
            f"{fmt([r['offline_knn_top1_k20'] for r in rs])} | "
            f"{fmt([r['linear_top1'] for r in rs])} | "
            f"{fmt([r['train_seconds'] for r in rs], 1.0, 0)} | "
            f"{fmt([r['curve'][-1]['image_views'] for r in rs], 1e-3, 1)} |")
    for name, label in (("random_init", "untrained backbone"), ("raw_pixels", "raw pixels")):
        b = baselines.get(name)
        if b:
            on, off = b["online"], b["offline"]
            rows.append(f"| {label} (no training) | - | - | "
                        f"{100 * on['offline_knn_top1_k200']:.1f} | "
                        f"{100 * off['offline_knn_top1_k200']:.1f} | "
                        f"{100 * off['offline_knn_top1_k20']:.1f} | "
                        f"{100 * off['linear_top1']:.1f} | 0 | 0 |")
    return rows


def equal_compute_table(groups: dict[str, list[dict]]) -> list[str]:
    """Online kNN of every method at BYOL's total image-views and at BYOL's training time."""
    ref = groups.get("byol")
    if not ref:
        return ["(no BYOL runs: no equal-compute comparison)"]
    views_budget = ref[0]["curve"][-1]["image_views"]
    time_budget = mean_std([r["train_seconds"] for r in ref])[0]
    rows = [f"Budgets: BYOL's {views_budget / 1e3:.1f} k image-views through the encoder, and "
            f"BYOL's mean training time {time_budget:.0f} s (wall time on a shared 2-core CPU: "
            "noisy).", "",
            "| method | epochs in view budget | online kNN at equal image-views | "
            "epochs in time budget | online kNN at equal time |", "|---|---|---|---|---|"]
    for m, rs in groups.items():
        cells = []
        for key, budget in (("image_views", views_budget), ("train_seconds", time_budget)):
            pts = [at_budget(r, key, budget) for r in rs]
            pts = [p for p in pts if p is not None]
            if not pts:
                cells += ["0", "- (not one epoch)"]
                continue
            cells += [fmt([p["epoch"] for p in pts], 1.0, 1),
                      fmt([p["knn_top1"] for p in pts])]
        rows.append(f"| {LABELS[m]} | " + " | ".join(cells) + " |")
    return rows


def per_epoch_table(groups: dict[str, list[dict]]) -> list[str]:
    methods = list(groups)
    epochs = max(len(r["curve"]) for rs in groups.values() for r in rs)
    rows = ["| epoch | " + " | ".join(LABELS[m] for m in methods) + " |",
            "|---" * (len(methods) + 1) + "|"]
    for e in range(epochs):
        cells = [fmt([r["curve"][e]["knn_top1"] for r in groups[m] if len(r["curve"]) > e])
                 for m in methods]
        rows.append(f"| {e + 1} | " + " | ".join(cells) + " |")
    return rows


def compare(diff: float, sa: float, sb: float, na: int, nb: int) -> str:
    """'above' / 'below' / 'within the seeds' spread of' BYOL, the spread being the larger std."""
    if na < 2 and nb < 2:
        return f"{'above' if diff > 0 else 'below'} BYOL; 1 seed each, no noise estimate"
    noise = max(sa if na > 1 else 0.0, sb if nb > 1 else 0.0)
    if abs(diff) <= noise:
        return f"within the seeds' spread (std {noise:.1f}) of BYOL"
    return f"{'above' if diff > 0 else 'below'} BYOL, beyond the seeds' std {noise:.1f}"


def verdicts(groups: dict[str, list[dict]]) -> list[str]:
    """Plain sentences: each MASSRL mode against BYOL, difference of means and the seeds' spread."""
    ref = groups.get("byol")
    if not ref:
        return []
    out = []
    metrics = (("online_knn_top1", "online kNN"), ("offline_knn_top1_k200", "offline kNN"),
               ("linear_top1", "offline linear"))
    for m, rs in groups.items():
        if not m.startswith("massrl"):
            continue
        parts = []
        for key, name in metrics:
            a, sa = mean_std([100 * r[key] for r in rs])
            b, sb = mean_std([100 * r[key] for r in ref])
            verdict = compare(a - b, sa, sb, len(rs), len(ref))
            parts.append(f"{name} {a - b:+.1f} points ({verdict})")
        out.append(f"- **{LABELS[m]}** at equal epochs: " + "; ".join(parts) + ".")
    return out


def plot_curves(groups: dict[str, list[dict]], baselines: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, xlabel in ((axes[0], "epoch", "pre-training epoch"),
                            (axes[1], "image_views", "image-views through the encoder (k)")):
        for m, rs in groups.items():
            n = min(len(r["curve"]) for r in rs)
            xs = [rs[0]["curve"][e][key] * (1e-3 if key == "image_views" else 1) for e in range(n)]
            stats = [mean_std([100 * r["curve"][e]["knn_top1"] for r in rs]) for e in range(n)]
            mean = [s[0] for s in stats]
            ax.plot(xs, mean, marker="o", ms=3, color=COLOURS[m], label=LABELS[m],
                    lw=2.2 if m in ("byol", "massrl_random") else 1.4,
                    ls="--" if m == "simclr" else "-")
            ax.fill_between(xs, [a - s for a, s in stats], [a + s for a, s in stats],
                            color=COLOURS[m], alpha=0.18)
        for name, label, ls in (("random_init", "untrained backbone", ":"),
                                ("raw_pixels", "raw pixels", "-.")):
            if name in baselines:  # (the online protocol's bank and test images, as the curves)
                ax.axhline(100 * baselines[name]["online"]["offline_knn_top1_k200"], color="k",
                           ls=ls, lw=1, label=f"{label} (kNN)")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("online kNN top-1 on test (%)")
        ax.grid(alpha=0.3)
    axes[0].xaxis.get_major_locator().set_params(integer=True)  # epochs: whole numbers
    # below the panels: inside, it covered the curves' ends
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=min(len(labels), 4),
               frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report_section(data: dict, png: str) -> str:
    info, groups, base = data["meta"], by_method(data["runs"]), data["baselines"]
    seeds = len(info["seeds"])
    lines = [
        f"## Quality: MASSRL vs BYOL vs SimCLR on Fashion-MNIST ({info['mode']} run)", "",
        f"Produced by `{info['command']}` (PYTHONPATH = a `git archive` of commit "
        f"`{info['git_commit'][:10]}`; {info['total_seconds'] / 60:.0f} min on a shared 2-core "
        "CPU).",
        f"ResNet-18 CIFAR stem, width {info['width']}, 32 px, {info['subset']} class-balanced "
        f"Fashion-MNIST training images, batch {info['batch_size']}, {info['epochs']} epochs, "
        "the shipped fashion_mnist configs otherwise (LARS, 0.5 warm-up epochs, cosine, bf16 "
        f"autocast); {seeds} seed(s) planned (the seeds column says how many finished), "
        "mean ± std over seeds. Online kNN: k=200, T=0.07, cosine, "
        f"on {info['eval_subset']} train / {info['eval_subset']} test images (data.eval_subset). "
        "Offline: the protocol of `massrl knn` (k=200 and 20) and `massrl linear "
        f"features_cached=true epochs={info['linear_epochs']}` (the same functions, run in the "
        "benchmark's process) on the last checkpoint, on a class-balanced "
        f"{info['offline_subset']}-image bank / linear training set from the 60k training split "
        f"and {info['offline_subset']} test images. "
        "The exact pre-training command of each run is in benchmarks/results "
        f"(quality_{info['mode']}.json, `pretrain_command`).", "",
        "### At equal epochs (top-1 %)", "", *equal_epochs_table(groups, base), "",
        *verdicts(groups), "",
        "### At equal compute", "", *equal_compute_table(groups), "",
        "### Online kNN top-1 (%) per epoch", "", *per_epoch_table(groups), "",
        f"![accuracy per epoch]({png})", "",
    ]
    return "\n".join(lines)


def replace_section(doc: Path, key: str, body: str) -> None:
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    text = doc.read_text() if doc.is_file() else "# Benchmarks\n\n"
    block = f"{start}\n{body}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)


def write_report(data: dict, docs: Path) -> None:
    mode = data["meta"]["mode"]
    png = "quality_curves.png" if mode == "full" else f"quality_curves_{mode}.png"
    title = (f"Fashion-MNIST, ResNet-18 w{data['meta']['width']}, online kNN top-1 per epoch "
             f"(mean ± std over up to {len(data['meta']['seeds'])} seed(s))")
    plot_curves(by_method(data["runs"]), data["baselines"], docs / png, title)
    replace_section(docs / "benchmarks.md", f"quality-{mode}", report_section(data, png))


# ---------------------------------------------------------------- main


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def meta(setup: Setup, argv: list[str] | None, seconds: float) -> dict[str, Any]:
    import torch

    import massrl

    return {"command": "python benchmarks/quality.py " + shlex.join(argv or sys.argv[1:]),
            "mode": setup.mode, "epochs": setup.epochs, "subset": setup.subset,
            "eval_subset": setup.eval_subset, "offline_subset": setup.offline_subset,
            "width": setup.width, "batch_size": setup.batch_size,
            "num_workers": setup.num_workers, "linear_epochs": setup.linear_epochs,
            "seeds": setup.seeds, "overrides": setup.extra,
            "git_commit": os.environ.get("MASSRL_COMMIT") or git_commit(),
            "massrl_path": str(Path(massrl.__file__).parent), "torch": torch.__version__,
            "cpus": os.cpu_count(), "total_seconds": round(seconds, 1)}


def write_results(setup: Setup, runs: list[dict], baselines: dict, info: dict) -> Path:
    setup.out_dir.mkdir(parents=True, exist_ok=True)
    stem = setup.out_dir / f"quality_{setup.mode}"
    stem.with_suffix(".json").write_text(json.dumps(
        {"meta": info, "runs": runs, "baselines": baselines}, indent=2))
    with stem.with_suffix(".csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "seed", "epoch", "online_knn_top1", "train_seconds", "images",
                    "image_views"])
        for r in runs:
            for c in r["curve"]:
                w.writerow([r["method"], r["seed"], c["epoch"], c["knn_top1"], c["train_seconds"],
                            c["images"], c["image_views"]])
    return stem.with_suffix(".json")


PAPER_PAIR = ("byol", "massrl_random")  # the paper's figure: run these over all seeds first


def schedule(methods: list[str], seeds: list[int]) -> list[tuple[str, int]]:
    """Run order such that a run cut short still holds the most useful results: BYOL and MASSRL
    (random, 2 views) for every seed first, then every other method for the first seed, then
    the remaining seeds. Results are written after every run."""
    def key(item: tuple[str, int]) -> tuple[int, int, int]:
        method, seed = item
        phase = 0 if method in PAPER_PAIR else 1 if seed == seeds[0] else 2
        return phase, seed, methods.index(method)

    return sorted(((m, s) for s in seeds for m in methods), key=key)


def cached_baselines(setup: Setup, evaluator: Evaluator, resume: bool) -> dict[str, Any]:
    path = setup.runs_dir / setup.mode / "baselines.json"
    if resume and path.is_file():
        return json.loads(path.read_text())
    baselines = baseline_features(setup, evaluator)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(baselines, indent=2))
    return baselines


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.report_only is not None:
        write_report(json.loads(args.report_only.read_text()), args.docs)
        return {"results": str(args.report_only)}
    setup = make_setup(args)
    t0 = time.perf_counter()
    runs: list[dict] = []
    evaluator = Evaluator(setup, setup.offline_subset)
    baselines = cached_baselines(setup, evaluator, args.resume)
    print("baselines:", json.dumps(baselines), flush=True)
    for method, seed in schedule(setup.methods, setup.seeds):
        r = one_run(setup, method, seed, args.resume, evaluator)
        runs.append(r)
        print(f"{method} seed {seed}: online kNN {r['online_knn_top1']:.4f} offline kNN "
              f"{r['offline_knn_top1_k200']:.4f} linear {r['linear_top1']:.4f} "
              f"({r['pretrain_wall_seconds']:.0f} s)", flush=True)
        info = meta(setup, argv, time.perf_counter() - t0)
        path = write_results(setup, runs, baselines, info)
    if setup.docs is not None:
        write_report(json.loads(path.read_text()), setup.docs)
    return {"runs": runs, "baselines": baselines, "results": str(path)}


if __name__ == "__main__":
    main()
