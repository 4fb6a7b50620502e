"""Code of one's own in massrl runs: methods and augmentation strategies registered by name,
and the plugin modules that register them (docs/extending.md).

A run names its plugins in the config (``plugins: [my_module, path/to/file.py]``); they are
imported before the config is checked, so ``method=`` and ``augment.strategies=`` can name what
they register, and again by every command that reads the run's checkpoint. Installed packages
can instead declare a ``massrl.plugins`` entry point (a module), imported the first time a name
is not one of massrl's own. This module imports no torch: config validation runs without it.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, TypeVar

BUILTIN_METHODS = ("massrl", "byol", "simclr")
BUILTIN_STRATEGIES = ("simclr", "randaugment", "autoaugment", "fastautoaugment",
                      "trivialaugment")
ENTRY_POINT_GROUP = "massrl.plugins"

# name -> the method's class (an SSLMethod subclass) / the strategy's builders
METHODS: dict[str, type] = {}
STRATEGIES: dict[str, StrategyPlugin] = {}
# "method:<name>" / "strategy:<name>" -> the module that registered it (recorded in a run's plugins)
REGISTERED_BY: dict[str, str] = {}

T = TypeVar("T", bound=type)


@dataclass(frozen=True)
class StrategyPlugin:
    """An augmentation strategy of one's own.

    ``per_image(cfg, view_index)`` returns a picklable callable ``(PIL RGB image, generator)
    -> (PIL image, list of op labels)`` that draws with torch's RNG (the generator if given),
    as massrl's own strategies do (``massrl.augment.strategies``). ``batched(cfg)``, optional,
    returns a sampler of the batched engine (``massrl.augment.batched.policies``: ``slots``,
    ``slot_ops``, ``sample``); without one the strategy runs with the per-image backend only
    (augment.backend=auto picks it; batched is refused).
    ``cfg`` is the run's ``augment`` section."""

    per_image: Callable[[Any, int], Callable]
    batched: Callable[[Any], Any] | None = None


def register_method(name: str) -> Callable[[T], T]:
    """Class decorator: ``@register_method("simsiam") class SimSiam(SSLMethod): ...`` makes
    ``method=simsiam`` train it."""
    def register(cls: T) -> T:
        _check_new(name, BUILTIN_METHODS, METHODS.get(name), cls, "method")
        METHODS[name] = cls
        REGISTERED_BY[f"method:{name}"] = _caller_module()
        return cls
    return register


def register_strategy(name: str, per_image: Callable[[Any, int], Callable],
                      batched: Callable[[Any], Any] | None = None) -> None:
    """Make ``augment.strategies=[..., name]`` draw views from a strategy of one's own (see
    `StrategyPlugin`)."""
    old = STRATEGIES.get(name)
    _check_new(name, BUILTIN_STRATEGIES, old and old.per_image, per_image, "strategy")
    STRATEGIES[name] = StrategyPlugin(per_image, batched)
    REGISTERED_BY[f"strategy:{name}"] = _caller_module()


