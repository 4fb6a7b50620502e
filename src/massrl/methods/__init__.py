"""Pre-training methods: one LightningModule per method on the shared SSLMethod base."""

from __future__ import annotations

from collections import ChainMap

from massrl import plugins
from massrl.config import RunConfig
from massrl.methods.base import SSLMethod
from massrl.methods.byol import BYOL
from massrl.methods.massrl import MASSRL
from massrl.methods.simclr import SimCLR

# massrl's own, then those plugins register (massrl.plugins.register_method)
METHODS: ChainMap[str, type[SSLMethod]] = ChainMap(
    {"byol": BYOL, "simclr": SimCLR, "massrl": MASSRL}, plugins.METHODS)


def build_method(config: RunConfig | dict, num_classes: int | None = None,
                 strategy_names: list[str] | None = None) -> SSLMethod:
    """The LightningModule of `config.method` (a RunConfig, or a dict of its values).
    `num_classes`: the labeled data's classes, for the online probe (None: no probe)."""
    cfg = config if isinstance(config, RunConfig) else RunConfig.model_validate(config)
    return METHODS[cfg.method](cfg, num_classes=num_classes, strategy_names=strategy_names)


register_method = plugins.register_method

__all__ = ["BYOL", "MASSRL", "METHODS", "SSLMethod", "SimCLR", "build_method", "register_method"]
