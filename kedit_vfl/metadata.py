"""Typed reading of the JSON an artifact carries (its ``config`` and ``extra``).

An artifact's checksum proves only that nobody changed it since it was written; its
metadata can still be malformed (a file written by something else, or crafted with a
recomputed checksum). :func:`typed` rebuilds a config dataclass from that JSON with
every field's type checked, so such a file ends in one line naming the file and the
field, never in a ``TypeError`` deep inside model code.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, TypeVar

from kedit_vfl.errors import UserError

T = TypeVar("T")


class _Mismatch(Exception):
    """A value that does not have the type its field declares (message: where and what)."""


def _name(expected: Any) -> str:
    return getattr(expected, "__name__", None) or str(expected).replace("typing.", "")


def _convert(value: Any, expected: Any, where: str) -> Any:
    """``value`` checked against the annotation ``expected`` (JSON lists become tuples)."""
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if expected is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for arm in args:
            try:
                return _convert(value, arm, where)
            except _Mismatch:
                continue
        raise _Mismatch(f"{where}: expected {_name(expected)}, got {type(value).__name__}")
    if expected is type(None):
        if value is None:
            return None
    elif expected is bool:
        if isinstance(value, bool):
            return value
    elif expected is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif expected is float:
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    elif expected is str:
        if isinstance(value, str):
            return value
    elif origin is list and isinstance(value, list):
        return [_convert(v, args[0] if args else Any, f"{where}[{i}]") for i, v in enumerate(value)]
    elif origin is tuple and isinstance(value, list | tuple):
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if args and len(args) != len(value):
            raise _Mismatch(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(
            _convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(args, value, strict=True))
        )
    elif origin is dict and isinstance(value, dict):
        key_type, value_type = args or (Any, Any)
        return {
            _convert(k, key_type, where): _convert(v, value_type, f"{where}.{k}") for k, v in value.items()
        }
    raise _Mismatch(f"{where}: expected {_name(expected)}, got {type(value).__name__}")


def typed(cls: type[T], raw: Any, where: str, what: str) -> T:
    """``cls(**raw)`` with every field's type checked; unknown fields refused, missing ones
    take their defaults. ``where`` names the file, ``what`` the metadata field."""
    if not isinstance(raw, dict):
        raise UserError(f"{where}: artifact metadata is malformed ('{what}' is not a JSON object)")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(str(k)[:40] for k in raw if k not in fields)
    if unknown:
        raise UserError(
            f"{where}: artifact metadata is malformed ('{what}' has unknown fields {unknown[:5]})"
        )
    missing = [
        name
        for name, f in fields.items()
        if name not in raw and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise UserError(f"{where}: artifact metadata is malformed ('{what}' lacks {missing[:5]})")
    try:
        values = {name: _convert(value, hints[name], f"{what}.{name}") for name, value in raw.items()}
    except _Mismatch as exc:
        raise UserError(f"{where}: artifact metadata is malformed ({exc})") from None
    try:
        return cls(**values)
    except (UserError, ValueError, TypeError) as exc:  # the dataclass's own range checks
        raise UserError(f"{where}: artifact metadata is malformed ('{what}': {exc})") from None
