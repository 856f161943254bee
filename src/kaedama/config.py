"""Frozen stage configs <-> command-line flags, YAML files and ``key=value`` overrides.

Every stage has one frozen dataclass for its configuration. CLI flags (and KFP
parameters) mirror its fields one to one, so this module derives the flags from
the dataclass instead of repeating them by hand.

Field metadata understood here:
    help:     one-line help text for ``--help``.
    choices:  allowed values (``typing.Literal`` fields get them automatically).
    cli:      ``False`` keeps a field off the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import yaml

from kaedama.errors import KaedamaError

T = TypeVar("T")


class ConfigError(KaedamaError, ValueError):
    """A configuration value is unknown or has the wrong type."""


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(name: str, tp: Any, value: Any) -> Any:
    """Convert ``value`` (from YAML or a string) to the field type ``tp``."""
    tp, optional = _unwrap_optional(tp)
    if value is None or (
        optional and isinstance(value, str) and value.lower() in ("", "none", "null")
    ):
        return None
    origin = typing.get_origin(tp)
    try:
        if origin is typing.Literal:
            allowed = typing.get_args(tp)
            if value not in allowed:
                raise ConfigError(f"{name}: {value!r} is not one of {list(allowed)}")
            return value
        if origin in (tuple, list):
            args = typing.get_args(tp)
            item_tp = args[0] if args else str
            if isinstance(value, str):
                value = [v for v in value.split(",") if v.strip()] if value.strip() else []
            items = [_coerce(name, item_tp, v) for v in value]
            return tuple(items) if origin is tuple else items
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"{name}: expected true/false, got {value!r}")
        if tp in (int, float, str):
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ConfigError(f"{name}: expected an integer, got {value!r}")
            return tp(value)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(
            f"{name}: cannot read {value!r} as {getattr(tp, '__name__', tp)}"
        ) from exc
    return value


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def config_fields(cls: type) -> list[dataclasses.Field]:
    """The dataclass fields of ``cls`` that appear on the command line."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True)]


def add_config_arguments(
    parser: argparse.ArgumentParser, cls: type, *, underscore_aliases: bool = False
) -> None:
    """Add one ``--flag`` per field of the frozen dataclass ``cls``.

    Defaults are left as ``None`` (argparse.SUPPRESS) so that a YAML file or a
    ``--set`` override is not silently replaced by a flag nobody passed.

    Args:
        underscore_aliases: also accept ``--field_name`` for ``--field-name``. Beam's
            own options are spelled with underscores, and Beam keeps (and ignores) an
            option it cannot parse, so a job's flags must accept that spelling too.
    """
    hints = _hints(cls)
    group = parser.add_argument_group(f"{cls.__name__} (mirrors the config fields)")
    for f in config_fields(cls):
        tp, _ = _unwrap_optional(hints[f.name])
        flags = ["--" + f.name.replace("_", "-")]
        if underscore_aliases and "_" in f.name:
            flags.append("--" + f.name)
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        help_text = f.metadata.get("help", "")
        help_text = f"{help_text} (default: {default!r})" if help_text else f"default: {default!r}"
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        origin = typing.get_origin(tp)
        if tp is bool:
            group.add_argument(*flags, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if origin is typing.Literal:
            kwargs["choices"] = list(typing.get_args(tp))
        elif "choices" in f.metadata:
            kwargs["choices"] = list(f.metadata["choices"])
        if origin in (tuple, list):
            kwargs["metavar"] = "A,B,..."
        group.add_argument(*flags, type=str if origin in (tuple, list) else None, **kwargs)


def add_stage_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add ``--config FILE``, repeatable ``--set KEY=VALUE`` and one flag per field of ``cls``."""
    parser.add_argument("--config", metavar="FILE", help=f"YAML file with {cls.__name__} fields")
    parser.add_argument(
        "--set",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help=f"override one {cls.__name__} field (repeatable); flags win over --set, "
        "--set over --config",
    )
    add_config_arguments(parser, cls)


def config_from_args(cls: type[T], args: argparse.Namespace, **fixed: Any) -> T:
    """The stage config from arguments added by :func:`add_stage_arguments`.

    Precedence: defaults < ``--config`` file < ``--set`` < explicit flags < ``fixed``.
    """
    return build_config(
        cls,
        file=getattr(args, "config", None),
        overrides=parse_overrides(getattr(args, "set", None) or []),
        args=args,
        **fixed,
    )


def parse_overrides(pairs: Iterable[str]) -> dict[str, str]:
    """Turn ``["lr=0.1", "model=resnet18"]`` into a dict, with a clear error on bad syntax."""
    out: dict[str, str] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key.strip().replace("-", "_")] = value
    return out


def build_config(
    cls: type[T],
    *,
    file: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    args: argparse.Namespace | None = None,
    **fixed: Any,
) -> T:
    """Build a frozen config: defaults < YAML file < ``--set`` overrides < explicit flags.

    Args:
        cls: the stage's frozen dataclass.
        file: optional YAML (or JSON) file with a mapping of field names to values.
        overrides: ``key=value`` pairs already split by :func:`parse_overrides`.
        args: parsed flags added by :func:`add_config_arguments`.
        **fixed: values set by the caller (e.g. positional arguments).

    Returns:
        An instance of ``cls``; unknown keys and badly typed values raise ConfigError.
    """
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    layers: list[Mapping[str, Any]] = []
    if file:
        from kaedama import storage

        loaded = yaml.safe_load(storage.read_text(file)) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{file}: expected a mapping of config fields")
        layers.append(loaded)
    if overrides:
        layers.append(overrides)
    if args is not None:
        layers.append({k: v for k, v in vars(args).items() if k in names})
    layers.append(fixed)
    for layer in layers:
        for key, value in layer.items():
            key = key.replace("-", "_")
            if key not in names:
                raise ConfigError(
                    f"unknown {cls.__name__} field {key!r}; known fields: {', '.join(sorted(names))}"
                )
            values[key] = _coerce(key, hints[key], value)
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigError(f"{cls.__name__}: {exc}") from exc


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON-friendly dict of a config dataclass (tuples become lists)."""
    return {
        k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()
    }
