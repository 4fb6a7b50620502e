"""Smoke test: the augmentation throughput benchmark runs tiny and writes its JSON."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "augment_throughput.py"


def _load():
    spec = importlib.util.spec_from_file_location("augment_throughput", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_tiny_run_writes_json(tmp_path):
    out = tmp_path / "res.json"
    rows = _load().main(["--sizes", "16", "--strategies", "simclr", "massrl", "--batch", "8",
                         "--per-image-images", "4", "--out", str(out)])
    data = json.loads(out.read_text())
    assert len(rows) == 2 == len(data["results"])
    for row in data["results"]:
        assert row["per_image_img_s"] > 0 and row["batched_img_s"] > 0 and row["ratio"] > 0
        # alternating repeats, medians reported
        assert len(row["pair_ratios"]) == len(row["per_image_runs"]) == 3
        assert min(row["per_image_runs"]) <= row["per_image_img_s"] <= max(row["per_image_runs"])
        assert row["per_image_faults_per_img"] >= 0 and row["batched_faults_per_img"] >= 0
    assert data["results"][1]["views_per_image"] == 8
    assert data["meta"]["threads"] == 1 and data["meta"]["repeats"] == 3
