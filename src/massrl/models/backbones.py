"""Backbones built by timm, with the CIFAR stem and a width knob for small images and CPUs."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import timm
import torch
from timm.models import is_model_in_modules
from torch import nn

from massrl.config import ConfigError
from massrl.messages import first_line


@dataclass
class BackboneSpec:
    """Everything needed to rebuild the backbone without massrl (recorded with exports)."""

    name: str = "resnet18"
    cifar_stem: bool = False
    width: int = 64
    timm_kwargs: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _width_kwargs(name: str, width: int, cifar_stem: bool) -> dict[str, Any]:
    if width == 64:
        return {}
    # timm's ResNet family (ResNeXt, Wide-ResNet, SE-ResNet, the -d/-t deep stems); not ResNetV2
    if not is_model_in_modules(name, ["resnet"]):
        stem = " model.cifar_stem=false" if cifar_stem else ""
        raise ConfigError(f"model.width={width} applies to timm ResNets only, not '{name}': "
                          f"add model.width=64{stem} for other backbones")
    return {"channels": tuple(width * m for m in (1, 2, 4, 8)), "stem_width": width}


def _create(name: str, options: dict[str, Any], image_size: int | None
            ) -> tuple[nn.Module, dict[str, Any]]:
    """The timm model and the keyword arguments it took. An architecture built for one input
    size (a ViT's position embeddings) is built for `image_size`, and with dynamic_img_size so
    that other sizes still evaluate; the others do not take img_size (a TypeError naming it)."""
    tries = [options]
    if image_size is not None and "img_size" not in options:
        sized = {"img_size": image_size, **options}
        tries = [{**sized, "dynamic_img_size": sized.get("dynamic_img_size", True)}, sized,
                 options]
    elif "img_size" in options and "dynamic_img_size" not in options:  # the user's own size
        tries = [{**options, "dynamic_img_size": True}, options]
    for kwargs in tries:
        try:
            return timm.create_model(name, pretrained=False, num_classes=0, **kwargs), kwargs
        except TypeError as exc:
            if kwargs is tries[-1] or "img_size" not in str(exc):
                raise ConfigError(f"model.backbone={name} refused its keyword arguments: "
                                  f"{exc} (check model.kwargs)") from None
        except RuntimeError as exc:  # timm's for unknown names; also torch's out of memory
            raise _build_error(name, kwargs, exc) from None
        except (ValueError, ZeroDivisionError, AssertionError) as exc:  # a value it cannot take
            raise ConfigError(f"model.backbone={name} cannot be built with {kwargs}: "
                              f"{type(exc).__name__}: {exc} (check model.kwargs and "
                              "model.width)") from None
    raise AssertionError("unreachable")


def _build_error(name: str, kwargs: dict[str, Any], exc: RuntimeError) -> ConfigError:
    """What a RuntimeError building `name` means: an unknown name only where timm knows no such
    model (an allocation that failed was reported as one)."""
    text = first_line(exc)
    if not timm.is_model(name):
        return ConfigError(f"unknown model.backbone '{name}': {text}. Any timm model name "
                           "works, e.g. resnet18, resnet50, vit_small_patch16_224.")
    if "can't allocate memory" in text or "out of memory" in text.lower():
        sizes = kwargs or "its default sizes"
        return ConfigError(f"model.backbone={name} does not fit in memory with {sizes} ({text}): "
                           "lower model.width, or the sizes in model.kwargs")
    return ConfigError(f"model.backbone={name} cannot be built with {kwargs}: {text} (check "
                       "model.kwargs and model.width)")


def apply_cifar_stem(model: nn.Module) -> nn.Module:
    """3x3 stride-1 first conv and no max-pool: the usual ResNet stem for 32 px images."""
    if not (hasattr(model, "conv1") and hasattr(model, "maxpool")):
        raise ValueError("model.cifar_stem=true needs a ResNet-style backbone (conv1 + maxpool)")
    old: nn.Conv2d = model.conv1
    model.conv1 = nn.Conv2d(old.in_channels, old.out_channels, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


def build_backbone(
    name: str = "resnet18", cifar_stem: bool = False, width: int = 64,
    image_size: int | None = None, kwargs: dict[str, Any] | None = None,
) -> tuple[nn.Module, BackboneSpec]:
    """A timm backbone with no classifier (forward returns pooled features) and its spec.

    `kwargs` go to timm.create_model; `image_size` sizes the architectures built for one input
    size (ViTs). `feature_dim(backbone)` is the feature dimension.
    """
    model, kwargs = _create(name, {**_width_kwargs(name, width, cifar_stem), **(kwargs or {})},
                            image_size)
    if cifar_stem:
        if not (isinstance(getattr(model, "conv1", None), nn.Conv2d)
                and hasattr(model, "maxpool")):
            raise ConfigError(f"model.cifar_stem=true needs a ResNet-style backbone with a "
                              f"single-conv stem (conv1 + maxpool), not '{name}': add "
                              "model.cifar_stem=false")
        apply_cifar_stem(model)
    spec = BackboneSpec(name=name, cifar_stem=cifar_stem, width=width,
                        timm_kwargs={k: list(v) if isinstance(v, tuple) else v
                                     for k, v in kwargs.items()})
    return model, spec


def input_size_error(model: nn.Module, size: int) -> str | None:
    """Why the backbone cannot take size x size images (a ViT's patch size or fixed img_size:
    timm asserts them at the first forward), or None when it can."""
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, size, size))
    except (RuntimeError, AssertionError, ValueError) as exc:
        return first_line(exc).rstrip(".")
    finally:
        model.train(was_training)
    return None


def check_input_size(model: nn.Module, name: str, size: int) -> None:
    """A ConfigError before any training, not a traceback at the first step."""
    if why := input_size_error(model, size):
        raise ConfigError(f"model.backbone={name} cannot take data.image_size={size} images: "
                          f"{why}. Change data.image_size or model.kwargs")


def feature_dim(model: nn.Module) -> int:
    """The width of what the backbone's forward returns: timm's head_hidden_size where a
    pre-logits layer follows the features (MobileNetV3's conv_head), else num_features."""
    dim = getattr(model, "head_hidden_size", None) or getattr(model, "num_features", None)
    if dim is None:
        raise ValueError("backbone has neither head_hidden_size nor num_features")
    return int(dim)

