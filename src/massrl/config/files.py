"""Config files and overrides: YAML files (a path or a shipped name), dotted KEY=VALUE
overrides, merged in that order over the defaults and validated against a schema."""

from __future__ import annotations

import copy
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from massrl.config.schema import RunConfig
from massrl.config.section import ConfigError
from massrl.config.text import _format_error

PACKAGE_CONFIGS = Path(__file__).parent.parent / "configs"


def parse_value(text: str) -> Any:
    """A command-line value as YAML reads it: 0.5 -> float, true -> bool, [a,b] -> list."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.get(p)
        if not isinstance(child, dict):
            child = {}
            node[p] = child
        node = child
    node[parts[-1]] = value


def dotted_items(key: str, value: Any) -> list[tuple[str, Any]]:
    """An override whose value is a mapping, as dotted keys: `optimizer={lr: 0.5}` sets
    optimizer.lr and keeps the section's other keys (an empty mapping stays one value)."""
    if isinstance(value, Mapping) and value:
        return [item for k, v in value.items() for item in dotted_items(f"{key}.{k}", v)]
    return [(key, value)]


def resolve_config_path(path: str | Path) -> Path:
    """A config file, or a name of a shipped one such as `cifar10/byol`."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    shipped = PACKAGE_CONFIGS / (str(path).removesuffix(".yaml") + ".yaml")
    if shipped.is_file():
        return shipped
    names = sorted(str(f.relative_to(PACKAGE_CONFIGS))[:-5]
                   for f in PACKAGE_CONFIGS.rglob("*.yaml"))
    raise ConfigError(
        f"config file '{path}' not found. Give a path to a YAML file or one of the shipped "
        f"configs: {', '.join(names)}"
    )


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key written twice in one mapping (PyYAML keeps the last
    silently: the first value would be ignored without a word). Merge keys (<<) may still be
    overridden, as YAML intends: the check runs on each mapping as written (composed), before
    the constructor expands merges into the nodes in place."""

    def compose_mapping_node(self, anchor: str | None) -> yaml.MappingNode:
        node = super().compose_mapping_node(anchor)
        seen = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue  # (the safe loader reports unhashable keys itself)
            key = (key_node.tag, key_node.value)
            if key in seen:
                raise yaml.composer.ComposerError(
                    None, None, f"key '{key_node.value}' is written twice (keep one)",
                    key_node.start_mark)
            seen.add(key)
        return node


