"""massrl: self-supervised visual pre-training with multiple augmentation strategies."""

import importlib
from types import ModuleType

__version__ = "0.1.0"

# `import massrl` stays light (the command's --help loads no torch); the subpackages load when
# first used, so that `massrl.config.build_config(...)` works after a plain `import massrl`
_SUBMODULES = ("augment", "config", "data", "eval", "losses", "methods", "models", "optim",
               "train")


def __getattr__(name: str) -> ModuleType:
    if name in _SUBMODULES:
        return importlib.import_module(f"massrl.{name}")
    raise AttributeError(f"module 'massrl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_SUBMODULES])
