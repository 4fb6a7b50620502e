"""The base of every config section (its strictness), the error users see, and the check of
a name against what massrl and its plugins know."""

from __future__ import annotations

import os
from difflib import get_close_matches
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationInfo, field_validator


class ConfigError(ValueError):
    """A configuration problem, phrased for the user (which key, what is wrong, how to fix)."""


def _expand_home(path: str) -> str:
    # (YAML and quoted arguments reach massrl with the ~ unexpanded: a run's own files went to a
    # folder named ~ in the working directory, Lightning's loggers to the home folder's)
    return os.path.expanduser(path) if path.startswith("~") else path


# a path setting: a leading ~ (or ~user) is the home folder, as in a shell
UserPath = Annotated[str, AfterValidator(_expand_home)]


class Section(BaseModel):
    """A block of config keys: unknown keys are errors, and so is a boolean for a number, and
    an infinite or NaN number (optimizer.lr=inf trained until its first NaN loss)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, v: Any, info: ValidationInfo) -> Any:
        # pydantic's lax mode reads true as 1: optimizer.lr=true would train at lr 1.0
        annotation = cls.model_fields[info.field_name].annotation
        if isinstance(v, bool) and not _accepts_bool(annotation):
            if _accepts_str(annotation):  # name=yes: YAML 1.1 reads yes/no/on/off as booleans
                raise ValueError("was read by YAML as true/false: quote a text value, in a shell"
                                 " inside single quotes: '\"...\"'")
            raise ValueError("is not a true/false setting (YAML reads true/false as a boolean)")
        return v


def _accepts_str(annotation: Any) -> bool:
    return annotation is str or any(_accepts_str(a) for a in get_args(annotation))


def _accepts_bool(annotation: Any) -> bool:
    if annotation is bool or annotation is Any:
        return True
    if get_origin(annotation) is Literal:
        return any(isinstance(a, bool) for a in get_args(annotation))
    return any(_accepts_bool(a) for a in get_args(annotation))


def known_name(name: str, known: tuple[str, ...], kind: str) -> str:
    if name in known:
        return name
    close = get_close_matches(name, known, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise ValueError(f"unknown {kind} '{name}': {hint}choose from {', '.join(known)}, or "
                     "register your own in a plugin (docs/extending.md)")