def load_yaml(path: str | Path) -> dict:
    p = resolve_config_path(path)
    try:
        with open(p) as f:  # (from the file: YAML's messages name it)
            tree = yaml.load(f, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as exc:
        hint = ""
        if "escape" in str(exc) and "\\" in p.read_text(errors="replace"):  # C:\Users\...
            hint = ("; a backslash inside double quotes starts an escape: write paths with / "
                    "or inside 'single quotes'")
        raise ConfigError(f"{p} is not valid YAML: {exc}{hint}") from exc
    if tree is None:
        print(f"note: {p} sets no key: the schema defaults apply", file=sys.stderr)
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{p} must hold a mapping of keys, not {type(tree).__name__}")
    for top, section in tree.items():
        for key, value in dotted_items(str(top), section):
            check_typed_text(key, value)
    return tree


# the settings that name files and folders (a multi-line text elsewhere is a plugin's business)
PATH_KEYS = {"output_dir", "resume", "root", "ckpt", "out", "subset_file", "cache_dir",
             "plugins", "name"}  # (a run's name is its folder's: runs/<name>/version_N)


def check_typed_text(key: str, value: Any) -> None:
    """A typed path holds no control character: "D:\\runs\\test" in YAML's double quotes
    (a file's or a shell argument's) is D: with a carriage return and a tab, silently."""
    if isinstance(value, Mapping):  # (an override of a whole section: `data={root: ...}`)
        for dotted, item in dotted_items(key, value):
            if dotted != key:
                check_typed_text(dotted, item)
        return
    texts = value if isinstance(value, list) else [value]
    if key.rsplit(".", 1)[-1] not in PATH_KEYS:
        return
    if any(isinstance(t, str) and any(ord(c) < 32 for c in t) for t in texts):
        raise ConfigError(f"{key}={value!r} holds a control character: inside YAML's double "
                          "quotes a backslash starts an escape; write paths with / or inside "
                          "'single quotes'")


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(
                f"argument '{item}' is not KEY=VALUE (e.g. optimizer.lr=0.5 data.subset=2000)"
            )
        key, value = item.split("=", 1)
        out.append((key.strip(), parse_value(value)))
        check_typed_text(key.strip(), out[-1][1])
    return out


def build_config(
    schema: type[BaseModel] = RunConfig,
    config_file: str | Path | None = None,
    overrides: list[str] | Mapping[str, Any] | None = None,
    base: dict | None = None,
) -> Any:
    """Resolve base dict <- YAML file <- dotted overrides, then validate against the schema.

    overrides: "KEY=VALUE" strings as on the command line (values read as YAML), or a mapping
    of dotted keys to values; a mapping value sets the keys it names and keeps the others
    (`{"optimizer": {"lr": 0.5}}` is `{"optimizer.lr": 0.5}`); base: a nested dict (dotted keys
    are expanded). Raises ConfigError (a ValueError) naming a key that is unknown or invalid."""
    if isinstance(schema, str | Path):
        raise ConfigError(f"build_config's first argument is the config schema: give the file "
                          f"as build_config(config_file={str(schema)!r})")
    tree: dict = {}
    for key, value in (base or {}).items():
        set_dotted(tree, key, copy.deepcopy(value))  # (the caller's dicts stay unchanged)
    source = "defaults"
    if isinstance(overrides, str):
        raise ConfigError(f"overrides must be a list of KEY=VALUE strings, e.g. "
                          f"[{overrides!r}], not one string")
    parsed = [item for key, value in (list(overrides.items()) if isinstance(overrides, Mapping)
                                      else parse_overrides(overrides or []))
              for item in dotted_items(key, value)]
    note = None
    if config_file is not None:
        file_tree, note = _for_other_dataset(load_yaml(config_file), parsed, config_file)
        tree = _deep_merge(tree, file_tree)
        source = str(config_file)
    for key, value in parsed:
        set_dotted(tree, key, value)
    if parsed:
        source += " + overrides"
    try:
        cfg = schema.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_error(err, source, schema)) from None
    if note:  # (after the validation: an invalid data.name gets its error alone)
        print(note, file=sys.stderr)
    return cfg


# set for one dataset, meaningless for another: a config file's values of these are dropped when
# an override names another data.name (fashion_mnist's 20,000-image subset must not cut a folder)
DATASET_KEYS = ("root", "labels", "subset", "eval_subset", "mean", "std")


def _for_other_dataset(file_tree: dict, overrides: list[tuple[str, Any]],
                       config_file: str | Path) -> tuple[dict, str | None]:
    """The file's tree without its dataset keys when another data.name is asked for, and the
    note that says which were dropped."""
    data = file_tree.get("data")
    names = [v for k, v in overrides if k == "data.name"]
    if not isinstance(data, dict) or not names or names[-1] == data.get("name"):
        return file_tree, None
    given = {k for k, _ in overrides}
    dropped = {k: data[k] for k in DATASET_KEYS if k in data and f"data.{k}" not in given}
    if not dropped:
        return file_tree, None
    settings = ", ".join(f"data.{k}={v}" for k, v in dropped.items())
    verb, them = ("is", "it") if len(dropped) == 1 else ("are", "them")
    note = (f"note: data.name={names[-1]} replaces {config_file}'s {data.get('name')}: its "
            f"{settings} {verb} not applied (give {them} again to keep {them})")
    kept = {k: v for k, v in data.items() if k not in dropped}
    return {**file_tree, "data": kept}, note


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        both_dicts = isinstance(v, dict) and isinstance(out.get(k), dict)
        out[k] = _deep_merge(out[k], v) if both_dicts else v
    return out


def to_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