def _caller_module() -> str:
    """The module being imported (or run) when register_* was called: the plugin to import
    again. Not the class's or function's module (a re-exported class, a functools.partial),
    nor the immediate caller's (a base class's __init_subclass__, a helper of another package
    registering for it): the innermost frame running a module's body."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_name != "<module>":
        frame = frame.f_back
    return (frame or sys._getframe(2)).f_globals.get("__name__", "__main__")


def _origin(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def _check_new(name: str, builtin: tuple[str, ...], old: Any, new: Any, kind: str) -> None:
    if not name.isidentifier():
        raise ValueError(f"a {kind} name must be a Python identifier, not {name!r}")
    if name in builtin:
        raise ValueError(f"'{name}' is massrl's own {kind}: register yours under another name")
    # (the same code registering again, e.g. a module reloaded, replaces itself)
    if old is not None and _origin(old) != _origin(new):
        raise ValueError(f"{kind} '{name}' is registered twice: by {_origin(old)} and by "
                         f"{_origin(new)}")


def without_engine_sampler(strategies: list[str]) -> list[str]:
    """The strategies (plugins') that the batched engine cannot run: registered without one."""
    return [n for n in strategies if n in STRATEGIES and STRATEGIES[n].batched is None]


def method_names(name: str | None = None) -> tuple[str, ...]:
    """The methods known; installed plugins are imported only for a `name` not known yet."""
    return _known(BUILTIN_METHODS, METHODS, name)


def strategy_names(name: str | None = None) -> tuple[str, ...]:
    """The strategies known; installed plugins are imported only for a `name` not known yet."""
    return _known(BUILTIN_STRATEGIES, STRATEGIES, name)


def _known(builtin: tuple[str, ...], registered: dict, name: str | None) -> tuple[str, ...]:
    if name is not None and name not in builtin and name not in registered:
        load_entry_points()
    return (*builtin, *registered)


_entry_points_loaded = False


def load_entry_points() -> None:
    """Import the modules installed packages declare as ``massrl.plugins`` entry points (once)."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as exc:  # noqa: BLE001 - a broken plugin is named, not a traceback
            raise ValueError(f"the installed massrl plugin '{ep.name}' ({ep.value}) failed to "
                             f"import: {type(exc).__name__}: {exc}") from exc


def import_plugins(names: list[str]) -> list[str]:
    """Import each plugin: a module name (importable from sys.path) or a ``.py`` file, whose
    folder is put on sys.path so DataLoader workers started by spawn find it too. Returns the
    names as recorded in the config (a file's absolute path)."""
    recorded = []
    for name in names:
        if name.endswith(".py"):
            path = Path(name).expanduser().resolve()
            if not path.is_file():
                raise ValueError(f"plugin file {name} does not exist (a path, absolute or "
                                 "relative to the working directory, or a module name)")
            other = sys.modules.get(path.stem)
            if other is not None and _file_of(other) != path:
                raise ValueError(f"plugin file {name}: its name '{path.stem}' is already the "
                                 f"module {_file_of(other) or path.stem}: rename the file")
            if str(path.parent) not in sys.path:
                sys.path.append(str(path.parent))  # (after the others: it shadows none)
            module, recorded_name = path.stem, str(path)
        else:
            module = recorded_name = name
        try:
            imported = importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - any failure of the user's code, named
            raise ValueError(f"cannot import plugin '{name}': {type(exc).__name__}: {exc} "
                             "(a module on PYTHONPATH, or a .py file's path)") from exc
        if name.endswith(".py") and _file_of(imported) != Path(recorded_name):
            raise ValueError(f"plugin file {name}: the module '{module}' imported from "
                             f"{_file_of(imported)} instead: rename the file")
        recorded.append(recorded_name)
    return recorded


def _file_of(module: Any) -> Path | None:
    file = getattr(module, "__file__", None)
    return Path(file).resolve() if file else None


def record_imported(cfg: Any) -> Any:
    """`cfg` with the modules that registered its method and strategies added to its plugins,
    where a Python caller imported them itself (`import my_plugin`, as docs/extending.md says)
    rather than naming them in plugins=: config.yaml and the checkpoints then name them, so
    `massrl knn|linear|umap|export` and a resume from the command line import them too (they
    refused the checkpoint: "unknown method"). One defined in __main__ (a notebook cell, the
    script itself) cannot be imported elsewhere: said. The caller's cfg is left as it was."""
    import timm  # (here: --help reads this module without torch)

    keys = [f"method:{cfg.method}", *(f"strategy:{s}" for s in cfg.augment.strategies)]
    owners = [(k, REGISTERED_BY[k]) for k in keys if k in REGISTERED_BY]
    backbone = cfg.model.backbone
    if timm.is_model(backbone):  # (one a plugin registered with timm: not timm's or massrl's)
        owner = timm.models.model_entrypoint(backbone).__module__
        if not owner.startswith(("timm.", "massrl.")):
            owners.append((f"backbone:{backbone}", owner))
    recorded = list(cfg.plugins)
    for what, owner in owners:
        module = sys.modules.get(owner)
        name = getattr(module, "__name__", "__main__")
        if name == "__main__" or module is None:
            print(f"note: the {what.replace(':', ' ')} is registered in __main__ (a notebook or "
                  "the script itself): `massrl knn|linear|umap|export` and a resume from the "
                  "command line cannot import it; put it in a module and name that in plugins=")
            continue
        file = _file_of(module)
        # (a top-level module by its file: found from any folder, as a plugins= file is)
        entry = str(file) if file is not None and "." not in name else name
        if entry not in recorded and name not in recorded:
            recorded.append(entry)
    return cfg if recorded == list(cfg.plugins) else cfg.model_copy(update={"plugins": recorded})

