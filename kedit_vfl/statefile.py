"""Nested training state (weights, optimizer moments, generator states, loop counters) as
safetensors tensors plus a JSON structure: never pickle, so a planted checkpoint cannot
run code, and a damaged one is refused with one line.

:func:`flatten` turns a nested value (dicts, lists, tuples, tensors, NumPy arrays and
scalars, bytes, numbers, strings, booleans, None) into tensors and a JSON-safe structure
that names them; :func:`unflatten` reverses it and refuses anything it did not write.
:func:`save_state`/:func:`load_state` put both in one file (the structure in the
safetensors header); ``kvtool edit``'s checkpoint keeps its optimizer the same way
inside an artifact.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

FORMAT = "kvtool-state/1"
MAX_DEPTH = 64
MAX_STRUCTURE_BYTES = 64 * 1024 * 1024  # the JSON structure; tensors are read from the file
_MARKERS = ("__tensor__", "__ndarray__", "__float__", "__bytes__", "__tuple__", "__items__")
_FLOATS = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


class StateFileError(ValueError):
    """A state file (or structure) that is not one, or is damaged; the message says what."""


def flatten(value: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    """``value`` as (tensors named ``prefix`` + a counter, a JSON-safe structure naming them)."""
    tensors: dict[str, torch.Tensor] = {}
    return tensors, _flatten(value, tensors, prefix, 0)


def _tensor(tensors: dict[str, torch.Tensor], prefix: str, tensor: torch.Tensor) -> str:
    name = f"{prefix}t{len(tensors)}"
    tensors[name] = tensor.detach().to("cpu").contiguous().clone()
    return name


def _flatten(value: Any, tensors: dict[str, torch.Tensor], prefix: str, depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise TypeError("state nested too deeply")
    if isinstance(value, torch.Tensor):
        return {"__tensor__": _tensor(tensors, prefix, value)}
    if isinstance(value, np.ndarray):  # NumPy random states hold one
        return {"__ndarray__": _tensor(tensors, prefix, torch.from_numpy(np.ascontiguousarray(value)))}
    if isinstance(value, np.generic):  # a NumPy scalar
        return _flatten(value.item(), tensors, prefix, depth + 1)
    if value is None or isinstance(value, bool | str | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"__float__": repr(value)}
    if isinstance(value, bytes | bytearray):
        return {"__bytes__": bytes(value).hex()}
    if isinstance(value, list):
        return [_flatten(v, tensors, prefix, depth + 1) for v in value]
    if isinstance(value, tuple):
        return {"__tuple__": [_flatten(v, tensors, prefix, depth + 1) for v in value]}
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _flatten(v, tensors, prefix, depth + 1) for k, v in value.items()}
        pairs = [[_flatten(k, tensors, prefix, depth + 1), _flatten(v, tensors, prefix, depth + 1)]
                 for k, v in value.items()]  # fmt: skip
        return {"__items__": pairs}
    raise TypeError(f"cannot store a {type(value).__name__} in a state file")


def unflatten(structure: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The value :func:`flatten` made; :class:`StateFileError` for any other structure."""
    return _unflatten(structure, tensors, 0)


def _unflatten(value: Any, tensors: dict[str, torch.Tensor], depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise StateFileError("state nested too deeply")
    if isinstance(value, list):
        return [_unflatten(v, tensors, depth + 1) for v in value]
    if not isinstance(value, dict):
        return value  # JSON gives only None, bool, int, float and str here
    marker = next((m for m in _MARKERS if m in value), None)
    if marker is None:
        return {k: _unflatten(v, tensors, depth + 1) for k, v in value.items()}
    if len(value) != 1:
        raise StateFileError(f"a malformed {marker.strip('_')} entry")
    inner = value[marker]
    if marker in ("__tensor__", "__ndarray__"):
        if not isinstance(inner, str) or inner not in tensors:
            raise StateFileError(f"the structure names a tensor the file does not hold ({str(inner)[:40]})")
        return tensors[inner] if marker == "__tensor__" else tensors[inner].numpy()
    if marker == "__float__":
        if inner not in _FLOATS:
            raise StateFileError("a malformed number")
        return _FLOATS[inner]
    if marker == "__bytes__":
        try:
            return bytes.fromhex(inner)
        except (TypeError, ValueError):
            raise StateFileError("malformed bytes") from None
    if not isinstance(inner, list):
        raise StateFileError(f"a malformed {marker.strip('_')} entry")
    if marker == "__tuple__":
        return tuple(_unflatten(v, tensors, depth + 1) for v in inner)
    if not all(isinstance(i, list) and len(i) == 2 for i in inner):
        raise StateFileError("a malformed mapping")
    items = [(_unflatten(k, tensors, depth + 1), _unflatten(v, tensors, depth + 1)) for k, v in inner]
    if not all(isinstance(k, str | int | float | bool | tuple) or k is None for k, _ in items):
        raise StateFileError("a mapping with a key that cannot be one")
    try:
        return dict(items)
    except TypeError:  # a tuple key holding a list or tensor
        raise StateFileError("a mapping with a key that cannot be one") from None


def save_state(path: Path, state: Any, write: Callable[[Path, Callable[[Path], None]], None]) -> None:
    """Write ``state`` to ``path`` through ``write`` (an atomic writer taking a temp path)."""
    tensors, structure = flatten(state)
    metadata = {"format": FORMAT, "structure": json.dumps(structure, allow_nan=False)}
    write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_state(path: Path) -> Any:
    """The state saved by :func:`save_state`; :class:`StateFileError` for anything else."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise StateFileError("not a kvtool state file")
            text = metadata.get("structure")
            if not isinstance(text, str) or len(text) > MAX_STRUCTURE_BYTES:
                raise StateFileError("no structure, or one too large")
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise StateFileError(f"unreadable ({(str(exc).splitlines() or ['?'])[0][:120]})") from exc
    try:
        structure = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise StateFileError("its structure is not valid JSON") from exc
    return unflatten(structure, tensors)
