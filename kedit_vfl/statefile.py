"""Nested training state (weights, optimizer moments, generator states, loop counters) in a
safetensors file, with its structure as JSON in the header: never pickle, so a planted
checkpoint cannot run code, and a damaged one is refused with one line."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

FORMAT = "kvtool-state/1"
MAX_DEPTH = 64


class StateFileError(ValueError):
    """A state file that is not one, or is damaged; the message names what is wrong."""


def _flatten(value: Any, tensors: dict[str, torch.Tensor], depth: int = 0) -> Any:
    if depth > MAX_DEPTH:
        raise TypeError("state nested too deeply")
    if isinstance(value, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = value.detach().to("cpu").contiguous().clone()
        return {"__tensor__": name}
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"__float__": repr(value)}
    if hasattr(value, "item") and getattr(value, "shape", None) == ():  # a NumPy scalar
        return _flatten(value.item(), tensors, depth + 1)
    if isinstance(value, list):
        return [_flatten(v, tensors, depth + 1) for v in value]
    if isinstance(value, tuple):
        return {"__tuple__": [_flatten(v, tensors, depth + 1) for v in value]}
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _flatten(v, tensors, depth + 1) for k, v in value.items()}
        return {"__items__": [[_flatten(k, tensors, depth + 1), _flatten(v, tensors, depth + 1)]
                              for k, v in value.items()]}  # fmt: skip
    raise TypeError(f"cannot store a {type(value).__name__} in a state file")


def _unflatten(value: Any, tensors: dict[str, torch.Tensor], depth: int = 0) -> Any:
    if depth > MAX_DEPTH:
        raise StateFileError("state nested too deeply")
    if isinstance(value, list):
        return [_unflatten(v, tensors, depth + 1) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        name = value["__tensor__"]
        if name not in tensors:
            raise StateFileError(f"the structure names a tensor the file does not hold ({str(name)[:40]})")
        return tensors[name]
    if "__float__" in value:
        if value["__float__"] not in ("inf", "-inf", "nan"):
            raise StateFileError("a malformed number")
        return float(value["__float__"])
    if "__tuple__" in value:
        return tuple(_unflatten(v, tensors, depth + 1) for v in value["__tuple__"])
    if "__items__" in value:
        items = value["__items__"]
        if not isinstance(items, list) or not all(isinstance(i, list) and len(i) == 2 for i in items):
            raise StateFileError("a malformed mapping")
        return {_unflatten(k, tensors, depth + 1): _unflatten(v, tensors, depth + 1) for k, v in items}
    return {k: _unflatten(v, tensors, depth + 1) for k, v in value.items()}


def save_state(path: Path, state: Any, write: Callable[[Path, Callable[[Path], None]], None]) -> None:
    """Write ``state`` to ``path`` through ``write`` (an atomic writer taking a temp path)."""
    tensors: dict[str, torch.Tensor] = {}
    structure = _flatten(state, tensors)
    metadata = {"format": FORMAT, "structure": json.dumps(structure)}
    write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_state(path: Path) -> Any:
    """The state saved by :func:`save_state`; :class:`StateFileError` for anything else."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise StateFileError("not a kvtool state file")
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError) as exc:
        raise StateFileError(f"unreadable ({str(exc).splitlines()[0][:120]})") from exc
    try:
        structure = json.loads(metadata.get("structure", ""))
    except (json.JSONDecodeError, RecursionError) as exc:
        raise StateFileError("its structure is not valid JSON") from exc
    return _unflatten(structure, tensors)
