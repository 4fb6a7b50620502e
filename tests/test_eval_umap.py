"""UMAP picture: a PNG is written for a handful of labelled points."""

import pytest
import torch

from massrl.eval.umap_plot import save_umap

pytest.importorskip("umap")


def test_save_umap_writes_png(tmp_path):
    g = torch.Generator().manual_seed(0)
    feats = torch.cat([torch.randn(20, 8, generator=g) + 4 * i for i in range(3)])
    labels = torch.arange(3).repeat_interleave(20)
    path = save_umap(feats, labels, ["a", "b", "c"], "byol - toy.ckpt", tmp_path / "u" / "x.png",
                     n_epochs=20, n_neighbors=5, max_points=45)
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_umap_pictures_are_left_out_of_the_epochs_time_and_speed(tiny, monkeypatch, capsys):
    """eval.umap_every: the picture (its first one waits for umap-learn's compilation) is for
    looking at; a run's seconds and images/s count training and the kNN check only."""
    import json
    import time
    from pathlib import Path

    import massrl.eval.umap_plot
    from massrl.cli import main

    monkeypatch.setattr(massrl.eval.umap_plot, "save_umap", lambda *a, **k: time.sleep(5))
    args = tiny("byol", **{"eval.umap_every": "1", "trainer.progress_bar": "true"})
    assert main(["pretrain", *args]) == 0
    out = Path(next(a for a in args if a.startswith("output_dir=")).split("=", 1)[1])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_seconds"] + 5 <= summary["wall_seconds"]
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("epoch 1/1"))
    assert float(line.split()[-2]) <= summary["train_seconds"] + 0.5  # (rounded to 1 s)


def test_umap_pictures_are_named_by_the_epochs_trained(tiny, monkeypatch):
    """With knn_every=2 in a 3-epoch run the validation after fit drew 'epoch_0004.png' (it
    runs at current_epoch = max_epochs); umap_every that no kNN check meets drew nothing."""
    from pathlib import Path

    import massrl.eval.umap_plot
    from massrl.cli import main

    drawn = []
    monkeypatch.setattr(massrl.eval.umap_plot, "save_umap",
                        lambda feats, labels, classes, title, path, **k: drawn.append(
                            (Path(path).name, title.rsplit(", ", 1)[-1])))
    args = tiny("byol", **{"eval.umap_every": "2", "eval.knn_every": "2",
                           "trainer.max_epochs": "3", "data.subset": "64"})
    assert main(["pretrain", *args]) == 0
    assert drawn == [("epoch_0002.png", "epoch 2")]  # (epoch 3: not a multiple of 2)
    # (a setting no kNN check meets: tests/test_config.py)


def test_a_log_gets_a_line_within_a_long_epoch_and_check(tiny, monkeypatch, capsys):
    """Written to a file, a run printed one line per epoch: an ImageNet epoch's log stayed
    empty for an hour, a 100k-image kNN bank's check for minutes."""
    import massrl.loggers
    from massrl.cli import main

    monkeypatch.setattr(massrl.loggers, "PROGRESS_EVERY_S", 0.0)  # (a line at every batch)
    assert main(["pretrain", *tiny("byol", **{"trainer.progress_bar": "true"})]) == 0
    lines = capsys.readouterr().out.splitlines()
    training = [x for x in lines if x.startswith("epoch 1/1:  batch ")]
    assert training and training[-1].split()[3] in ("4/4", "8/8")  # ("batch b/B")
    assert "  loss " in training[-1]
    assert any(x.startswith("epoch 1/1:  validation, kNN bank: batch 1/") for x in lines)
    assert any(x.startswith("epoch 1/1:  validation, test split: batch 1/") for x in lines)
