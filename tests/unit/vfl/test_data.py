from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from kedit_vfl.errors import UserError
from kedit_vfl.vfl.data.encoding import encode, holdout_mask
from kedit_vfl.vfl.data.loading import align, align_unique, load_two_party
from kedit_vfl.vfl.data.read import read_ids, read_labels, read_table
from kedit_vfl.vfl.data.schema import MISSING, OOV, fit_schema


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_numeric_transform_is_fitted_once_and_reapplied(tmp_path: Path) -> None:
    train = read_table(_write(tmp_path / "t.csv", "id,x,c\n1,1.0,a\n2,3.0,b\n3,,a\n4,5.0,\n"))
    ids = read_ids(train, "id", "t.csv")
    schema = fit_schema(train, ["x", "c"], [], "t.csv", ids)
    assert schema.numeric == ["x"] and schema.categorical == ["c"]  # text inferred categorical
    assert schema.mean == [3.0] and schema.vocab == [["a", "b"]]
    test = read_table(_write(tmp_path / "s.csv", "id,x,c\n9,3.0,b\n8,,zzz\n7,100,\n"))
    num, cat = encode(test, schema, "s.csv", read_ids(test, "id", "s.csv"), "active")
    std = np.std([1.0, 3.0, 5.0])
    expected = np.arcsinh(np.array([0.0, 0.0, (100 - 3.0) / std]))  # missing -> mean -> 0
    assert torch.allclose(num[:, 0], torch.tensor(expected, dtype=torch.float32))
    assert cat[:, 0].tolist() == [3, OOV, MISSING]  # known 'b' -> 2 + 1; unseen; missing


def test_declared_categorical_integers_map_like_their_text(tmp_path: Path) -> None:
    table = read_table(_write(tmp_path / "t.csv", "id,uid\n1,7\n2,9\n3,7\n"))
    schema = fit_schema(table, ["uid"], ["uid"], "t.csv", read_ids(table, "id", "t.csv"))
    assert schema.vocab == [["7", "9"]]
    floaty = read_table(_write(tmp_path / "f.csv", "id,uid\n1,7.0\n2,\n"))
    _, cat = encode(floaty, schema, "f.csv", read_ids(floaty, "id", "f.csv"), "active")
    assert cat[:, 0].tolist() == [2, MISSING]


def test_labels_accept_zero_one_and_empty(tmp_path: Path) -> None:
    table = read_table(_write(tmp_path / "t.csv", "id,y\n1,0\n2,1\n3,\n"))
    labels = read_labels(table, "y", "t.csv", read_ids(table, "id", "t.csv"))
    assert labels[:2].tolist() == [0.0, 1.0] and np.isnan(labels[2])


@pytest.mark.parametrize("bad", ["2", "yes", "-1"])
def test_labels_other_than_zero_one_are_refused_with_the_value(tmp_path: Path, bad: str) -> None:
    table = read_table(_write(tmp_path / "t.csv", f"id,y\n1,0\n2,{bad}\n"))
    with pytest.raises(UserError, match=f"label column 'y' must hold 0, 1 or nothing; found '?{bad}"):
        read_labels(table, "y", "t.csv", read_ids(table, "id", "t.csv"))


def test_duplicate_ids_are_named(tmp_path: Path) -> None:
    table = read_table(_write(tmp_path / "t.csv", "id,x\na,1\nb,2\na,3\nc,4\nc,5\n"))
    with pytest.raises(UserError, match="duplicate ids in column 'id': 'a', 'c'"):
        read_ids(table, "id", "t.csv")


def test_text_in_a_numeric_column_is_refused_with_row_id(tmp_path: Path) -> None:
    rows = "".join(f"{i},{i * 0.5}\n" for i in range(10))
    table = read_table(_write(tmp_path / "t.csv", "id,x\n" + rows + "99,abc\n"))
    with pytest.raises(UserError, match=r"numeric column 'x' holds non-numeric text 'abc' \(ids 99\)"):
        fit_schema(table, ["x"], [], "t.csv", read_ids(table, "id", "t.csv"))


