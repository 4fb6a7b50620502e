"""Backbones (from timm) and the small MLP heads of BYOL / SimCLR."""

from massrl.models.backbones import BackboneSpec, build_backbone
from massrl.models.heads import mlp

__all__ = ["BackboneSpec", "build_backbone", "mlp"]
