"""Config dataclasses -> command line, with YAML layered under the flags.

Every command takes one dataclass. Each field is declared with `option(default, "help")`; the
help text and default appear in `--help`. Precedence: dataclass defaults < `--config FILE.yaml` <
command-line flags. A YAML key that is not a field is an error naming the key (and the closest
field), as is a value of the wrong type. Nested dataclasses become nested YAML mappings and dotted
flags (`--generation.temperature 0.7`). Validation lives in each dataclass's `__post_init__`,
which raises `ConfigError`.

This module imports only the standard library and PyYAML, so `noisepo --help` stays fast.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

from noisepo.errors import ConfigError

SCIENTIFIC = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")  # 1e-5, 3.0E+2, .5e-3

_MISSING = dataclasses.MISSING


def option(default: Any = _MISSING, help: str = "", *, choices=None, positional: bool = False,
           metavar: str | None = None, default_factory=_MISSING):
    """A config field with its help text (shown by `--help`)."""
    metadata = {"help": help, "choices": choices, "positional": positional, "metavar": metavar}
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    if default is _MISSING:
        return dataclasses.field(metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def check(condition: bool, key: str, message: str) -> None:
    """Validation in a config's `__post_init__`: ConfigError naming `key` unless `condition`."""
    if not condition:
        raise ConfigError(message, key=key)


# --------------------------------------------------------------------------- types
def _resolved_hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap_optional(tp) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _type_name(tp) -> str:
    base, optional = _unwrap_optional(tp)
    origin = typing.get_origin(base)
    if origin is list:
        (inner,) = typing.get_args(base) or (str,)
        name = f"list of {getattr(inner, '__name__', str(inner))}"
    elif origin is typing.Literal:
        name = "one of " + ", ".join(repr(a) for a in typing.get_args(base))
    else:
        name = getattr(base, "__name__", str(base))
    return name + (" or null" if optional else "")


def coerce(value: Any, tp, key: str, *, from_string: bool = False) -> Any:
    """Check (YAML) or convert (command line) `value` to field type `tp`; ConfigError if it cannot."""
    base, optional = _unwrap_optional(tp)
    if value is None or (from_string and optional and value in ("none", "null", "None")):
        if optional:
            return None
        raise ConfigError(f"must be {_type_name(tp)}, got null", key=key)
    origin = typing.get_origin(base)
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if from_string and str(value).lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
                return str(value).lower() in ("true", "1", "yes", "on")
            raise TypeError
        if base is int:
            if isinstance(value, bool):
                raise TypeError
            if isinstance(value, int):
                return value
            if from_string:
                return int(value)
            raise TypeError
        if base is float:
            if isinstance(value, bool):
                raise TypeError
            if isinstance(value, (int, float)):
                return float(value)
            # PyYAML (YAML 1.1) reads `1e-5`, with no dot, as a string: take it as the number meant.
            if from_string or (isinstance(value, str) and SCIENTIFIC.fullmatch(value.strip())):
                return float(value)
            raise TypeError
        if base is str:
            if isinstance(value, str):
                return value
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return str(value)  # YAML reads `model: 123` as an int; a name is still a name
            raise TypeError
        if origin is list:
            (inner,) = typing.get_args(base) or (str,)
            if from_string and isinstance(value, str):
                value = [v for v in value.split(",") if v != ""]
            if not isinstance(value, list):
                raise TypeError
            return [coerce(v, inner, key, from_string=from_string) for v in value]
        if origin is typing.Literal:
            allowed = typing.get_args(base)
            if value in allowed:
                return value
            raise ConfigError(f"must be one of {', '.join(map(str, allowed))}; got {value!r}", key=key)
        if base is dict or origin is dict:
            if isinstance(value, dict):
                return value
            raise TypeError
    except (TypeError, ValueError):
        raise ConfigError(f"must be {_type_name(tp)}, got {value!r}", key=key) from None
    return value


# --------------------------------------------------------------------------- dict -> dataclass
def _is_config(tp) -> bool:
    return dataclasses.is_dataclass(tp) and isinstance(tp, type)


def from_dict(cls, data: dict, *, prefix: str = "", path=None):
    """Build `cls` from a (possibly nested) mapping, rejecting unknown keys by name."""
    if not isinstance(data, dict):
        raise ConfigError(f"must be a mapping, got {type(data).__name__}", key=prefix.rstrip(".") or None,
                          path=path)
    hints = _resolved_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        full = prefix + key
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown key{hint}; known keys: {', '.join(sorted(fields))}", key=full,
                              path=path)
        tp = hints[key]
        if _is_config(tp):
            if not isinstance(value, tp):
                # A section given in part keeps the parent's default for the rest (SPINConfig's
                # `dsl` default has enabled=False; `--dsl.scorer x` must not switch it back on).
                default = _default_of(fields[key])
                base = dataclasses.asdict(default) if dataclasses.is_dataclass(default) else {}
                value = from_dict(tp, _merge(base, value or {}), prefix=full + ".", path=path)
            kwargs[key] = value
        else:
            kwargs[key] = coerce(value, tp, full)
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is _MISSING
               and f.default_factory is _MISSING]
    if missing:
        raise ConfigError("is required", key=prefix + missing[0], path=path)
    try:
        return cls(**kwargs)
    except ConfigError as err:
        if path is not None and err.path is None:
            err.path = str(path)
        if err.key and prefix and not err.key.startswith(prefix):
            err.key = prefix + err.key
        raise


