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
