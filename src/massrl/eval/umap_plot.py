"""UMAP pictures of backbone features, one colour per class (umap-learn + matplotlib)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from massrl.extras import require
from massrl.files import save_figure


def _umap_module():
    import os

    require("umap", "a UMAP picture")
    if "NUMBA_THREADING_LAYER" not in os.environ:
        import numba

        # numba's default OpenMP layer leaves spinning threads that slowed later torch work in
        # the same process 10-25x on a 2-core machine; the workqueue layer does not spin.
        numba.config.THREADING_LAYER = "workqueue"
    import umap

    return umap


def embed(
    features: torch.Tensor | np.ndarray, *, seed: int = 0, n_neighbors: int = 15,
    min_dist: float = 0.1, n_epochs: int | None = None,
) -> np.ndarray:
    """2-D UMAP of L2-normalised features (so euclidean neighbours are cosine neighbours)."""
    x = torch.as_tensor(features, dtype=torch.float32)
    x = torch.nn.functional.normalize(x.flatten(1), dim=1).numpy()
    reducer = _umap_module().UMAP(
        n_components=2, n_neighbors=min(n_neighbors, len(x) - 1), min_dist=min_dist,
        n_epochs=n_epochs, random_state=seed, n_jobs=1,  # seeded UMAP runs single-threaded
        # the spectral start needs more points than eigenvectors (a handful of points failed)
        init="spectral" if len(x) > 10 else "random",
    )
    return reducer.fit_transform(x)


def _colours(n: int) -> list:
    from matplotlib import colormaps

    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    if n <= 20:
        return [colormaps["tab20"](i) for i in range(n)]
    return [colormaps["turbo"](i / max(n - 1, 1)) for i in range(n)]


def save_umap(
    features: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray | Sequence[int],
    classes: Sequence[str] | None, title: str, path: str | Path, *, seed: int = 0,
    n_neighbors: int = 15, min_dist: float = 0.1, n_epochs: int | None = None,
    max_points: int | None = None,
) -> Path:
    """Embed `features` with UMAP and save a scatter plot coloured by label as a PNG at `path`.

    `max_points` keeps a seeded class-balanced subset (UMAP time grows with the point count).
    """
    labels_np = np.asarray(torch.as_tensor(labels).cpu(), dtype=np.int64)
    feats = torch.as_tensor(features).cpu()
    if max_points is not None and len(labels_np) > max_points:
        from massrl.data import balanced_subset

        keep = balanced_subset(labels_np.tolist(), max_points, seed)
        feats, labels_np = feats[keep], labels_np[keep]
    if len(labels_np) < 3:
        raise ValueError(f"a UMAP picture needs at least 3 points, got {len(labels_np)}")
    xy = embed(feats, seed=seed, n_neighbors=n_neighbors, min_dist=min_dist, n_epochs=n_epochs)
    present = np.unique(labels_np)
    num = int(present.max()) + 1
    names = list(classes) if classes is not None else [str(c) for c in range(num)]
    colours = _colours(max(num, len(names)))
    fig = Figure(figsize=(8, 7), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for c in present:
        m = labels_np == c
        name = names[c] if c < len(names) else str(c)
        ax.scatter(xy[m, 0], xy[m, 1], s=4, color=colours[c], label=name, alpha=0.8)
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(markerscale=3, fontsize="small", loc="center left", bbox_to_anchor=(1.0, 0.5),
              ncol=1 if len(present) <= 25 else 2, frameon=False)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path)
    return path
