"""Frozen-dataclass configs with a TOML form and CLI flags generated from the fields.

Every config in byteswarm is a frozen dataclass whose fields carry their own help text and
bounds in ``field(metadata=...)``; this module turns such a class into argparse flags, a
TOML section into an instance, and reports the first bad value as one clear sentence.
Precedence is: dataclass defaults < TOML file < CLI flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on 3.10
    import tomli as tomllib

T = TypeVar("T")


class ConfigError(ValueError):
    """A user-supplied configuration value is wrong; the message says which and why."""


def opt(default: Any, help: str, *, lo: float | None = None, hi: float | None = None,
        choices: tuple | None = None, lo_open: bool = False) -> Any:
    """A dataclass field with its help text and allowed range (``lo <= v <= hi``)."""
    meta = {"help": help, "lo": lo, "hi": hi, "choices": choices, "lo_open": lo_open}
    return dataclasses.field(default=default, metadata=meta)


def _base_type(tp: Any) -> tuple[type, bool]:
    """(underlying type, optional?) for annotations like ``int``, ``str | None``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(name: str, tp: Any, value: Any) -> Any:
    base, optional = _base_type(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{name}: must be set (got nothing)")
    if base is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: expected true/false, got {value!r}")
    if base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    if base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(float(value)):
                raise ConfigError(f"{name}: must be finite, got {value!r}")
            return float(value)
        raise ConfigError(f"{name}: expected a number, got {value!r}")
    if base is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{name}: expected a string, got {value!r}")
    raise TypeError(f"config field {name} has unsupported type {tp!r}")  # our bug, not the user's


def check_field(name: str, f: dataclasses.Field, value: Any) -> None:
    """Raise ConfigError if ``value`` is outside the field's declared range or choices."""
    if value is None:
        return
    m = f.metadata
    if m.get("choices") and value not in m["choices"]:
        raise ConfigError(f"{name}: must be one of {', '.join(map(str, m['choices']))}; "
                          f"got {value!r}")
    lo, hi = m.get("lo"), m.get("hi")
    if lo is not None and (value < lo or (m.get("lo_open") and value == lo)):
        op = ">" if m.get("lo_open") else ">="
        raise ConfigError(f"{name}: must be {op} {lo}, got {value!r}")
    if hi is not None and value > hi:
        raise ConfigError(f"{name}: must be <= {hi}, got {value!r}")


def validate(cfg: Any) -> None:
    """Check every field of a config instance against its declared type and range."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        _coerce(f.name, hints[f.name], value)
        check_field(f.name, f, value)


def from_mapping(cls: type[T], data: Mapping[str, Any], *, where: str = "config") -> T:
    """Build ``cls`` from a mapping, rejecting unknown keys, wrong types and bad ranges."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} "
                          f"(known: {', '.join(sorted(fields))})")
    values = {}
    for key, value in data.items():
        try:
            v = _coerce(key, hints[key], value)
            check_field(key, fields[key], v)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        values[key] = v
    cfg = cls(**values)
    post = getattr(cfg, "check", None)
    if post is not None:
        post()
    return cfg


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file, turning syntax errors and missing files into ConfigError."""
    p = Path(path)
    try:
        with p.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {p}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML ({e})") from None


def load_tables(path: str | Path | None, known: list[str]) -> dict[str, dict[str, Any]]:
    """A config file whose top level holds only the tables in ``known`` ({} if no path)."""
    file = load_toml(path) if path else {}
    unknown = sorted(set(file) - set(known))
    if unknown:
        raise ConfigError(f"{path}: unknown table [{unknown[0]}] (known: {', '.join(known)})")
    for name, value in file.items():
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: {name} must be a table")
    return file


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser, cls: type, *, title: str | None = None,
                  skip: tuple[str, ...] = ()) -> None:
    """Add one ``--flag`` per field of ``cls``; defaults stay None so TOML can fill them."""
    group = parser.add_argument_group(title or cls.__name__)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        base, _ = _base_type(hints[f.name])
        m = f.metadata
        default = f.default if f.default is not dataclasses.MISSING else None
        text = f"{m.get('help', '')} (default: {default})"
        if base is bool:
            group.add_argument(_flag(f.name), dest=f.name, default=None,
                               action=argparse.BooleanOptionalAction, help=text)
            continue
        kwargs: dict[str, Any] = {"dest": f.name, "default": None, "help": text,
                                  "type": base, "metavar": f.name.upper()}
        if m.get("choices"):
            kwargs["choices"] = m["choices"]
            kwargs.pop("metavar")
        group.add_argument(_flag(f.name), **kwargs)


def resolve(cls: type[T], args: argparse.Namespace, file_section: Mapping[str, Any] | None,
            *, where: str) -> T:
    """Defaults < TOML section < flags that were actually given on the command line."""
    data = dict(file_section or {})
    for f in dataclasses.fields(cls):
        v = getattr(args, f.name, None)
        if v is not None:
            data[f.name] = v
    return from_mapping(cls, data, where=where)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