def to_dict(config) -> dict:
    """The config as plain data (for manifests and YAML)."""
    return dataclasses.asdict(config)


def load_yaml(path) -> dict:
    import yaml

    path = Path(path)
    if not path.exists():
        raise ConfigError("config file not found", path=path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"not valid YAML{where}: {getattr(err, 'problem', err)}", path=path) from None
    except UnicodeDecodeError:
        raise ConfigError("not UTF-8 text", path=path) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("the top level must be a mapping of option names to values", path=path)
    return data


# --------------------------------------------------------------------------- argparse
def _walk(cls, prefix: str = ""):
    """Yield (dotted_name, field, type) for every leaf field, depth first."""
    for name, f, tp, _ in _walk_with_defaults(cls, prefix):
        yield name, f, tp


def _walk_with_defaults(cls, prefix: str = "", section_default: Any = None):
    """As `_walk`, with each leaf's effective default: a section's own default (e.g. ROPOConfig's
    `training` factory with ROPO's learning rate) wins over the section class's field default."""
    hints = _resolved_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = hints[f.name]
        default = getattr(section_default, f.name) if section_default is not None else _default_of(f)
        if _is_config(tp):
            yield from _walk_with_defaults(tp, prefix + f.name + ".",
                                           default if dataclasses.is_dataclass(default) else None)
        else:
            yield prefix + f.name, f, tp, default


def _default_of(f) -> Any:
    if f.default is not _MISSING:
        return f.default
    if f.default_factory is not _MISSING:
        return f.default_factory()
    return _MISSING


def add_config_arguments(parser: argparse.ArgumentParser, cls, *, with_config_file: bool = True) -> None:
    """Add one flag per field of `cls` (dotted for nested configs); defaults are left unset."""
    if with_config_file:
        parser.add_argument("--config", metavar="FILE.yaml", default=None,
                            help="YAML file of options (keys are the option names below, nested "
                                 "sections for dotted ones); command-line flags override it.")
    for name, f, tp, default in _walk_with_defaults(cls):
        meta = f.metadata
        base, _ = _unwrap_optional(tp)
        help_text = meta.get("help", "")
        if default is _MISSING or default == "":  # "" marks a required path/name in our configs
            help_text += " (required)"
        else:
            shown = ",".join(map(str, default)) if isinstance(default, list) else default
            help_text += f" (default: {shown})"
        help_text = help_text.replace("%", "%%")
        choices = meta.get("choices")
        if typing.get_origin(base) is typing.Literal:
            choices = list(typing.get_args(base))
        if meta.get("positional"):
            many = typing.get_origin(base) is list  # RUN_DIR ...: any number of them
            parser.add_argument(name, metavar=meta.get("metavar") or name.upper(), help=help_text,
                                nargs="*" if many else None if default is _MISSING else "?",
                                default=argparse.SUPPRESS)
            continue
        flag = "--" + name.replace("_", "-")
        if base is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
        else:
            metavar = meta.get("metavar") or (None if choices else _metavar(base))
            parser.add_argument(flag, dest=name, default=argparse.SUPPRESS, help=help_text,
                                metavar=metavar, choices=choices)


def _metavar(base) -> str:
    if base is int:
        return "INT"
    if base is float:
        return "FLOAT"
    if typing.get_origin(base) is list:
        return "A,B,..."
    return "STR"


def _nest(flat: dict[str, Any]) -> dict:
    nested: dict = {}
    for dotted, value in flat.items():
        node = nested
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return nested


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        key = key.replace("-", "_") if isinstance(key, str) else key
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def config_from_namespace(cls, namespace: argparse.Namespace):
    """Layer defaults < YAML (`namespace.config`) < flags, then build and validate `cls`."""
    given = {k: v for k, v in vars(namespace).items() if k not in ("config", "command", "_handler")}
    types_by_name = {name: tp for name, _, tp in _walk(cls)}
    flags = {}
    for name, value in given.items():
        if name in types_by_name:
            flags[name] = coerce(value, types_by_name[name], name, from_string=isinstance(value, str))
    config_path = getattr(namespace, "config", None)
    data = load_yaml(config_path) if config_path else {}
    merged = _merge(data, _nest(flags))
    return from_dict(cls, merged, path=config_path if config_path and not flags else config_path)


def parse_config(cls, argv: list[str] | None = None, *, prog: str | None = None, description: str = ""):
    """Parse a command line into `cls` (used by scripts outside the main CLI)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_config_arguments(parser, cls)
    namespace = parser.parse_args(sys.argv[1:] if argv is None else argv)
    return config_from_namespace(cls, namespace)
