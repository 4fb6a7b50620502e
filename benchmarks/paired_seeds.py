"""Paired per-seed comparison of two quality.py result files (the same seeds, one setting
changed): mean ± std of each arm and of the per-seed differences.

    python benchmarks/paired_seeds.py BASE.json OTHER.json [--names base other]

e.g. `python benchmarks/paired_seeds.py benchmarks/results/ablation_no_blur_6seeds/{shipped,
noblur}.json` (BASE's runs may be repeated across ablations: runs are deterministic).
"""

from __future__ import annotations

import argparse
import json
import statistics as st
from pathlib import Path

METRICS = [("online_knn_top1", "online kNN"), ("offline_knn_top1_k200", "kNN k=200"),
           ("offline_knn_top1_k20", "kNN k=20"), ("linear_top1", "linear")]


def spread(values: list[float]) -> float:
    return st.stdev(values) if len(values) > 1 else 0.0


def compare(base: Path, other: Path, names: tuple[str, str]) -> list[str]:
    runs = [{r["seed"]: r for r in json.loads(p.read_text())["runs"]} for p in (base, other)]
    seeds = sorted(set(runs[0]) & set(runs[1]))
    lines = [f"seeds {seeds}"]
    for key, label in METRICS:
        a, b = ([100 * arm[s][key] for s in seeds] for arm in runs)
        d = [y - x for x, y in zip(a, b, strict=True)]
        per_seed = ", ".join(f"{x:+.1f}" for x in d)
        lines.append(f"{label:12s} {names[0]} {st.mean(a):.1f}±{spread(a):.1f}  {names[1]} "
                     f"{st.mean(b):.1f}±{spread(b):.1f}  diff {st.mean(d):+.1f} (sd "
                     f"{spread(d):.1f}, s.e. {spread(d) / len(d) ** 0.5:.1f}; per seed "
                     f"{per_seed})")
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("base", type=Path)
    p.add_argument("other", type=Path)
    p.add_argument("--names", nargs=2, default=None)
    a = p.parse_args(argv)
    names = tuple(a.names) if a.names else (a.base.stem, a.other.stem)
    print("\n".join(compare(a.base, a.other, names)))


if __name__ == "__main__":
    main()
