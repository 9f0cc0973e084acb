"""Spec errors and dotted config keys: the checks every part of a sweep spec shares.

Every error here is a one-line ``SpecError`` naming the key, raised while the spec loads,
before any study or training starts (the CLI turns it into exit 2).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from asura.config.load import ConfigError, apply_overrides, read_yaml_file, with_overrides
from asura.config.schema import Config


class SpecError(ValueError):
    """A bad sweep spec; the message is one line naming the key."""


def suggest(name: str, valid: Iterable[str]) -> str:
    valid = list(valid)
    close = difflib.get_close_matches(str(name), valid, n=1, cutoff=0.5)
    return f"did you mean {close[0]!r}?" if close else "valid: " + ", ".join(valid)


def read_yaml(path: str | Path, what: str, valid: Iterable[str]) -> tuple[Path, dict]:
    """(resolved path, mapping) of a YAML file whose top-level keys must be in ``valid``; SpecError
    (one line, naming ``what``: "sweep spec", "study plan") when it is missing, not YAML or has an
    unknown key."""
    path = Path(path).resolve()
    try:  # the config loader's reader: not found, not UTF-8 text, not YAML, a key given twice
        raw = read_yaml_file(path, what) or {}
    except ConfigError as e:
        raise SpecError(str(e)) from None
    check_keys(f"{what} {path.name}", raw, valid)
    return path, raw


def check_keys(where: str, data: Any, valid: Iterable[str]) -> None:
    if not isinstance(data, dict):
        raise SpecError(f"{where} must be a mapping, got {data!r}")
    valid = tuple(valid)
    for k in data:
        if k not in valid:
            raise SpecError(f"{where}: unknown key {k!r}; {suggest(k, valid)}")


def field_type(dotted: str) -> Any:
    """Schema type of a dotted config key (``model.d_model`` -> int); SpecError if unknown."""
    cls: Any = Config
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        names = {f.name for f in dataclasses.fields(cls)}
        if part not in names:
            raise SpecError(f"unknown config key {dotted!r}; {suggest(part, sorted(names))}")
        cls = typing.get_type_hints(cls)[part]
        if not dataclasses.is_dataclass(cls) and i < len(parts) - 1:
            if typing.get_origin(cls) is dict:  # mesh.rules.<axis>
                return typing.get_args(cls)[1]
            raise SpecError(f"config key {dotted!r}: {part!r} is not a section")
    if dataclasses.is_dataclass(cls):
        raise SpecError(f"config key {dotted!r} is a section; name a field inside it")
    return cls


def apply(base: Config, overrides: dict, where: str) -> Config:
    """``base`` with dotted overrides, validated; a SpecError prefixed with ``where`` otherwise."""
    for k in overrides:
        field_type(k)  # one-line error naming the bad dotted key, before with_overrides
    try:
        return with_overrides(base, overrides)
    except ConfigError as e:
        raise SpecError(f"{where}: {e}") from None


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``key=value`` strings (train.py's syntax: values read as YAML) -> {dotted key: value}; SpecError
    (one line) for an item without ``=`` or an unknown key. A key given twice keeps the last value."""
    out: dict[str, Any] = {}
    for item in items:
        try:  # the parser train.py uses, so a value means the same on both command lines
            nested = apply_overrides({}, [item])
        except ConfigError as e:
            raise SpecError(str(e)) from None
        key = item.split("=", 1)[0].strip()
        field_type(key)
        value: Any = nested
        for part in key.split("."):
            value = value[part]
        out[key] = value
    return out


def override_args(overrides: dict[str, Any]) -> list[str]:
    """{dotted key: value} as ``key=value`` arguments that ``parse_overrides`` reads back to the same values."""
    return [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in overrides.items()]


def format_overrides(overrides: dict[str, Any]) -> str:
    """``train.steps=50 model.adapter=abba``, or "none"."""
    return " ".join(override_args(overrides)) or "none"


def get(cfg: Config, dotted: str) -> Any:
    """The value of a dotted key in a config (``model.z_loss``)."""
    value: Any = cfg
    for part in dotted.split("."):
        value = value[part] if isinstance(value, dict) else getattr(value, part)
    return value
