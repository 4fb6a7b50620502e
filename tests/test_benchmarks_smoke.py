"""Smoke tests: the quality and training-throughput benchmarks run in their tiniest configuration
and write their result files (no timing assertions)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str) -> ModuleType:
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def fashion_mnist_present() -> None:
    from massrl.config import DataConfig
    from massrl.data import DatasetNotFoundError, load_dataset

    try:
        load_dataset(DataConfig(name="fashion_mnist", subset=10), 0)
    except DatasetNotFoundError:
        pytest.skip("Fashion-MNIST (Debian package dataset-fashion-mnist) is not installed")


def test_quality_tiny_run_writes_results(tmp_path, fashion_mnist_present):
    out, docs = tmp_path / "results", tmp_path / "docs"
    _load("quality").main([
        "--quick", "--methods", "byol", "massrl_random", "--epochs", "1", "--subset", "64",
        "--eval-subset", "100", "--offline-subset", "100", "--batch-size", "32", "--width", "4",
        "--num-workers", "0", "--linear-epochs", "1", "--runs-dir", str(tmp_path / "runs"),
        "--out-dir", str(out), "--docs", str(docs),
    ])
    data = json.loads((out / "quality_quick.json").read_text())
    assert [r["method"] for r in data["runs"]] == ["byol", "massrl_random"]
    for run in data["runs"]:
        assert len(run["curve"]) == 1 and 0 <= run["linear_top1"] <= 1
    assert set(data["baselines"]) == {"random_init", "raw_pixels"}
    assert (out / "quality_quick.csv").read_text().count("\n") == 3
    assert (docs / "quality_curves_quick.png").stat().st_size > 0
    assert "quality-quick:start" in (docs / "benchmarks.md").read_text()


def test_train_throughput_tiny_run_writes_results(tmp_path, fashion_mnist_present):
    out = tmp_path / "tp.json"
    _load("train_throughput").main([
        "--quick", "--methods", "byol", "--levers", "--batches", "2", "--epochs", "1",
        "--batch-size", "16", "--width", "4", "--lightly-repeats", "1", "--lightly-path",
        str(tmp_path / "no-lightly-here"), "--out", str(out), "--docs", str(tmp_path / "docs"),
    ])
    data = json.loads(out.read_text())
    rows = [r for r in data["results"] if r["kind"] == "massrl"]
    assert rows and all("error" not in r and r["images_per_s"] > 0 for r in rows)
    assert rows[0]["peak_rss_mib"] > 0
    assert "throughput-quick:start" in (tmp_path / "docs" / "benchmarks.md").read_text()


def test_feed_rate_tiny_run_writes_json(tmp_path):
    """Engine vs BYOL step images/s, on the CPU with a tiny backbone and batch."""
    out = tmp_path / "feed.json"
    res = _load("feed_rate").main(["--device", "cpu", "--size", "16", "--batch", "4",
                                   "--backbone", "resnet18", "--repeats", "2", "--out", str(out),
                                   "--profile", str(tmp_path / "profile.txt")])
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(res))
    assert "Self CPU time total" in (tmp_path / "profile.txt").read_text()
    assert [(e["view_set"], e["mode"], e["views_per_image"]) for e in data["engine"]] == [
        ("massrl", "default", 8), ("massrl_random", "default", 2), ("simclr", "default", 2),
        ("massrl", "full", 8), ("massrl_random", "full", 2), ("simclr", "full", 2)]
    assert not any(e["planned"] for e in data["engine"])  # the CPU plans for itself
    assert data["step"]["views_per_image"] == 2 and len(data["step"]["runs_s"]) == 2
    for e in data["engine"]:
        assert e["img_s"] > 0 and e["vs_step"] == pytest.approx(e["img_s"] / data["step"]["img_s"])


def test_feed_rate_records_a_failed_compile(tmp_path, monkeypatch):
    """--compile: a compile that fails is recorded in its row, after the step and eager rows."""
    def no_compiler(fn, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", no_compiler)
    out = tmp_path / "feed.json"
    _load("feed_rate").main(["--device", "cpu", "--size", "16", "--batch", "4", "--backbone",
                             "resnet18", "--repeats", "1", "--compile", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["step"]["img_s"] > 0
    assert [(e["view_set"], e["mode"]) for e in data["engine"]] == [
        (v, m) for m in ("default", "full", "compiled")
        for v in ("massrl", "massrl_random", "simclr")]
    assert all(e["img_s"] > 0 for e in data["engine"][:6])
    assert all("no compiler here" in e["error"] for e in data["engine"][6:])


def test_full_mode_traffic_counts_ops_and_bytes(tmp_path):
    out = tmp_path / "traffic.json"
    r = _load("full_mode_traffic").main(["--size", "16", "--batch", "2", "--out", str(out)])
    assert json.loads(out.read_text())["views"] == r["views"] == 16  # 2 images x 8 views
    families = r["per_family"]
    assert {"hue", "blur", "warp", "equalize"} <= families.keys()
    assert all(f["calls"] > 0 and f["aten_ops"] > 0 and f["mb_per_view"] > 0
               for f in families.values())
    # the whole call also loads, normalises and flips: more than the families alone
    assert r["mb_per_view"] > sum(f["mb_per_view"] for f in families.values())
    assert r["aten_ops"] > sum(f["aten_ops"] for f in families.values())
    # each view is at least loaded, normalised and written out
    assert r["passes_per_view"] == pytest.approx(r["mb_per_view"] / (3 * 16 * 16 * 4 / 1e6))
    assert r["passes_per_view"] > 2
    # the host-planned grouped mode runs each family on its images only: fewer bytes
    planned = _load("full_mode_traffic").main(["--size", "16", "--batch", "2", "--planned"])
    assert planned["planned"] and 2 < planned["passes_per_view"] < r["passes_per_view"]


def test_engine_ab_against_head_runs(tmp_path):
    """The in-process A/B harness loads HEAD's engine beside the working tree's and times both."""
    import subprocess

    root = BENCH.parent
    if subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True).returncode:
        pytest.skip("not a git checkout")
    res = _load("engine_ab").main(["--against", "HEAD", "--size", "16", "--batch", "8",
                                   "--rounds", "2", "--strategy", "simclr"])
    assert res["old_s"] > 0 and res["new_s"] > 0 and len(res["round_ratios"]) == 2
    assert res["new_over_old"] == pytest.approx(res["new_s"] / res["old_s"])


def test_engine_ab_pipeline_times_both_backends(tmp_path):
    """--pipeline: each revision's crops + collate + engine and the per-image backend, per round."""
    import json
    import subprocess

    root = BENCH.parent
    if subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True).returncode:
        pytest.skip("not a git checkout")
    out = tmp_path / "ab.json"
    res = _load("engine_ab").main(["--against", "HEAD", "--size", "16", "--batch", "8",
                                   "--rounds", "2", "--pipeline", "--out", str(out)])
    assert all(len(v) == 2 and min(v) > 0 for v in res["runs"].values())
    assert res["ratio_new"] == pytest.approx(res["img_s"]["new"] / res["img_s"]["per_image"])
    saved = json.loads(out.read_text())
    assert saved["command"].endswith("--out " + str(out)) and saved["img_s"] == res["img_s"]


