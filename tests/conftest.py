import os
from pathlib import Path

import pytest
import torch

# The suite runs on 2 cores next to DataLoader workers: keep torch to one thread per process.
torch.set_num_threads(1)
os.environ.setdefault("MPLBACKEND", "Agg")


def class_folder(root: Path, per_class: int = 20, classes: tuple[str, ...] = ("a", "b"),
                 size: int = 16) -> Path:
    """`root/<class>/<i>.png`: small distinct images, one sub-folder per class (no val/, so a
    run splits them into train and held-out)."""
    from PIL import Image

    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (size, size), (5 * i, 200 * c, 90)).save(root / name / f"{i}.png")
    return root


def tiny_overrides(tmp_path, method: str = "massrl", **extra: str) -> list[str]:
    """A pre-training run on scikit-learn's digits that takes seconds on a CPU."""
    items = {
        "data.name": "digits", "data.image_size": "16", "data.batch_size": "32",
        "data.subset": "128", "data.eval_subset": "64", "data.num_workers": "0",
        "model.width": "8", "model.proj_hidden_dim": "32", "model.proj_output_dim": "16",
        "model.pred_hidden_dim": "32", "trainer.max_epochs": "1", "trainer.progress_bar": "false",
        "trainer.precision": "32-true", "optimizer.warmup_epochs": "0",
        "output_dir": str(tmp_path / f"run_{method}"),
    }
    items.update(extra)
    return [f"{k}={v}" for k, v in items.items()]


@pytest.fixture
def tiny(tmp_path):
    return lambda method="massrl", **extra: tiny_overrides(tmp_path, method, **extra)


@pytest.fixture
def split_folders(tmp_path):
    """Makes `<tmp>/<name>/{train,val}/{a,b}/` holding `per_class` small PNGs each, and with
    `broken` one file per class folder that is no image."""
    from PIL import Image

    def make(name: str = "pics", per_class: int = 8, size: int = 16, broken: bool = False):
        root = tmp_path / name
        for split in ("train", "val"):
            for c, cls in enumerate(("a", "b")):
                folder = root / split / cls
                folder.mkdir(parents=True)
                for i in range(per_class):
                    Image.new("RGB", (size, size), (20 * i, 200 * c, 90)).save(folder / f"{i}.png")
                if broken:
                    (folder / "broken.png").write_bytes(b"not an image")
        return root

    return make