def test_empty_and_missing_tables(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="empty"):
        read_table(_write(tmp_path / "e.csv", "id,y\n"))
    with pytest.raises(UserError, match="empty"):
        read_table(_write(tmp_path / "z.csv", ""))
    with pytest.raises(UserError, match="no such file"):
        read_table(tmp_path / "missing.csv")
    with pytest.raises(UserError, match="unsupported file type"):
        read_table(_write(tmp_path / "t.txt", "id\n1\n"))


def test_parquet_jsonl_and_folders_read_alike(tmp_path: Path) -> None:
    table = pa.table({"id": ["a", "b"], "x": [1.0, 2.0]})
    pq.write_table(table, tmp_path / "t.parquet")
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in table.to_pylist()) + "\n")
    folder = tmp_path / "parts"
    folder.mkdir()
    pq.write_table(table.slice(0, 1), folder / "0.parquet")
    pq.write_table(table.slice(1, 1), folder / "1.parquet")
    for path in (tmp_path / "t.parquet", tmp_path / "t.jsonl", folder):
        read = read_table(path)
        assert sorted(read["id"].to_pylist()) == ["a", "b"] and sorted(read["x"].to_pylist()) == [1.0, 2.0]


def test_align_joins_on_ids_in_any_order() -> None:
    active = pa.chunked_array([["a", "b", "c", "d"]])
    passive = pa.chunked_array([["d", "x", "b"]])
    rows_a, rows_b = align(active, passive)
    assert rows_a.tolist() == [1, 3] and rows_b.tolist() == [2, 0]


def test_holdout_is_stable_per_id_and_near_the_fraction() -> None:
    ids = pa.chunked_array([[f"u{i}" for i in range(5000)]])
    mask = holdout_mask(ids, 0.2)
    assert 0.17 < mask.mean() < 0.23
    subset = pa.chunked_array([ids.to_pylist()[::7]])
    assert np.array_equal(holdout_mask(subset, 0.2), mask[::7])  # same id, same side


def test_no_overlap_is_a_user_error(tmp_path: Path) -> None:
    active = _write(tmp_path / "a.csv", "id,y,x\n1,0,1.0\n2,1,2.0\n")
    passive = _write(tmp_path / "b.csv", "id,z\n3,1.0\n4,2.0\n")
    with pytest.raises(UserError, match="no id appears in both tables"):
        load_two_party(active, passive, "id", "y")


def test_json_lines_with_a_value_of_another_type_is_a_clear_error(tmp_path: Path) -> None:
    lines = [json.dumps({"id": str(i), "x": float(i)}) for i in range(50)] + ['{"id": "z", "x": "oops"}']
    path = _write(tmp_path / "t.jsonl", "\n".join(lines) + "\n")
    with pytest.raises(UserError, match="t.jsonl: cannot read this input table as json"):
        read_table(path)


def test_repeated_passive_ids_are_refused_while_joining(tmp_path: Path) -> None:
    active = _write(tmp_path / "a.csv", "id,y,x\n1,0,1\n2,1,2\n3,0,3\n")
    passive = _write(tmp_path / "p.csv", "id,z\n2,5\n3,6\n2,7\n")
    with pytest.raises(UserError, match=r"p\.csv: duplicate ids in column 'id': '2'"):
        load_two_party(active, passive, "id", "y")
    ids = pa.chunked_array([["2", "3", "2"]])
    for beside in (False, True):  # checked after, or on a thread beside, the join
        with pytest.raises(UserError, match=r"p\.csv: duplicate ids in column 'id': '2'"):
            align_unique(pa.chunked_array([["1", "2"]]), ids, "id", passive, beside=beside)
    unique = _write(tmp_path / "q.csv", "id,z\n3,6\n2,5\n9,1\n")
    data = load_two_party(active, unique, "id", "y")
    assert data.rows_a.tolist() == [1, 2] and data.passive.ids.to_pylist() == ["2", "3"]
