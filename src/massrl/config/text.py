"""What the config says to people: error messages that name the key (and the closest valid
one for a misspelling), and the --help lines of every key."""

from __future__ import annotations

import difflib
from collections.abc import Collection
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from massrl.config.schema import RunConfig


def _is_section(ann: Any) -> bool:
    """A nested config section (a BaseModel subclass); not list[str] etc., which Python 3.10
    takes for a type (isinstance(list[str], type) is True there)."""
    return get_origin(ann) is None and isinstance(ann, type) and issubclass(ann, BaseModel)


def _valid_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        ann = field.annotation
        if _is_section(ann):
            keys.extend(_valid_keys(ann, prefix + name + "."))
    return keys


# names users bring from other frameworks, mapped to ours
ALIASES = {
    "learning_rate": "optimizer.lr", "epochs": "trainer.max_epochs",
    "max_epochs": "trainer.max_epochs", "batch_size": "data.batch_size", "dataset": "data.name",
    "backbone": "model.backbone", "arch": "model.backbone", "precision": "trainer.precision",
    "devices": "trainer.devices", "gpus": "trainer.devices", "num_workers": "data.num_workers",
    "temperature": "loss.temperature", "weight_decay": "optimizer.weight_decay",
}


def _closest(key: str, schema: type[BaseModel] = RunConfig) -> str:
    keys = _valid_keys(schema)
    if key in keys:  # a dotted name written as one key, in a YAML file
        section, leaf = key.rsplit(".", 1)
        return f" In a YAML file write it nested: '{section}:' and, indented below, '{leaf}:'."
    alias = ALIASES.get(key.rsplit(".", 1)[-1])
    if alias in keys:
        return f" Did you mean '{alias}'?"
    match = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    if not match:  # a misspelt leaf under the right section: compare leaf names only
        leaves = {k.rsplit(".", 1)[-1]: k for k in keys}
        leaf = difflib.get_close_matches(key.rsplit(".", 1)[-1], list(leaves), n=1, cutoff=0.7)
        match = [leaves[leaf[0]]] if leaf else []
    return f" Did you mean '{match[0]}'?" if match else ""


def _quote_hint(key: str, got: Any) -> str:
    """What to do about a value YAML read as something other than the string wanted."""
    kind = {"int": "number", "float": "number", "datetime": "date", "dict": "mapping",
            "list": "list"}.get(type(got).__name__, type(got).__name__)
    # (a number's text is lost: 1.10 was read as 1.1, so no example of it is shown)
    if isinstance(got, dict | list | int | float) or \
            not key.replace("_", "").replace(".", "").isalpha():
        why = ": a colon and a space inside it?" if kind == "mapping" else ""
        return (f" (YAML read it as a {kind}{why}; quote the value, in a shell inside single "
                "quotes: '\"...\"')")
    return f" (YAML read {str(got)!r} as a {kind}: quote it, e.g. {key}='\"{got}\"')"


def _pretraining_keys(err: ValidationError, schema: type[BaseModel]) -> list[str]:
    """The unknown top-level keys of an evaluation's config that are pre-training sections."""
    if schema is RunConfig:
        return []
    own = set(RunConfig.model_fields) - set(schema.model_fields)
    return [str(e["loc"][0]) for e in err.errors()
            if e["type"] == "extra_forbidden" and len(e["loc"]) == 1 and e["loc"][0] in own]


def _format_error(err: ValidationError, source: str, schema: type[BaseModel]) -> str:
    lines = [f"invalid configuration ({source}):"]
    pretraining = _pretraining_keys(err, schema)
    if pretraining:  # one line, not one per section of a whole pre-training config
        what = "keys" if len(pretraining) > 1 else "a key"
        lines.append(f"  {', '.join(pretraining)}: {what} of `massrl pretrain`, not of this "
                     "command (a pre-training config?). An evaluation takes the method, model "
                     "and augmentations from its checkpoint.")
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if key in pretraining:
            continue
        if e["type"] == "extra_forbidden":
            lines.append(f"  unknown key '{key}'.{_closest(key, schema)}")
        elif not key:  # a rule across keys (model_validator): its message names them
            lines.append(f"  {e['msg'].removeprefix('Value error, ')}")
        else:
            got = e.get("input")
            got_text = "" if isinstance(got, dict) else f" (got {got!r})"
            if e["type"] == "string_type" and got is not None:  # YAML read a date, a number..
                got_text = _quote_hint(key, got)
            elif e["type"] == "list_type" and isinstance(got, str):
                got_text += f"; a list is written in brackets: {key}=[{got.strip('[]')}]"
            lines.append(f"  {key}: {e['msg'].removeprefix('Value error, ')}{got_text}")
    lines.append("  `massrl <command> --help` lists every key and its default.")
    return "\n".join(lines)


def describe_options(schema: type[BaseModel] = RunConfig, prefix: str = "",
                     without_c: dict | None = None, only: Collection[str] | None = None
                     ) -> list[str]:
    """One line per key: name, default and description, for --help; `without_c`: the tree of the
    config a command loads when given no -c, whose values are shown where they differ; `only`:
    the top-level keys to list (default: all)."""
    lines = []
    for name, field in schema.model_fields.items():
        if only is not None and name not in only:
            continue
        ann = field.annotation
        given = (without_c or {}).get(name)
        if _is_section(ann):
            lines.extend(describe_options(ann, prefix + name + ".",
                                          given if isinstance(given, dict) else None))
            continue
        default = _jsonable(field.get_default(call_default_factory=True))
        shown = _flow(default)
        if without_c and name in without_c and _jsonable(given) != default:
            shown += f" (without -c: {_flow(_jsonable(given))})"
        desc = f"  {field.description}" if field.description else ""
        choices = _choices(ann)
        if choices:
            desc += f"  (one of: {', '.join(choices)})"
        lines.append(f"  {prefix + name:<34} default {shown}{desc}")
    return lines


def _flow(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _choices(annotation: Any) -> list[str]:
    """The allowed values of a Literal field (also inside list[...] / Optional[...])."""
    if get_origin(annotation) is Literal:
        return [str(a) for a in get_args(annotation)]
    args = get_args(annotation)
    if get_origin(annotation) in (Union, UnionType) and any(
            a is not type(None) and get_origin(a) is not Literal for a in args):
        return []  # e.g. int | "auto": the literal is one choice among many
    for arg in args:
        found = _choices(arg)
        if found:
            return found
    return []


def _jsonable(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v
