"""The optional packages (pyproject's extras): what needs one says so before any work starts,
not when a UMAP picture or a logger is first wanted, epochs into a run."""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

from massrl.config import ConfigError

if TYPE_CHECKING:
    from massrl.config import RunConfig

# import name -> (pip package, massrl extra)
EXTRAS = {"umap": ("umap-learn", "umap"), "wandb": ("wandb", "wandb")}


def require(module: str, what: str) -> None:
    """A ConfigError naming the pip command when `module`, an extra's package, is missing."""
    spec = importlib.util.find_spec(module)
    # (a folder of that name in the working directory, such as a run's umap/ pictures, is found
    # as a namespace package without an origin)
    if spec is None or spec.origin is None:
        package, extra = EXTRAS[module]
        raise ConfigError(f"{what} needs the {package} package: pip install {package} "
                          f"(or pip install 'massrl[{extra}]')")


def check_run_extras(cfg: RunConfig) -> None:
    """The extras a pre-training run's config asks for are installed."""
    if cfg.eval.umap_every:
        require("umap", f"eval.umap_every={cfg.eval.umap_every}")
    if cfg.wandb.enabled:
        require("wandb", "wandb.enabled=true")
