"""Checking a stage's ``args`` against the fields and type annotations of a config dataclass (or a function's
keyword arguments), with "did you mean" for unknown keys.

Values come from YAML, so two conversions are allowed and nothing else: an integer where a float is expected, and a
string that spells a number where a float is expected (PyYAML reads ``1e-4`` as the string ``"1e-4"``, YAML 1.1).
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import re
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from .recipe import RecipeError, unknown_key_error

_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
_NO_VALUE = object()


def accepted_fields(target: Any) -> dict[str, Any]:
    """name -> annotation of a dataclass's init fields, or of a function's keyword parameters."""
    if dataclasses.is_dataclass(target):
        try:
            hints = typing.get_type_hints(target)
        except Exception:  # unresolved forward references: check names only
            hints = {}
        return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(target) if f.init}
    signature = inspect.signature(target)
    try:
        hints = typing.get_type_hints(target)
    except Exception:
        hints = {}
    return {
        name: hints.get(name, Any)
        for name, p in signature.parameters.items()
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    }


def describe(annotation: Any) -> str:
    if annotation is type(None):
        return "null"
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in typing.get_args(annotation))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in annotation)
    if origin in (list, tuple, Sequence, set) or annotation in (list, tuple):
        return "a list"
    if origin in (dict, Mapping) or annotation is dict:
        return "a mapping"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def coerce(value: Any, annotation: Any) -> Any:
    """Return ``value`` (possibly converted) if it fits ``annotation``; ``_NO_VALUE`` if it does not."""
    if annotation is Any or isinstance(annotation, (str, typing.TypeVar)):
        return value
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        members = typing.get_args(annotation)
        for member in members:  # exact matches first, so "1e-4" stays a string where a string is accepted
            if _exact(value, member):
                return value
        for member in members:
            out = coerce(value, member)
            if out is not _NO_VALUE:
                return out
        return _NO_VALUE
    if origin is typing.Literal:
        return value if value in typing.get_args(annotation) else _NO_VALUE
    if annotation is type(None):
        return value if value is None else _NO_VALUE
    if annotation is bool:
        return value if isinstance(value, bool) else _NO_VALUE
    if annotation is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _NO_VALUE
    if annotation is float:
        if isinstance(value, bool):
            return _NO_VALUE
        if isinstance(value, (int, float)):
            return value  # an int is a valid float; kept as written (logging_steps: 1 stays 1)
        if isinstance(value, str) and _FLOAT.match(value.strip()):
            return float(value)
        return _NO_VALUE
    if annotation is str:
        return value if isinstance(value, str) else _NO_VALUE
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        if isinstance(value, annotation):
            return value
        return value if value in [m.value for m in annotation] else _NO_VALUE
    if origin in (list, tuple, Sequence, set) or annotation in (list, tuple):
        if not isinstance(value, list):
            return _NO_VALUE
        args = typing.get_args(annotation)
        if len(args) == 1 or (len(args) == 2 and args[1] is Ellipsis):
            out = [coerce(v, args[0]) for v in value]
            return _NO_VALUE if any(v is _NO_VALUE for v in out) else out
        return value
    if origin in (dict, Mapping) or annotation is dict:
        return value if isinstance(value, dict) else _NO_VALUE
    return value  # callables, classes, objects: not checkable from YAML, let the config decide


def _exact(value: Any, annotation: Any) -> bool:
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation in (int, float, str):
        return isinstance(value, annotation) and not isinstance(value, bool)
    return False


def check_args(args: Mapping[str, Any], target: Any, *, where: str, what: str,
               reserved: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Validate ``args`` against ``target`` (a dataclass or a function); returns the coerced args.

    ``reserved`` maps keys the runner sets itself to the reason (shown as the fix).
    """
    known = accepted_fields(target)
    out: dict[str, Any] = {}
    for key, value in args.items():
        if reserved and key in reserved:
            raise RecipeError(f"{where}.{key}", f"`{key}` is set by the runner", reserved[key])
        if key not in known:
            raise unknown_key_error(where, str(key), list(known), what)
        fixed = coerce(value, known[key])
        if fixed is _NO_VALUE:
            raise RecipeError(f"{where}.{key}", f"expected {describe(known[key])}, got {type(value).__name__} "
                              f"{value!r}", f"write {describe(known[key])} (see {what})")
        out[key] = fixed
    return out
