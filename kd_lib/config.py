"""Typed configs: dataclasses loaded from YAML, dicts or command-line flags.

Every stage has one config dataclass. The same fields are the YAML keys, the
``--flag-name`` options of its CLI and its KFP parameters. Unknown keys,
missing required fields and values of the wrong type are :class:`ConfigError`
naming the field; a config class may add value checks in ``validate()``.

The dataclass is the one source of its fields' help (:func:`field_help`): a
field's text is its ``help`` metadata or its attribute docstring (the string
literal under it); its choices are those of its ``Literal`` type; it is
required when ``validate()`` refuses its default saying ``is required``.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import functools
import inspect
import textwrap
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config field is unknown, missing or has a bad value."""

    def __init__(self, field: str, message: str, where: str = "config"):
        self.field = field
        self.message = message
        super().__init__(f"{where}: field {field!r}: {message}")


def check(condition: bool, field: str, message: str) -> None:
    """Raise :class:`ConfigError` for ``field`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(field, message)


def check_name(value: str, names: Sequence[str], field: str, what: str) -> None:
    """Raise :class:`ConfigError` for ``field`` unless ``value`` is one of ``names`` (``what``
    they are); the message gives the close matches (:func:`difflib.get_close_matches`)."""
    if value not in names:
        close = difflib.get_close_matches(value, names, n=5)
        hint = f"close matches: {', '.join(close)}" if close else f"none of the {len(names)} known is close"
        raise ConfigError(field, f"unknown {what} {value!r} ({hint})")


def _coerce(value: Any, kind: Any, field: str) -> Any:
    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(field, f"must be one of {list(args)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], field)
    if origin in (list, Sequence, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(field, f"must be a list, got {value!r}")
        return [_coerce(v, args[0], field) for v in value]
    if origin in (dict, Mapping):
        if isinstance(value, str):  # command line: name=value,name=value
            pairs = [item.partition("=") for item in value.split(",") if item]
            if any(not sep for _, sep, _ in pairs):
                raise ConfigError(field, f"must be name=value pairs separated by commas, got {value!r}")
            value = {name: item for name, _, item in pairs}
        if not isinstance(value, Mapping):
            raise ConfigError(field, f"must be a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1], field) for k, v in value.items()}
    if kind is bool:
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        if not isinstance(value, bool):
            raise ConfigError(field, f"must be true or false, got {value!r}")
        return value
    if kind in (int, float):
        noun = "an integer" if kind is int else "a number"
        fractional = kind is int and isinstance(value, float) and not value.is_integer()
        if isinstance(value, bool) or not isinstance(value, (int, float, str)) or fractional:
            raise ConfigError(field, f"must be {noun}, got {value!r}")
        try:
            return kind(value)  # an integral float (JSON/protobuf numbers of KFP structs) gives an int
        except ValueError:
            raise ConfigError(field, f"must be {noun}, got {value!r}") from None
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(field, f"must be a string, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: Mapping[str, Any], where: str | None = None) -> T:
    """Build ``cls`` from ``data``, checking names, types and values."""
    where = where or f"{cls.__name__}"
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(unknown[0], f"unknown field (known fields: {', '.join(fields)})", where)
    values = {}
    for name, field in fields.items():
        if name in data:
            try:
                values[name] = _coerce(data[name], hints[name], name)
            except ConfigError as err:
                raise ConfigError(name, err.message, where) from None
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(name, "is required", where)
    config = cls(**values)
    validate = getattr(config, "validate", None)
    if validate is not None:
        try:
            validate()
        except ConfigError as err:
            raise ConfigError(err.field, err.message, where) from None
    return config


def load_yaml(uri: str) -> dict[str, Any]:
    """A YAML mapping from ``uri`` (any fsspec location)."""
    from kd_lib.io.fs import read_text

    try:
        data = yaml.safe_load(read_text(uri)) or {}
    except yaml.YAMLError as err:
        raise ConfigError("<root>", f"not valid YAML: {' '.join(str(err).split())}", uri) from None
    if not isinstance(data, dict):
        raise ConfigError("<root>", "a config file must hold a mapping of field: value", uri)
    return data


def flag_name(name: str) -> str:
    """The command-line flag of field ``name``: ``--batch-size`` for ``batch_size``."""
    return "--" + name.replace("_", "-")


def flag_text(value: Any) -> str:
    """``value`` as typed after its flag, as :func:`from_dict` reads it back: ``true``/``false``,
    lists comma-separated, mappings as ``name=value`` pairs separated by commas."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, Mapping):
        return ",".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def field_default(field: dataclasses.Field) -> Any:
    """A dataclass field's default value (None when it has none)."""
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None if field.default is dataclasses.MISSING else field.default


