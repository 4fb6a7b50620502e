"""Export the backbone as a plain state_dict plus a JSON manifest, loadable without massrl.

The weights are the timm model's own state_dict (no prefix, no classifier), so they load into
`timm.create_model(name, num_classes=0, **timm_kwargs)` after the recorded stem change; timm and
torchvision ResNets share parameter names, so width-64 ResNets also load into
`torchvision.models.resnetXX()` with `fc = Identity()`. The export checks that claim on the spot.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from massrl.config import ConfigError
from massrl.data.eval_transform import test_resize
from massrl.files import atomic_write, write_text
from massrl.models import BackboneSpec
from massrl.models.backbones import apply_cifar_stem, feature_dim

FORMAT = "massrl-backbone/1"
# timm names whose weights torchvision's constructor of the same name takes (checked key by key)
TORCHVISION_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
                       "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d",
                       "wide_resnet50_2", "wide_resnet101_2")

_STEM = (
    "if meta['cifar_stem']:  # 3x3 stride-1 first conv, no max-pool (small images)\n"
    "    model.conv1 = torch.nn.Conv2d(3, model.conv1.out_channels, 3, 1, 1, bias=False)\n"
    "    model.maxpool = torch.nn.Identity()\n"
)


def _snippet(weights: str, manifest: str, build: str) -> str:
    read = ("safetensors.torch.load_file('{w}')" if weights.endswith(".safetensors")
            # (weights_only: before torch 2.6 torch.load unpickles whatever the file holds)
            else "torch.load('{w}', map_location='cpu', weights_only=True)").format(w=weights)
    imports = ["json", "torch", "timm" if "timm." in build else "torchvision"]
    if weights.endswith(".safetensors"):
        imports.append("safetensors.torch")
    return (
        f"import {', '.join(imports)}\n"
        f"meta = json.load(open('{manifest}'))\n"
        f"{build}\n{_STEM}"
        f"model.load_state_dict({read})\n"
        "model.eval()  # model(x) -> [N, meta['feature_dim']] pooled features\n"
    )


# the images as massrl's evaluations saw them (data/eval_transform.py), from the manifest
_TRANSFORM = (
    "from torchvision import transforms as T\n"
    "t = meta['test_transform']\n"
    "transform = T.Compose([  # (for RGB and 8-bit grey images: massrl puts transparent\n"
    "    # areas on white and scales 16-bit ones to 8 bits before this)\n"
    "    T.Lambda(lambda im: im.convert('RGB')),\n"
    "    T.Resize(t['resize'], interpolation=T.InterpolationMode.BICUBIC),\n"
    "    T.CenterCrop(t['center_crop']), T.ToTensor(), T.Normalize(meta['mean'], meta['std'])])\n"
)


def _timm_data_config(image_size: int, ratio: float, mean: Sequence[float] | None,
                      std: Sequence[float] | None) -> dict[str, Any]:
    """timm's pretrained_cfg for the export: timm.data.resolve_data_config then gives the test
    transform (timm floors the resize side S / crop_pct, which massrl rounds: a pixel apart
    where it is not whole)."""
    cfg: dict[str, Any] = {"input_size": [3, image_size, image_size],
                           "interpolation": "bicubic", "crop_pct": ratio}
    if mean is not None and std is not None:
        cfg |= {"mean": list(mean), "std": list(std)}
    return cfg


def torchvision_name(spec: BackboneSpec, state: dict[str, torch.Tensor]) -> str | None:
    """The torchvision constructor the weights load into, or None; checked key by key."""
    if spec.name not in TORCHVISION_RESNETS or spec.timm_kwargs:
        return None
    model = getattr(torchvision.models, spec.name)()
    model.fc = nn.Identity()
    if spec.cifar_stem:
        apply_cifar_stem(model)
    ref = model.state_dict()
    same = ref.keys() == state.keys() and all(ref[k].shape == state[k].shape for k in ref)
    return spec.name if same else None


WEIGHT_SUFFIXES = (".pt", ".pth", ".safetensors")
# names of files in formats the export does not write (refused rather than given a .pt)
OTHER_FORMATS = frozenset({".onnx", ".ckpt", ".bin", ".h5", ".keras", ".tflite", ".pb", ".ts",
                           ".jit", ".torchscript", ".engine", ".plan", ".npz", ".npy", ".pkl",
                           ".pickle", ".mlmodel", ".json"})


def export_paths(out: str | Path) -> tuple[Path, Path]:
    """(weights, manifest) that export_backbone writes for `out`."""
    out = Path(out)
    if out.suffix not in WEIGHT_SUFFIXES:
        out = out.with_name(out.name + ".pt")
    return out, out.with_suffix(".json")


def _is_manifest(path: Path) -> bool:
    """Whether `path` holds a manifest an export wrote (re-exporting over it is allowed)."""
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    family = FORMAT.split("/")[0] + "/"  # (any version of the format)
    return isinstance(meta, dict) and str(meta.get("format", "")).startswith(family)


def check_export_paths(out: str | Path, checkpoint: str | Path | None = None
                       ) -> tuple[Path, Path]:
    """(weights, manifest) for `out`, refused (ConfigError) where writing them would replace
    the checkpoint exported (`checkpoint`) or a .json of another kind: the manifest goes beside
    the weights as <name>.json, which may be an unrelated file of the user's."""
    suffix = Path(out).suffix
    if suffix.lower() in OTHER_FORMATS:
        # (`--out b.onnx` wrote b.onnx.pt in silence: the user asked for a format it is not;
        # any other dotted name, run.e10, keeps its whole name with .pt added)
        raise ConfigError(f"--out {out}: export writes a state_dict as .pt, .pth or "
                          f".safetensors, not {suffix} (for ONNX or TorchScript, load the "
                          "export as its manifest shows and convert it with torch.onnx / "
                          f"torch.jit): e.g. --out {Path(out).with_suffix('.pt')}")
    weights, manifest = export_paths(out)
    other = weights.with_name(f"{weights.stem}.backbone{weights.suffix}")
    for path in (weights, manifest):
        if checkpoint is not None and path.exists() and os.path.samefile(path, checkpoint):
            raise ConfigError(f"--out {out}: the export would write {path}, which is the "
                              f"checkpoint being exported (ckpt={checkpoint}), replacing it: "
                              f"give another --out, e.g. --out {other}")
    for path in (weights, manifest):  # (reading a FIFO to check it waited for a writer)
        if path.exists() and not path.is_file():
            raise ConfigError(f"--out {out}: {path} exists and is not a file: give another "
                              f"--out, e.g. --out {other}")
    if manifest.exists() and not _is_manifest(manifest):
        raise ConfigError(f"--out {out}: the export writes its manifest beside the weights as "
                          f"{manifest}, which exists and is not a massrl export manifest (no "
                          f'"format": "{FORMAT}"), and would replace it: give another --out, '
                          f"e.g. --out {other}")
    return weights, manifest


