import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# The suite runs on 2 cores next to DataLoader workers: one torch thread per process, the
# `massrl` commands that tests start in processes of their own included (set before torch is
# imported; with 2 threads on 2 shared cores a tiny pre-training took twice as long)
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
# evaluations' cached features go to a folder of the session's, not the user's ~/.cache (where
# a later session would find them and skip the feature pass a test means to run)
if "MASSRL_CACHE" not in os.environ:
    os.environ["MASSRL_CACHE"] = tempfile.mkdtemp(prefix="massrl-tests-cache-")
    atexit.register(shutil.rmtree, os.environ["MASSRL_CACHE"], True)

import lightning  # noqa: E402,F401  (see below)
import pytest  # noqa: E402
import torch  # noqa: E402

# Lightning's logging handlers keep the sys.stderr of the moment it is first imported: imported
# inside a test that captures output, they write to a closed stream in later tests
torch.set_num_threads(1)


@pytest.hookimpl(optionalhook=True)  # (without pytest-xdist the hook is unknown: not an error)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto`: one test process per core this process may use, at most 4 (each imports torch
    and Lightning, and many tests start training processes of their own)."""
    from massrl.devices import usable_cores

    return min(4, usable_cores())


def run_python(code: str, *args: str, timeout: int = 300, **kwargs) -> subprocess.CompletedProcess:
    """`python -c code args...` in a process of its own, its output captured as text."""
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=timeout, **kwargs)


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
