import os

import pytest
import torch

# The suite runs on 2 cores next to DataLoader workers: keep torch to one thread per process.
torch.set_num_threads(1)
os.environ.setdefault("MPLBACKEND", "Agg")


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
