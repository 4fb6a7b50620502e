"""The augmentation picture: one row per image, the original then each view with its label."""

from __future__ import annotations

import textwrap
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from matplotlib.figure import Figure  # files only, without pyplot: the caller's backend stays
from torch.utils.data import Dataset

from massrl.config import RunConfig
from massrl.data.datasets import UnusableDataError
from massrl.data.images import decode_at_least
from massrl.devices import augment_backend
from massrl.files import picture_path, save_figure

if TYPE_CHECKING:
    from massrl.data import DatasetSplits


def _pick_images(dataset: Dataset, num_images: int, seed: int) -> list:
    """num_images decodable images drawn with a fixed seed (bad files are passed over)."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    images = []
    for i in order:
        item = dataset[i]
        if item is not None:
            images.append(item[0])
        if len(images) == num_images:
            break
    if not images:
        raise UnusableDataError(f"none of the {len(dataset)} images of the dataset could be "
                                "decoded (see the warnings above): nothing to draw")
    return images


def _thumbnail(img, side: int = 256):
    """A PIL image no larger than `side` (a figure cell is under 200 px wide)."""
    if hasattr(img, "thumbnail") and max(img.size) > side:
        img = img.copy()
        img.thumbnail((side, side))
    return img


def augmentation_grid(dataset: Dataset, transform, path: str | Path, num_images: int = 8,
                      title: str = "", seed: int = 0) -> Path:
    """Draw `num_images` rows: the original image, then every view `transform.sample` makes,
    titled with the view's strategy, crop and the ops applied. Returns the PNG path."""
    torch.manual_seed(seed)
    # decoded as training decodes them (a 12 MP JPEG at 1/4 scale: the views are the same, and
    # the full-size originals took 0.8 GB and seconds), the originals drawn as thumbnails
    with decode_at_least(getattr(transform, "source_side", None)):
        images = _pick_images(dataset, num_images, seed)
    rows = [transform.sample(img) for img in images]
    images = [_thumbnail(img) for img in images]
    cols = 1 + max(len(r) for r in rows)
    # constrained layout makes room for each title's lines (tight_layout let a row's labels
    # run into the row above, and the figure title into the first)
    fig = Figure(figsize=(1.9 * cols, 2.3 * len(rows)), layout="constrained")
    axes = fig.subplots(len(rows), cols, squeeze=False)
    for r, (img, views) in enumerate(zip(images, rows, strict=True)):
        axes[r][0].imshow(img)
        axes[r][0].set_title("original", fontsize=8)
        for c, view in enumerate(views, start=1):
            axes[r][c].imshow(view.image)
            label = f"{view.strategy_name} (crop {view.crop})"
            if view.ops:
                label += "\n" + textwrap.fill(", ".join(view.ops), 26, max_lines=3)
            axes[r][c].set_title(label, fontsize=6)
        for ax in axes[r]:
            ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    path = picture_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path, dpi=100)
    return path


def view_maker(cfg: RunConfig, splits: DatasetSplits, backend: str | None = None) -> tuple:
    """What draws the views of `backend` (default: the one training runs, `augment_backend`),
    and the title's note: the batched engine's views as training makes them (the backends give
    other pixels for the same draws)."""
    if (backend or augment_backend(cfg)) == "batched":
        from massrl.augment.batched.preview import BatchedPreview

        return (BatchedPreview(cfg.augment, cfg.data.image_size, splits.mean, splits.std),
                " (batched engine)")
    from massrl.augment import MultiViewTransform

    return MultiViewTransform(cfg.augment, cfg.data.image_size, splits.mean, splits.std), ""


def save_augmentation_picture(cfg: RunConfig, path: Path, splits: DatasetSplits) -> None:
    """A pre-training run's views, made by the backend it trains with. Drawn on the side: the
    random streams are left as they were, so the model's initial weights, built next, do not
    depend on the picture (how it is drawn, or whether it failed)."""
    from massrl.data import BadImageError
    from massrl.resilience import rng_state, set_rng_state

    state = rng_state()
    try:
        transform, note = view_maker(cfg, splits)
        augmentation_grid(splits.train, transform, path, num_images=6,
                          title=f"{cfg.method} views on {cfg.data.name}{note}", seed=cfg.seed)
    except Exception as exc:  # a picture must never stop a training run
        if cfg.data.strict and isinstance(exc, BadImageError):
            raise  # (unless the run is to stop at the first bad file: here is one)
        warnings.warn(f"could not draw the augmentation picture: {exc}", stacklevel=2)
    finally:
        set_rng_state(state)
