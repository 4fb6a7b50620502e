"""Load the online backbone of a massrl pre-training checkpoint, with errors a user can act on."""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ValidationError
from torch import nn

from massrl.config import ConfigError, RunConfig
from massrl.finite import first_nonfinite, nonfinite_rows
from massrl.messages import first_line
from massrl.models import BackboneSpec, build_backbone

BACKBONE_PREFIX = "backbone."


class CheckpointError(ConfigError):
    """The file given as ckpt= cannot be used (missing, not massrl's, inconsistent)."""


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """The file's sha256 (hex), read in chunks: result.json names the checkpoint by it."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_weights_only(source: Any, name: str) -> Any:
    """torch.load of tensors and plain data only: a full unpickle runs whatever code the file
    carries, and checkpoints are shared and downloaded. (massrl's and Lightning's checkpoints
    hold nothing else: Lightning resumes so too.)"""
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unpickling failure means "not a checkpoint"
        if "Weights only load failed" in str(exc):
            raise CheckpointError(
                f"'{name}' holds Python objects besides tensors and plain data, which massrl "
                "does not unpickle (that can run code the file carries): a checkpoint "
                "`massrl pretrain` writes holds none. Only if you trust where it came from, "
                "load it in Python with torch.load(path, weights_only=False) and save its "
                "tensors and plain values again.") from None
        raise CheckpointError(
            f"'{name}' is truncated or not a PyTorch checkpoint ({first_line(exc)}).") from None


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The raw checkpoint dict, after checking that it is a massrl pre-training checkpoint."""
    p = Path(path)
    if p.is_dir():
        inside = next((c for c in (p / "checkpoints" / "last.ckpt", p / "last.ckpt")
                       if c.is_file()), None)
        hint = f" Did you mean {inside}?" if inside else ""
        raise CheckpointError(f"checkpoint '{path}' is a directory, not a checkpoint file.{hint}")
    if not p.is_file():
        raise CheckpointError(
            f"checkpoint '{path}' not found. Pass ckpt=PATH to a checkpoint written by "
            "`massrl pretrain` (e.g. runs/<run>/version_0/checkpoints/last.ckpt)."
        )
    if p.stat().st_size == 0:
        raise CheckpointError(f"checkpoint '{path}' is an empty file (0 bytes).")
    ckpt = load_weights_only(p, str(path))
    if not isinstance(ckpt, dict) or "massrl" not in ckpt:
        hint = ""
        if isinstance(ckpt, dict) and ckpt and all(torch.is_tensor(v) for v in ckpt.values()):
            hint = " It looks like a plain state_dict (e.g. from `massrl export`)."
        raise CheckpointError(
            f"'{path}' is not a massrl pre-training checkpoint (no 'massrl' marker).{hint} "
            "Pass a checkpoint written by `massrl pretrain`."
        )
    return ckpt


def checkpoint_config(ckpt: dict[str, Any], path: str | Path = "checkpoint") -> RunConfig:
    """The run config a checkpoint was pre-trained with (CheckpointError when it has none, or
    one this massrl version cannot read)."""
    raw = (ckpt.get("hyper_parameters") or {}).get("config")
    if isinstance(raw, BaseModel):
        raw = raw.model_dump(mode="json")
    if not isinstance(raw, dict):
        raise CheckpointError(f"'{path}' has no run config under hyper_parameters.config.")
    if raw.get("plugins"):  # (its code runs here: said, as it comes from the file)
        print(f"note: importing the plugins '{path}' names: {raw['plugins']}", file=sys.stderr)
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()
        )
        if raw.get("plugins") and "plugin" in problems:  # its own code is not importable here
            raise CheckpointError(
                f"'{path}' was pre-trained with plugins {raw['plugins']}, which this massrl "
                f"cannot import: {problems.removeprefix(': Value error, ')}") from None
        raise CheckpointError(
            f"the run config stored in '{path}' is not valid for this massrl version: {problems}"
        ) from None


