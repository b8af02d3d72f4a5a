"""Typed, validated configuration: YAML defaults first, then ``key.path=value`` overrides.

Config classes are plain dataclasses. A field's ``metadata`` may carry ``min``, ``max`` and
``choices``; ``load_config`` checks every value against its annotated type and these bounds
and raises ``ConfigError`` naming the file and the dotted key. Unknown keys are errors: a typo
must never silently fall back to a default.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override is invalid. The message names the file and the key."""


def spec(default: Any = dataclasses.MISSING, *, min: float | None = None,
         max: float | None = None, choices: typing.Iterable | None = None,
         factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with bounds, e.g. ``batch: int = spec(64, min=1)``."""
    meta = {"min": min, "max": max, "choices": tuple(choices) if choices else None}
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def load_config(cls: type[T], path: str | Path | None = None,
                overrides: typing.Sequence[str] | dict | None = None) -> T:
    """Build ``cls`` from a YAML file and CLI overrides.

    Args:
        cls: the config dataclass.
        path: YAML file; ``None`` uses the dataclass defaults.
        overrides: ``["section.key=value", ...]`` (values parsed as YAML) or a nested dict.

    Raises:
        ConfigError: unreadable file, unknown key, wrong type or out-of-range value.
    """
    origin = str(path) if path is not None else "<defaults>"
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{p}: not valid YAML{where}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping of keys")
        data = loaded
    if overrides:
        # The file is checked on its own first, so that a bad override blames the command
        # line (the key it set), never the file.
        _build(cls, data, origin, prefix="")
        data = _merge(data, _parse_overrides(overrides), origin="command line")
        origin = "command line"
    return _build(cls, data, origin, prefix="")


def to_dict(cfg: Any) -> dict:
    """The resolved config as plain data (for saving next to a run)."""
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _parse_overrides(overrides: typing.Sequence[str] | dict) -> dict:
    if isinstance(overrides, dict):
        return overrides
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"command line: override {item!r} must look like key.path=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def _merge(base: dict, extra: dict, origin: str) -> dict:
    merged = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = _merge(merged[k], v, origin)
        else:
            merged[k] = v
    return merged


def _build(cls: type, data: Any, origin: str, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: {prefix.rstrip('.') or '<top>'}: expected a mapping, "
                          f"got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = prefix + str(unknown[0])
        raise ConfigError(f"{origin}: {key}: unknown key (known keys here: "
                          f"{', '.join(sorted(fields))})")
    kwargs = {}
    for name, value in data.items():
        f = fields[name]
        key = prefix + name
        kwargs[name] = _check(hints[name], value, f.metadata, origin, key)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        text = str(exc)  # a message that already names its dotted key keeps it as the key
        if not (prefix and text.startswith(prefix)):
            text = f"{prefix.rstrip('.') or '<top>'}: {text}"
        raise ConfigError(f"{origin}: {text}") from None


def _check(tp: Any, value: Any, meta: typing.Mapping, origin: str, key: str) -> Any:
    origin_tp = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin_tp in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        errors = []
        for a in non_none:
            try:
                return _check(a, value, meta, origin, key)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    if dataclasses.is_dataclass(tp):
        return _build(tp, value if value is not None else {}, origin, key + ".")
    if origin_tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{origin}: {key}: expected a list, got {value!r}")
        item_tp = args[0] if args else Any
        items = [_check(item_tp, v, {}, origin, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin_tp is tuple else items
    if origin_tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{origin}: {key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{origin}: {key}: expected true or false, got {value!r}")
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{origin}: {key}: expected an integer, got {value!r}")
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{origin}: {key}: expected a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):  # NaN passes every bound check; inf is never meant
            raise ConfigError(f"{origin}: {key}: {value!r} is not a finite number")
    elif tp is str and not isinstance(value, str):
        raise ConfigError(f"{origin}: {key}: expected a string, got {value!r}")
    lo, hi, choices = meta.get("min"), meta.get("max"), meta.get("choices")
    if lo is not None and value < lo:
        raise ConfigError(f"{origin}: {key}: {value!r} is below the minimum {lo}")
    if hi is not None and value > hi:
        raise ConfigError(f"{origin}: {key}: {value!r} is above the maximum {hi}")
    if choices is not None and value not in choices:
        raise ConfigError(f"{origin}: {key}: {value!r} is not one of {list(choices)}")
    return value