@pytest.mark.parametrize("kernels", ["numba", "torch"])
def test_engine_profile_accounts_for_the_engine_call(tmp_path, kernels):
    if kernels == "numba":
        pytest.importorskip("numba")
    out = tmp_path / "profile.json"
    res = _load("engine_profile").main(["--size", "24", "--batch", "16", "--rounds", "2",
                                        "--kernels", kernels, "--out", str(out)])
    assert json.loads(out.read_text())["engine_s"] == res["engine_s"]
    fams = res["per_family"]
    # the full MASSRL view set draws from every family but the whole-pixel translation's rivals
    assert {"warp", "hue", "blur", "gray_blend", "equalize"} <= set(fams)
    assert all(f["calls"] > 0 and f["s"] >= 0 for f in fams.values())
    assert 0 < res["families_s"] <= res["engine_s"]
    assert res["outside_families_s"] >= 0
    assert res["dense_runs"] > 0
    # the numba kernels skip identity images, so every family runs on whole chunks; the torch
    # ops gather the images that drew a family when they are few
    assert (res["gathered_runs"] == 0) == (kernels == "numba")


def test_jpeg_decode_compares_full_and_reduced_decoding(tmp_path):
    out = tmp_path / "jpeg.json"
    r = _load("jpeg_decode").main(["--photos", "640x480", "--sizes", "32", "--seconds", "0.1",
                                    "--out", str(out)])
    assert json.loads(out.read_text()) == r
    rows = {row["pipeline"]: row for row in r["rows"]}
    assert rows.keys() == {"per_image massrl (2 views)", "batched crops (2 views)", "eval"}
    # crops need ceil(32 / sqrt(0.08 x 3/4)) = 131 px: 480 // 131 = 3 -> the 1/2 scale
    assert rows["batched crops (2 views)"]["source_side"] == 131
    assert rows["batched crops (2 views)"]["decoded"] == [320, 240]
    # the test resize of 32 px is 32: 480 // 32 = 15 -> the 1/8 scale
    assert rows["eval"]["decoded"] == [80, 60]
    assert all(row["full_items_per_s"] > 0 and row["reduced_items_per_s"] > 0
               for row in rows.values())
