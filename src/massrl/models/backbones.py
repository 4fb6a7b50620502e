"""Backbones built by timm, with the CIFAR stem and a width knob for small images and CPUs."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import timm
from torch import nn


@dataclass
class BackboneSpec:
    """Everything needed to rebuild the backbone without massrl (recorded with exports)."""

    name: str = "resnet18"
    cifar_stem: bool = False
    width: int = 64
    timm_kwargs: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _timm_kwargs(name: str, width: int) -> dict[str, Any]:
    if width == 64:
        return {}
    if not name.startswith("resnet"):
        raise ValueError(
            f"model.width={width} is only supported for timm ResNets, not '{name}'; "
            "leave model.width=64 for other backbones."
        )
    return {"channels": tuple(width * m for m in (1, 2, 4, 8)), "stem_width": width}


def apply_cifar_stem(model: nn.Module) -> nn.Module:
    """3x3 stride-1 first conv and no max-pool: the usual ResNet stem for 32 px images."""
    if not (hasattr(model, "conv1") and hasattr(model, "maxpool")):
        raise ValueError("model.cifar_stem=true needs a ResNet-style backbone (conv1 + maxpool)")
    old: nn.Conv2d = model.conv1
    model.conv1 = nn.Conv2d(old.in_channels, old.out_channels, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


def build_backbone(
    name: str = "resnet18", cifar_stem: bool = False, width: int = 64
) -> tuple[nn.Module, BackboneSpec]:
    """A timm backbone with no classifier (forward returns pooled features) and its spec.

    `backbone.num_features` is the feature dimension.
    """
    kwargs = _timm_kwargs(name, width)
    try:
        model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    except RuntimeError as exc:  # timm raises RuntimeError for unknown names
        raise ValueError(
            f"unknown backbone '{name}': {exc}. Any timm model name works, e.g. resnet18, resnet50."
        ) from None
    if cifar_stem:
        apply_cifar_stem(model)
    spec = BackboneSpec(name=name, cifar_stem=cifar_stem, width=width,
                        timm_kwargs={k: list(v) if isinstance(v, tuple) else v
                                     for k, v in kwargs.items()})
    return model, spec


def feature_dim(model: nn.Module) -> int:
    dim = getattr(model, "num_features", None)
    if dim is None:
        raise ValueError("backbone has no num_features attribute")
    return int(dim)

