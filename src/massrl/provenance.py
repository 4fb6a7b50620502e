"""What a result was made with, beyond its config: the versions of the packages that can change
its numbers (torch's kernels, Lightning's loops, timm's models, numba's fused augmentation
kernels) and, in a git checkout of massrl, its commit."""

from __future__ import annotations

import subprocess
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from massrl.devices import augment_backend, run_num_workers

if TYPE_CHECKING:
    import lightning as L

    from massrl.config import RunConfig
    from massrl.methods import SSLMethod

PACKAGES = ("massrl", "torch", "torchvision", "lightning", "timm", "numpy", "pillow", "numba",
            "scikit-learn", "umap-learn")


@cache
def package_versions() -> dict[str, str | None]:
    """Installed versions (None: not installed)."""
    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return {name: version(name) for name in PACKAGES}


@cache
def source_commit() -> str | None:
    """The git commit of the massrl source that runs, with `+changes` when its files differ from
    it; None where it is not a file of a git checkout (an installed wheel, also one inside some
    other project's repository)."""
    here = Path(__file__).resolve()
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", "--no-optional-locks", "-C", str(here.parent), *args],
                                  capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()

        git("ls-files", "--error-unmatch", here.name)  # (fails where this file is not tracked)
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", "."))
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+changes" if dirty else "")


@cache
def running_commit() -> str | None:
    """source_commit() of this process's code, asked once (checkpoints record it at each save)."""
    return source_commit()


def code_change_note(ckpt: dict[str, Any]) -> str | None:
    """A note when a checkpoint was written by other massrl code than the one running (both
    known: a git checkout's commits): a resumed run goes on with this code, and its figures may
    differ from those the earlier code would have given."""
    then, now = (ckpt.get("massrl") or {}).get("commit"), running_commit()
    if not then or not now or then == now:
        return None
    def short(commit: str) -> str:
        return commit[:12] + ("+changes" if commit.endswith("+changes") else "")

    return (f"note: the checkpoint was written by massrl {short(then)}, this is {short(now)}: "
            "the run goes on with this code (its figures may differ from the earlier code's; "
            "summary.json records this one)")


def runtime(trainer: L.Trainer, module: SSLMethod) -> dict[str, Any]:
    """What the run's device-dependent settings became (config.yaml keeps them as written):
    the figures of two runs compare only when these match."""
    device = trainer.strategy.root_device.type
    return {"device": device, "world_size": trainer.world_size, "precision": trainer.precision,
            "num_workers": run_num_workers(module.cfg), "channels_last": module.channels_last,
            "augment_backend": augment_backend(module.cfg), "compile": module.cfg.trainer.compile,
            "cpu_threads": torch.get_num_threads() if device == "cpu" else None,
            "cpu_kernels": _cpu_kernels(module.cfg) if device == "cpu" else None,
            "torch_version": torch.__version__, "versions": package_versions(),
            "massrl_commit": source_commit()}


def _cpu_kernels(cfg: RunConfig) -> str | None:
    """What the batched engine ran its ops as on the CPU (numba kernels and torch ops agree
    per op within 2e-6, which training grows into other weights)."""
    if augment_backend(cfg) != "batched":
        return None
    from massrl.augment.batched.families import use_cpu_kernels

    return "numba" if use_cpu_kernels(cfg.augment.cpu_kernels) else "torch"
