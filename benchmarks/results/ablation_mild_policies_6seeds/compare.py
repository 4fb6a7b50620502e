"""Paired per-seed comparison of the shipped and the milder policies (MASSRL random, 6 seeds):
`python benchmarks/results/ablation_mild_policies_6seeds/compare.py`."""

import json
import statistics as st
from pathlib import Path

HERE = Path(__file__).parent
METRICS = [("online_knn_top1", "online kNN"), ("offline_knn_top1_k200", "kNN k=200"),
           ("offline_knn_top1_k20", "kNN k=20"), ("linear_top1", "linear")]


def spread(values: list[float]) -> float:
    return st.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    runs = {name: {r["seed"]: r for r in json.loads((HERE / f"{name}.json").read_text())["runs"]}
            for name in ("shipped", "mild")}
    seeds = sorted(set(runs["shipped"]) & set(runs["mild"]))
    print("seeds", seeds)
    for key, label in METRICS:
        a = [100 * runs["shipped"][s][key] for s in seeds]
        b = [100 * runs["mild"][s][key] for s in seeds]
        d = [y - x for x, y in zip(a, b, strict=True)]
        per_seed = ", ".join(f"{x:+.1f}" for x in d)
        print(f"{label:12s} shipped {st.mean(a):.1f}±{spread(a):.1f}  mild {st.mean(b):.1f}±"
              f"{spread(b):.1f}  diff {st.mean(d):+.1f} (sd {spread(d):.1f}; per seed {per_seed})")


if __name__ == "__main__":
    main()
