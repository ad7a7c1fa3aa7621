"""The buffer conversions give what pyarrow's own conversions give, without pandas."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from kedit_vfl.vfl.data import arrays

TYPES = [pa.int8(), pa.int32(), pa.int64(), pa.uint16(), pa.float32(), pa.float64(), pa.bool_()]


@pytest.mark.parametrize("kind", TYPES, ids=str)
def test_conversions_match_pyarrow_on_sliced_chunks_with_missing_values(kind: pa.DataType) -> None:
    rng = np.random.default_rng(0)
    for _ in range(40):
        n = int(rng.integers(0, 60))
        values = rng.integers(0, 3, n)
        mask = rng.random(n) < rng.choice([0.0, 0.3, 1.0])
        array = pa.array(values.astype(bool) if kind == pa.bool_() else values, type=kind, mask=mask)
        lo = int(rng.integers(0, n + 1))
        hi = int(rng.integers(lo, n + 1))  # offsets that are not multiples of 8, and empty chunks
        column = pa.chunked_array([array.slice(lo, hi - lo), array.slice(0, lo), array.slice(hi)], type=kind)
        want = column.cast(pa.float64()).to_numpy(zero_copy_only=False)
        assert np.array_equal(arrays.floats(column), want, equal_nan=True)
        assert np.array_equal(arrays.missing(column), column.is_null().to_numpy(zero_copy_only=False))
        if kind == pa.bool_():
            want = column.fill_null(False).to_numpy(zero_copy_only=False)
            assert np.array_equal(arrays.bools(column), want)
        else:
            whole = column.cast(pa.int64())
            assert np.array_equal(arrays.integers(whole, -7), whole.fill_null(-7).to_numpy())


def test_all_missing_and_empty_columns() -> None:
    assert np.isnan(arrays.floats(pa.chunked_array([pa.nulls(4)]))).all()
    assert arrays.missing(pa.nulls(3)).tolist() == [True] * 3
    assert arrays.floats(pa.chunked_array([], pa.float64())).shape == (0,)
    assert arrays.integers(pa.array([], pa.int32()), 0).shape == (0,)


def test_arrow_arrays_from_numpy_and_strings() -> None:
    values = np.arange(10, dtype=np.float32)[::2]  # strided: copied
    assert arrays.from_numpy(values).equals(pa.array(values))
    codes = np.array([1, 0, 1], dtype=np.int8)
    assert arrays.from_numpy(codes).type == pa.int8()
    names = ["local", "", "fédéré"]
    assert arrays.strings(names).equals(pa.array(names, pa.string()))
    assert len(arrays.strings([])) == 0


def test_no_pandas_import() -> None:
    script = """
import sys, numpy as np, pyarrow as pa
from kedit_vfl.vfl.data import arrays
column = pa.chunked_array([arrays.from_numpy(np.arange(5.0)), arrays.from_numpy(np.arange(3.0))])
arrays.floats(column), arrays.missing(column), arrays.strings(["a"])
arrays.integers(arrays.from_numpy(np.arange(3)), 0)
print("pandas" in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.stdout.strip() == "False", done.stderr
