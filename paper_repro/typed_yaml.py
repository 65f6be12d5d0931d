"""YAML -> frozen dataclasses, strictly: what ``config`` builds the settings with (one line per mistake).

Why apart from config.py: these rules (a repeated key is an error, YAML 1.2 floats, unknown keys, types checked
against the dataclass annotations, finite numbers) are about reading a settings file, not about what the settings
mean; config.py says what each setting is and which values are valid.
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A setting is missing, unknown or out of range; the message names the key."""



class StrictLoader(yaml.SafeLoader):
    """YAML for params: a repeated key is an error (PyYAML keeps the last one silently), and floats follow
    YAML 1.2 (``1e6`` and ``5e-4`` are numbers; PyYAML's YAML 1.1 rules read them as strings)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise ConfigError(f"duplicate key {key!r} (lines {seen[key]} and {key_node.start_mark.line + 1})")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"), list("-+0123456789."))


def parse_yaml(text: str) -> Any:
    """``text`` read with StrictLoader (ConfigError for duplicate keys, as for invalid YAML)."""
    return yaml.load(text, Loader=StrictLoader)  # noqa: S506 - a SafeLoader subclass


def to_dict(obj: Any) -> Any:
    """Settings -> plain JSON-serialisable dict (for sidecars and provenance)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def apply_override(raw: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    dotted, value = item.split("=", 1)
    node = raw
    keys = dotted.split(".")
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {key} is not a section")
    try:
        node[keys[-1]] = parse_yaml(value)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: not valid YAML ({e.__class__.__name__})") from None


def build(cls: type, raw: Any, path: str) -> Any:
    """Dict -> dataclass ``cls``; ``path`` is the dotted key prefix used in error messages."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path or 'settings'} must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"unknown key {join(path, unknown[0])} (allowed: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in raw:
            kwargs[f.name] = _coerce(hints[f.name], raw[f.name], join(path, f.name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing key {join(path, f.name)}")
    return cls(**kwargs)


#: The words YAML 1.1 reads as booleans: a setting whose choices include one of them (amp: off) gets the word back.
YAML_BOOLEAN_WORDS = {True: ("y", "yes", "on", "true"), False: ("n", "no", "off", "false")}


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{key} must not be null")
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if origin is Literal:
        if isinstance(value, bool) and value not in args:  # YAML 1.1 read a word such as off as a boolean
            words = [a for a in args if isinstance(a, str) and a.lower() in YAML_BOOLEAN_WORDS[value]]
            if len(words) == 1:
                return words[0]
        if value not in args:
            hint = (" (YAML reads yes/no/on/off/true/false as a boolean)"
                    if isinstance(value, bool) and all(isinstance(a, str) for a in args) else "")
            raise ConfigError(f"{key} must be one of {list(args)}, got {value!r}{hint}")
        return value
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {type(value).__name__}")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {type(value).__name__}")
        return {k: _coerce(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported setting type {tp}")  # pragma: no cover - programming error


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def positive_or_none(value: int | None, key: str) -> None:
    check(value is None or value >= 1, f"{key} must be >= 1 or null, got {value}")
