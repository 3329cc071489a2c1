"""Config files: the config tree as YAML (or JSON), merged over a preset and under `--set`.

    python driver.py --config configs/smollm2_cpu.yaml --set train.steps=10
    python driver.py --preset qwen25_1p5b_from_7b --print-config > my_run.yaml     # every setting, resolved

A file holds any part of the tree (`section: {field: value}`); what it leaves out keeps the preset's value. An
unknown section or field is refused with one line naming the nearest valid one; values are checked against the
field's type (YAML's `1e-6` is a string to YAML and a float here), then the whole config is validated once.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from pathlib import Path

import yaml

from opd.config import Config, ConfigError
from opd.overrides import _parse_value


def load_tree(path: str | Path) -> dict:
    """The mapping in a .yaml / .yml / .json file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    text = path.read_text()
    try:
        tree = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        mark = getattr(e, "problem_mark", None)  # yaml: 0-based line / column
        line = mark.line + 1 if mark is not None else getattr(e, "lineno", None)
        problem = getattr(e, "problem", None) or getattr(e, "msg", None) or str(e).splitlines()[0]
        raise ConfigError(f"--config {path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}"
                          f"{f' at line {line}' if line else ''}: {problem}") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"--config {path}: expected a mapping of sections (model:, train:, ...), "
                          f"found a {type(tree).__name__}")
    return tree


def merge(cfg: Config, tree: dict, where: str = "--config") -> Config:
    """`cfg` with every setting of `tree` applied, validated once at the end."""
    merged = cfg.to_dict()
    sections = {f.name: f.type for f in dataclasses.fields(Config)}
    hints = typing.get_type_hints(Config)
    for section, fields in tree.items():
        if section not in sections:
            raise ConfigError(f"{where}: unknown section {section!r}{_nearest(section, sections)}")
        if not isinstance(fields, dict):
            raise ConfigError(f"{where}: {section} must be a mapping of its fields, found {fields!r}")
        field_hints = typing.get_type_hints(hints[section])
        for name, value in fields.items():
            if name not in field_hints:
                raise ConfigError(f"{where}: unknown setting {section}.{name}"
                                  f"{_nearest(name, field_hints, prefix=section + '.')}")
            merged[section][name] = _coerce(value, field_hints[name], f"{where}: {section}.{name}")
    from opd.overrides import config_from_dict

    return config_from_dict(merged, where)


def to_yaml(cfg: Config) -> str:
    """Every setting of `cfg`, section by section, in the classes' order (`merge` of it over any preset gives
    `cfg` back)."""
    tree = json.loads(json.dumps(cfg.to_dict()))  # tuples as lists
    return yaml.safe_dump(tree, sort_keys=False, default_flow_style=False, width=100)


def _coerce(value, hint, where: str):
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if value is None:
        if type(None) in typing.get_args(hint):
            return None
        raise ConfigError(f"{where}: may not be empty (expected {_type_name(hint)})")
    if origin is tuple:
        if isinstance(value, str):
            value = [p.strip() for p in value.strip("()[] ").split(",") if p.strip()]
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ConfigError(f"{where}={value!r}: expected a list of {len(args)} values")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args, strict=True))
    if args and origin is not None:  # X | None
        return _coerce(value, args[0], where)
    if isinstance(value, str) and hint is not str:
        try:
            value = _parse_value(value, hint)
        except (ValueError, TypeError):
            raise ConfigError(f"{where}={value!r}: expected {_type_name(hint)}") from None
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{where}={value!r}: expected {_type_name(hint)}")
    return value


def _type_name(hint) -> str:
    return getattr(hint, "__name__", str(hint))


def _nearest(name: str, valid, prefix: str = "") -> str:
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    if close:
        return f"; did you mean {prefix}{close[0]}?"
    return f"; valid: {', '.join(prefix + v for v in valid)}"