def export_backbone(
    backbone: nn.Module, spec: BackboneSpec, out: str | Path, *,
    image_size: int, mean: Sequence[float] | None, std: Sequence[float] | None,
    native_size: int | None = None, source: dict[str, Any] | None = None,
    checkpoint: str | Path | None = None,
) -> dict[str, Any]:
    """Write `out` (the state_dict: torch.save's for .pt / .pth, safetensors' for
    .safetensors; .pt added to any other name) and `out` with suffix .json (the manifest, with
    the test transform for images whose typical side is `native_size`); return the manifest.
    Neither replaces `checkpoint` (the source) nor a .json that is not an earlier export's."""
    out, manifest_path = check_export_paths(out, checkpoint)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    with atomic_write(out) as f:  # (a full disk keeps an earlier export whole)
        if out.suffix == ".safetensors":
            from safetensors.torch import save

            f.write(save(state, metadata={"format": FORMAT}))
        else:
            torch.save(state, f)
    tv = torchvision_name(spec, state)
    resize, ratio = test_resize(image_size, native_size=native_size)
    timm_build = ("model = timm.create_model(meta['architecture'], pretrained=False, "
                  "num_classes=0, pretrained_cfg_overlay=meta['timm_pretrained_cfg'], "
                  "**meta['timm_kwargs'])")
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "weights": out.name,
        "architecture": spec.name,
        "timm_kwargs": spec.timm_kwargs,
        "cifar_stem": spec.cifar_stem,
        "width": spec.width,
        "torchvision": tv,
        "feature_dim": feature_dim(backbone),
        "input_size": image_size,
        "mean": list(mean) if mean is not None else None,
        "std": list(std) if std is not None else None,
        "test_transform": {"resize": resize, "center_crop": image_size, "crop_ratio": ratio,
                           "interpolation": "bicubic"},
        "timm_pretrained_cfg": _timm_data_config(image_size, ratio, mean, std),
        "source": source or {},
        "load_timm": _snippet(out.name, manifest_path.name, timm_build),
        "transform": _TRANSFORM,
    }
    if tv is not None:
        build = f"model = torchvision.models.{tv}()\nmodel.fc = torch.nn.Identity()"
        manifest["load_torchvision"] = _snippet(out.name, manifest_path.name, build)
    write_text(manifest_path, json.dumps(manifest, indent=2) + "\n")
    return {**manifest, "weights_path": os.path.abspath(out),
            "manifest_path": os.path.abspath(manifest_path)}
