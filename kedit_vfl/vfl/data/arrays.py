"""NumPy arrays from Arrow columns, and Arrow arrays from NumPy, through their buffers.

pyarrow's own conversions (``to_numpy``, ``pa.array``, a Python scalar in a compute
call) import pandas the first time one runs, only to learn whether their input is a
pandas object: 0.3 s of every ``vfl score`` (measured), whose tables never hold one.
The conversions on the scoring path go through these instead, and a test scores CSV
and Parquet tables and checks that pandas was never imported. They copy no more than
pyarrow does: a column without missing values is a read-only view of its buffer.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_NUMPY_TYPES = {
    pa.int8(): np.int8,
    pa.int16(): np.int16,
    pa.int32(): np.int32,
    pa.int64(): np.int64,
    pa.uint8(): np.uint8,
    pa.uint16(): np.uint16,
    pa.uint32(): np.uint32,
    pa.uint64(): np.uint64,
    pa.float32(): np.float32,
    pa.float64(): np.float64,
}


def chunks_of(column: pa.Array | pa.ChunkedArray) -> list[pa.Array]:
    return list(column.chunks) if isinstance(column, pa.ChunkedArray) else [column]


def _bits(buffer: pa.Buffer, offset: int, length: int) -> np.ndarray:
    """``length`` bits of an Arrow bitmap from bit ``offset``, as bools."""
    first, last = offset // 8, (offset + length + 7) // 8
    packed = np.frombuffer(buffer, np.uint8, count=last - first, offset=first)
    start = offset - 8 * first
    return np.unpackbits(packed, bitorder="little")[start : start + length].view(bool)


def present(array: pa.Array) -> np.ndarray | None:
    """True where a value is present; None where none is missing."""
    if array.null_count == 0:
        return None
    bitmap = array.buffers()[0]
    if bitmap is None:  # the null type: nothing present
        return np.zeros(len(array), dtype=bool)
    return _bits(bitmap, array.offset, len(array))


def view(array: pa.Array) -> np.ndarray:
    """The values of a fixed-width numeric array, read-only and without a copy; what
    sits under a missing value is undefined (see :func:`present`)."""
    dtype = np.dtype(_NUMPY_TYPES[array.type])
    data = array.buffers()[1]
    if data is None or len(array) == 0:
        return np.zeros(len(array), dtype=dtype)
    return np.frombuffer(data, dtype, count=len(array), offset=array.offset * dtype.itemsize)


def _joined(parts: list[np.ndarray], dtype: type) -> np.ndarray:
    if not parts:
        return np.zeros(0, dtype=dtype)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def floats(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A numeric or boolean column as float64, NaN where missing (as pyarrow's
    ``to_numpy(zero_copy_only=False)`` of it cast to float64)."""
    parts = []
    for chunk in chunks_of(pc.cast(column, pa.float64())):
        values, where = view(chunk), present(chunk)
        parts.append(values if where is None else np.where(where, values, np.nan))
    return _joined(parts, np.float64)


def integers(column: pa.Array | pa.ChunkedArray, missing: int) -> np.ndarray:
    """An integer column's values, ``missing`` where one is missing."""
    parts = []
    for chunk in chunks_of(column):
        values, where = view(chunk), present(chunk)
        parts.append(values if where is None else np.where(where, values, missing))
    return _joined(parts, np.int64)


def bools(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A boolean column as bools, False where missing."""
    parts = []
    for chunk in chunks_of(column):
        values = _bits(chunk.buffers()[1], chunk.offset, len(chunk)) if len(chunk) else np.zeros(0, bool)
        where = present(chunk)
        parts.append(values if where is None else values & where)
    return _joined(parts, np.bool_)


def missing(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """True where a value is missing."""
    parts = []
    for chunk in chunks_of(column):
        where = present(chunk)
        parts.append(np.zeros(len(chunk), dtype=bool) if where is None else ~where)
    return _joined(parts, np.bool_)


def from_numpy(values: np.ndarray) -> pa.Array:
    """A 1-D numeric array as an Arrow array sharing its memory (copied only if strided)."""
    values = np.ascontiguousarray(values)
    return pa.Array.from_buffers(pa.from_numpy_dtype(values.dtype), len(values), [None, pa.py_buffer(values)])


def strings(values: Sequence[str]) -> pa.Array:
    """A string array of a (short) list of Python strings: vocabularies, labels."""
    encoded = [value.encode() for value in values]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int32)
    np.cumsum([len(value) for value in encoded], out=offsets[1:])
    data = pa.py_buffer(b"".join(encoded))
    return pa.Array.from_buffers(pa.string(), len(encoded), [None, pa.py_buffer(offsets), data])