def to_flags(config: Any) -> list[str]:
    """The flags that :func:`add_arguments` and :func:`from_args` read back into ``config``:
    one per field that differs from its default."""
    flags = []
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if value != field_default(field):
            flags += [flag_name(field.name), flag_text(value)]
    return flags


@functools.cache
def attribute_docs(cls: type) -> dict[str, str]:
    """The attribute docstring of each field of the dataclass ``cls`` or its bases, on one line."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            [tree] = ast.parse(textwrap.dedent(inspect.getsource(klass))).body
        except (OSError, TypeError, ValueError):  # no source (e.g. built in a REPL)
            continue
        for node, after in zip(tree.body, tree.body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def required_fields(cls: type) -> dict[str, str]:
    """The fields whose default ``validate()`` refuses as required, with its reason: each one it
    names is given a stand-in value and the config validated again, until it passes or fails
    for another reason."""
    hints = typing.get_type_hints(cls)
    stand_ins = {str: "-", dict: {"-": "-"}, list: ["-"]}
    values: dict[str, Any] = {}
    required: dict[str, str] = {}
    validate = getattr(cls, "validate", None)
    while validate is not None:
        try:
            validate(cls(**values))
            break
        except ConfigError as err:
            kind = typing.get_origin(hints.get(err.field)) or hints.get(err.field)
            if not err.message.startswith("is required") or err.field in values or kind not in stand_ins:
                break
            required[err.field] = err.message.removeprefix("is required").lstrip(": ")
            values[err.field] = stand_ins[kind]
    return required


def field_texts(cls: type) -> dict[str, str]:
    """What each field of ``cls`` is: its ``help`` metadata (a callable: help written when asked, e.g. from
    a registry), else its attribute docstring."""
    docs = attribute_docs(cls)
    texts = {}
    for field in dataclasses.fields(cls):
        text = field.metadata.get("help") or docs.get(field.name, "")
        texts[field.name] = text() if callable(text) else text
    return texts


def field_help(cls: type) -> dict[str, str]:
    """One line of help per field of ``cls``: its text, choices, default or required mark."""
    hints = typing.get_type_hints(cls)
    texts = field_texts(cls)
    required = required_fields(cls)
    lines = {}
    for field in dataclasses.fields(cls):
        text = texts[field.name]
        kind = hints[field.name]
        choices = typing.get_args(kind) if typing.get_origin(kind) is typing.Literal else ()
        parts = [f"choices: {', '.join(map(str, choices))}"] if choices else []
        if field.name in required:
            parts.append(f"REQUIRED{': ' + required[field.name] if required[field.name] else ''}"
                         if not text else "REQUIRED")
        else:
            parts.append(f"default: {flag_text(field_default(field)) or repr('')}")
        lines[field.name] = f"{text} ({'; '.join(parts)})" if text else f"({'; '.join(parts)})"
    return lines


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--flag`` per field of ``cls`` with its :func:`field_help` (values are parsed by
    :func:`from_dict`)."""
    parser.add_argument("--config", metavar="YAML", help="config file; flags override its fields")
    hints = typing.get_type_hints(cls)
    for field, text in zip(dataclasses.fields(cls), field_help(cls).values()):
        switch = {"nargs": "?", "const": "true"} if hints[field.name] is bool else {}  # --force = --force true
        parser.add_argument(flag_name(field.name), dest=field.name, default=argparse.SUPPRESS,
                            metavar=field.name.upper(), help=text.replace("%", "%%"), **switch)


def from_args(cls: type[T], args: argparse.Namespace) -> T:
    """The config given by ``--config FILE`` and flags (flags win)."""
    values = vars(args).copy()
    path = values.pop("config", None)
    data = load_yaml(path) if path else {}
    names = {f.name for f in dataclasses.fields(cls)}
    data.update({k: v for k, v in values.items() if k in names})
    return from_dict(cls, data, where=path or cls.__name__)
