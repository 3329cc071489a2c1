"""A config tree from text: one `--set section.field=value` at a time, or a saved `to_dict()` form (config.json).

Values are parsed by the field's type hint; the result is validated again, as every config is on construction.
"""

from __future__ import annotations

import dataclasses
import types
import typing

from opd.config import Config, ConfigError, _require


def _parse_value(raw: str, hint) -> object:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if raw.lower() in ("none", "null"):
            return None
        return _parse_value(raw, args[0])
    if origin is tuple:
        parts = [p for p in raw.strip("()[] ").split(",") if p.strip()]
        return tuple(_parse_value(p.strip(), a) for p, a in zip(parts, typing.get_args(hint), strict=True))
    if hint is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(raw)
    if hint in (int, float):
        return hint(raw)
    return raw


def override(cfg, assignment: str):
    """Return `cfg` with one `section.field=value` assignment applied (validated again)."""
    key, sep, raw = assignment.partition("=")
    _require(bool(sep) and bool(key), f"--set {assignment!r}: write it as section.field=value")
    path = key.strip().split(".")

    def apply(node, names):
        hints = typing.get_type_hints(type(node))
        name = names[0]
        _require(dataclasses.is_dataclass(node) and name in hints,
                 f"--set {key}: no such setting; settings are {_setting_names(cfg)}")
        if len(names) == 1:
            _require(not dataclasses.is_dataclass(getattr(node, name)),
                     f"--set {key}: is a section; set one of its fields")
            try:
                value = _parse_value(raw.strip(), hints[name])
            except (ValueError, TypeError):
                raise ConfigError(f"--set {key}={raw}: expected a value of type {hints[name]}") from None
            return dataclasses.replace(node, **{name: value})
        return dataclasses.replace(node, **{name: apply(getattr(node, name), names[1:])})

    return apply(cfg, path)


def config_from_dict(saved: dict, where: str = "config", cls=None):
    """The config tree from its `to_dict()` form (a run's config.json); fields it lacks take their defaults."""
    cls = cls or Config
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    _require(isinstance(saved, dict) and set(saved) <= names,
             f"{where}: unknown settings {sorted(set(saved) - names) if isinstance(saved, dict) else saved!r} "
             f"for {cls.__name__}: was it written by another version of this project?")
    kwargs = {}
    for name, value in saved.items():
        if dataclasses.is_dataclass(hints[name]):
            value = config_from_dict(value, where, hints[name])
        elif typing.get_origin(hints[name]) is tuple:
            value = tuple(value)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required setting is missing
        raise ConfigError(f"{where}: {e}") from None


def _setting_names(cfg) -> str:
    names = []
    for section in dataclasses.fields(cfg):
        names += [f"{section.name}.{f.name}" for f in dataclasses.fields(getattr(cfg, section.name))]
    return ", ".join(names)
