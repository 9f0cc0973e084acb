"""YAML loading (with `extends`), dotted overrides, strict typing and round-trip.

Pipeline: read YAML -> merge the `extends` chain -> apply `key=value`
overrides -> build frozen dataclasses with strict type coercion -> validate.
Every failure is a ``ConfigError`` with a one-line message; CLIs turn it into
exit code 2 (see ``asura.config.cli``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from asura.config.schema import Config, ConfigError

# ---------------------------------------------------------------- YAML files


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last, silently)."""


def _mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)  # resolve `<<` merges first: a merged key may be overridden
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} is given twice (first on line {seen[key]}); keep one", key_node.start_mark
            )
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def yaml_first_line(e: yaml.YAMLError) -> str:
    """PyYAML's problem in one line, with its line number (its messages span several lines)."""
    problem = getattr(e, "problem", None)
    mark = getattr(e, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def strict_yaml(text: str):
    """yaml.safe_load that refuses duplicate keys; raises yaml.YAMLError."""
    return yaml.load(text, Loader=_StrictLoader)


def read_yaml_file(path: Path, what: str = "config file") -> object:
    """A YAML file's data; ConfigError (one line) when it is missing, not text or not valid YAML."""
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} {path} is not UTF-8 text (byte {e.start} is {e.object[e.start]:#04x})") from None
    except OSError as e:
        raise ConfigError(f"{what} {path} cannot be read: {e.strerror or e}") from None
    try:
        return strict_yaml(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {path} is not valid YAML: {yaml_first_line(e)}") from None


def _read_yaml(path: Path) -> dict:
    data = read_yaml_file(path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping, got {type(data).__name__}")
    return data


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "rules":
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def read_config_file(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """Read a YAML config, resolving `extends: other.yaml` (relative to the file)."""
    path = Path(path).resolve()
    if path in _seen:
        chain = " -> ".join(p.name for p in (*_seen, path))
        raise ConfigError(f"config `extends` cycle: {chain}")
    data = _read_yaml(path)
    parents = data.pop("extends", None)
    if parents is None:
        return data
    if isinstance(parents, str):
        parents = [parents]
    merged: dict = {}
    for parent in parents:
        merged = _deep_merge(merged, read_config_file(path.parent / parent, (*_seen, path)))
    return _deep_merge(merged, data)


# ----------------------------------------------------------------- overrides


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `section.key=value` strings; values are parsed as YAML scalars/lists."""
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r} has an empty key part")
        try:
            value = strict_yaml(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            if raw.lstrip()[:1] in "[{\"'":  # meant as a list, mapping or quoted string: say why it is not one
                raise ConfigError(f"override {item!r}: the value is not valid YAML: {yaml_first_line(e)}") from None
            value = raw  # a plain word YAML cannot read (e.g. `a: b`) stays the string the user typed
        node = data
        for p in parts[:-1]:
            nxt = node.get(p)
            if not isinstance(nxt, dict):
                nxt = {} if nxt is None else nxt
                if not isinstance(nxt, dict):
                    raise ConfigError(f"override {key!r}: {p!r} is not a section")
            node[p] = dict(nxt)
            node = node[p]
        node[parts[-1]] = value
    return data


# ------------------------------------------------------------ typed building


def _suggest(name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
    if close:
        return "did you mean " + " or ".join(repr(c) for c in close) + "?"
    return "valid keys: " + ", ".join(valid)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        if isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):  # YAML reads "1e-3" as a string
            with contextlib.suppress(ValueError):  # not a number: the type check below names it
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        if not math.isfinite(value):  # NaN passes every range check below and trains until it blows up
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key} must be a string, got {value!r}")
    if origin is tuple:
        (elem, _ellipsis) = typing.get_args(tp)
        if isinstance(value, str):
            try:
                value = [strict_yaml(v) for v in value.split(",") if v.strip()]
            except yaml.YAMLError as e:
                raise ConfigError(f"{key}: {value!r} is not a comma-separated list: {yaml_first_line(e)}") from None
        elif not isinstance(value, list | tuple):
            value = [value]
        return tuple(_coerce(v, elem, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        ktp, vtp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return {_coerce(k, ktp, key): _coerce([] if v is None else v, vtp, f"{key}.{k}") for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"unions are not supported in config schema ({key})")
    raise TypeError(f"unsupported config type {tp!r} for {key}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in fields:
            raise ConfigError(f"unknown config key {key!r}; {_suggest(str(name), sorted(fields))}")
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value if value is not None else {}, key)
        else:
            kwargs[name] = _coerce(value, tp, key)
    return cls(**kwargs)


def config_from_dict(data: dict) -> Config:
    from asura.config.validate import validate

    cfg = _build(Config, data, "")
    validate(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load, override, type-check and validate a config. Raises ConfigError."""
    data = read_config_file(path) if path is not None else {}
    return config_from_dict(apply_overrides(data, list(overrides)))


# ------------------------------------------------------------- serialisation


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def config_to_dict(cfg: Config) -> dict:
    return _plain(cfg)


def config_to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)


def config_from_yaml(text: str) -> Config:
    try:
        data = strict_yaml(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"saved config is not valid YAML: {yaml_first_line(e)}") from None
    return config_from_dict(data)


def with_overrides(cfg: Config, overrides: dict[str, Any] | list[str]) -> Config:
    """Return a validated copy of cfg with dotted overrides applied."""
    if isinstance(overrides, dict):
        data = config_to_dict(cfg)
        for key, value in overrides.items():
            node = data
            *parents, leaf = key.split(".")
            for p in parents:
                if p not in node or not isinstance(node[p], dict):
                    raise ConfigError(f"unknown config section {key!r}")
                node = node[p]
            node[leaf] = _plain(value)
        return config_from_dict(data)
    return config_from_dict(apply_overrides(config_to_dict(cfg), list(overrides)))
