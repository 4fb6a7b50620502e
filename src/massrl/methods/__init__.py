"""Pre-training methods: one LightningModule per method on the shared SSLMethod base."""

from __future__ import annotations

from massrl.config import RunConfig
from massrl.methods.base import SSLMethod
from massrl.methods.byol import BYOL
from massrl.methods.massrl import MASSRL
from massrl.methods.simclr import SimCLR

METHODS: dict[str, type[SSLMethod]] = {"byol": BYOL, "simclr": SimCLR, "massrl": MASSRL}


def build_method(config: RunConfig | dict, num_classes: int | None = None,
                 strategy_names: list[str] | None = None) -> SSLMethod:
    """The LightningModule of `config.method` (a RunConfig, or a dict of its values).
    `num_classes`: the labeled data's classes, for the online probe (None: no probe)."""
    cfg = config if isinstance(config, RunConfig) else RunConfig.model_validate(config)
    return METHODS[cfg.method](cfg, num_classes=num_classes, strategy_names=strategy_names)


__all__ = ["BYOL", "MASSRL", "METHODS", "SSLMethod", "SimCLR", "build_method"]
