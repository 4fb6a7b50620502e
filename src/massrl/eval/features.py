"""Frozen backbone features: extraction in eval mode and a disk cache, and the linear probe's
train transform.

The cache key holds everything that changes the features (checkpoint hash, dataset, split, subset,
transform), so a cached file can never be reused for a different setting.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from massrl.data.eval_transform import channel_stats
from massrl.data.images import as_rgb
from massrl.data.loading import make_loader
from massrl.files import atomic_write


def resolve_device(name: str = "auto") -> torch.device:
    """device=auto: a CUDA GPU, else an Apple GPU (MPS), else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else
                            "mps" if torch.backends.mps.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda was asked for but no CUDA GPU is visible; use device=cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device=mps was asked for but torch sees no Apple GPU (MPS); use "
                         "device=cpu")
    return torch.device(name)


def train_transform(
    image_size: int, mean: Sequence[float], std: Sequence[float],
    crop_scale: tuple[float, float] = (0.08, 1.0),
) -> T.Compose:
    mean, std = channel_stats(mean, std)
    return T.Compose([
        as_rgb, T.RandomResizedCrop(image_size, scale=crop_scale), T.RandomHorizontalFlip(),
        T.ToTensor(), T.Normalize(mean, std),
    ])


def unpack(batch: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(images, labels) of a batch from collate_skip_bad or a plain (x, y) loader; None when every
    item of the batch was undecodable."""
    if isinstance(batch, dict):
        if "image" not in batch:
            return None
        return batch["image"], torch.as_tensor(batch["label"], dtype=torch.long)
    x, y = batch
    return x, torch.as_tensor(y, dtype=torch.long)


def progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeRemainingColumn(), transient=True,
    )


# seconds between the lines a feature extraction writes to a file (a live bar in a terminal)
PROGRESS_EVERY_S = 60.0


def progress_line(*parts: str) -> None:
    """One line of progress where the live bar shows nothing: output written to a file (a batch
    job's log), which would otherwise stay empty until the command ends."""
    if not sys.stdout.isatty():
        print("  ".join(parts), flush=True)


def on_device(x: torch.Tensor, device: torch.device | str, channels_last: bool = False
              ) -> torch.Tensor:
    """A batch of images for a forward pass without gradients, `channels_last` on the CPU:
    oneDNN's convolutions then skip their layout reorders (a ResNet-18's features 1.5x faster).
    The result depends on the input's layout only, not the weights' (which stay as they are)."""
    if channels_last and torch.device(device).type == "cpu" and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x.to(device, non_blocking=True)


@torch.no_grad()
def extract_features(
    backbone: nn.Module, loader: DataLoader, device: torch.device | str = "cpu",
    desc: str = "features", channels_last: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features float32, labels int64) on CPU, computed in eval mode (BN running statistics);
    `channels_last`: see on_device."""
    was_training = backbone.training
    backbone.eval().to(device)
    feats, labels = [], []
    start = said = time.perf_counter()
    try:
        with progress() as bar:
            task = bar.add_task(desc, total=len(loader))
            for done, batch in enumerate(loader, 1):
                bar.advance(task)
                if time.perf_counter() - said >= PROGRESS_EVERY_S and done < len(loader):
                    said = time.perf_counter()  # (a long extraction's log is not left empty)
                    progress_line(f"{desc}: {done}/{len(loader)} batches",
                                  f"{said - start:.0f} s")
                if (xy := unpack(batch)) is None:
                    continue
                x = on_device(xy[0], device, channels_last)
                feats.append(backbone(x).float().flatten(1).cpu())
                labels.append(xy[1])
    finally:
        backbone.train(was_training)
    if not feats:
        raise ValueError(f"no images to compute {desc} from (empty dataset)")
    progress_line(f"{desc}: {sum(len(y) for y in labels)} images",
                  f"{time.perf_counter() - start:.0f} s")
    return torch.cat(feats), torch.cat(labels)


def default_cache_dir() -> Path:
    root = os.environ.get("MASSRL_CACHE") or Path.home() / ".cache" / "massrl"
    return Path(root) / "features"


def cache_path(cache_dir: str | Path | None, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    name = f"{key.get('ckpt_sha256', 'nockpt')[:12]}_{key.get('split', 'split')}_{digest[:16]}.pt"
    return Path(cache_dir or default_cache_dir()) / name


def cached_features(
    backbone: nn.Module, dataset: Dataset, key: dict[str, Any], *,
    cache_dir: str | Path | None = None, use_cache: bool = True,
    device: torch.device | str = "cpu", batch_size: int = 256, num_workers: int = 0,
    pin_memory: bool = True, channels_last: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of `dataset` (`labeled_images` items), read from / written to the cache by `key`."""
    path = cache_path(cache_dir, key)
    if use_cache and path.is_file():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            return saved["features"], saved["labels"]
        except Exception as exc:  # noqa: BLE001 - a damaged cache entry is only a miss
            _cache_warning(f"ignoring the unreadable cached features {path} "
                           f"({type(exc).__name__}); computing them again")
    loader = make_loader(dataset, batch_size, num_workers=num_workers, device=device,
                         pin_memory=pin_memory)
    feats, labels = extract_features(backbone, loader, device, f"features ({key.get('split')})",
                                     channels_last)
    if use_cache:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # (a crash never leaves a truncated cache file behind; two evaluations of one
            # checkpoint may write it together)
            with atomic_write(path, shared=True) as f:
                torch.save({"features": feats, "labels": labels,
                            "key": json.dumps(key, default=str)}, f)
        except OSError as exc:  # the evaluation goes on without its cache
            _cache_warning(f"could not cache the features in {path.parent}: {exc.strerror or exc}"
                           " (cache_dir=DIR chooses another place, cache=false none)")
    return feats, labels


def _cache_warning(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)