def backbone_state_dict(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The online backbone's weights, with their `backbone.` prefix removed (the EMA target's
    and the heads' are left out)."""
    state = ckpt.get("state_dict") or {}
    return {k[len(BACKBONE_PREFIX):]: v for k, v in state.items() if k.startswith(BACKBONE_PREFIX)}


@dataclass
class Pretrained:
    """A pre-trained backbone with what evaluation needs to know about it."""

    backbone: nn.Module
    config: RunConfig
    spec: BackboneSpec
    sha256: str
    path: Path
    meta: dict[str, Any]  # ckpt["massrl"]: version and whatever pre-training recorded
    # how far pre-training had got when it was saved: Lightning's epoch index (from 0, as in
    # best-knn-E.ckpt), optimizer steps, images (None: not recorded): a run resumed in place
    # replaces last.ckpt, and result.json must say which state it measured
    trained: dict[str, int | None]


def load(path: str | Path) -> Pretrained:
    """The online backbone of a `massrl pretrain` checkpoint, in eval mode on the CPU, with its
    run config: `load(p).backbone(images)` gives features ([N, feature_dim]) of images
    normalised as `load(p).meta["data"]` (mean, std, image_size) says."""
    ckpt = read_checkpoint(path)
    meta = ckpt["massrl"] if isinstance(ckpt["massrl"], dict) else {}
    trained = {"epoch": ckpt.get("epoch"), "global_step": ckpt.get("global_step"),
               "images_seen": meta.get("images_seen")}
    return Pretrained(*_load(ckpt, path), Path(path), dict(meta), trained)


def load_pretrained(path: str | Path) -> tuple[nn.Module, RunConfig, BackboneSpec, str]:
    """(backbone in eval mode on CPU, run config, backbone spec, sha256 of the file)."""
    return _load(read_checkpoint(path), path)


def _load(ckpt: dict[str, Any], path: str | Path) -> tuple[nn.Module, RunConfig, BackboneSpec, str]:
    cfg = checkpoint_config(ckpt, path)
    m = cfg.model
    # (its initial weights, replaced next, would draw from the caller's torch stream)
    with torch.random.fork_rng(devices=[]):
        backbone, spec = build_backbone(m.backbone, m.cifar_stem, m.width, cfg.data.image_size,
                                        m.kwargs)
    weights = backbone_state_dict(ckpt)
    if not weights:
        raise CheckpointError(f"'{path}' holds no backbone weights (no 'backbone.*' keys).")
    try:
        backbone.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"the backbone weights in '{path}' do not match model.backbone={m.backbone} "
            f"cifar_stem={m.cifar_stem} width={m.width}: {_first_problem(exc)}"
        ) from None
    bad = first_nonfinite(backbone.state_dict().items())  # (batch-norm statistics too)
    if bad is not None:  # (its features were all NaN: kNN and linear scored 0.00 % in silence)
        raise CheckpointError(
            f"the backbone weights in '{path}' hold NaN/inf (first: {bad}): the pre-training "
            "had diverged when this checkpoint was saved. Evaluate an earlier checkpoint of the "
            "run (checkpoints/best-knn-*.ckpt, epoch-*.ckpt).")
    backbone.eval()
    return backbone, cfg, spec, file_sha256(path)


def check_finite_features(feats: torch.Tensor, what: str, path: str | Path) -> None:
    """CheckpointError when features of a checkpoint's backbone hold NaN/inf: finite weights
    too large for the forward pass (kNN scored such features 0.00 %, a linear head trained on)."""
    bad = nonfinite_rows(feats)
    if bad:
        raise CheckpointError(
            f"the backbone of '{path}' gives NaN/inf features for {bad} of {len(feats)} {what}: "
            "its weights are finite but too large (the pre-training was diverging when it was "
            "saved). Evaluate an earlier checkpoint of the run.")


def _first_problem(exc: RuntimeError, keys_shown: int = 3) -> str:
    """The first line of load_state_dict's report that names a key (its first line is only
    'Error(s) in loading state_dict for ...:'), with at most `keys_shown` of the keys it lists
    (a whole backbone's missing keys make one line of several kilobytes)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    line = next((line for line in lines[1:]), lines[0] if lines else type(exc).__name__)
    head, sep, listed = line.partition(": ")
    keys = listed.rstrip(".").split(", ") if sep and listed.startswith('"') else []
    if len(keys) <= keys_shown:
        return line
    return f"{head}: {', '.join(keys[:keys_shown])} and {len(keys) - keys_shown} more"
