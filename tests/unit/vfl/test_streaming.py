"""The streaming data path: shards, one-pass statistics, hashing, chunked output."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import torch

from kedit_vfl.errors import UserError
from kedit_vfl.vfl.data import read as tables_module
from kedit_vfl.vfl.data.demo import DemoConfig, generate, write_demo
from kedit_vfl.vfl.data.encoding import encode
from kedit_vfl.vfl.data.loading import load_party
from kedit_vfl.vfl.data.read import open_table
from kedit_vfl.vfl.data.schema import FIRST, MISSING, OOV, PartySchema, SchemaFitter
from kedit_vfl.vfl.serving.background import prefetched
from kedit_vfl.vfl.serving.score import ScoredChunk, write_scores


def test_make_demo_writes_parquet_shards_that_read_as_one_table(tmp_path: Path) -> None:
    config = DemoConfig(rows=3000, seed=4, file_format="parquet", shard_rows=1000, categorical_extra=2,
                        numeric_active=3, out=tmp_path / "demo")  # fmt: skip
    counts = write_demo(config)
    shards = sorted((tmp_path / "demo" / "active_train").glob("*.parquet"))
    assert len(shards) == 3 and not list((tmp_path / "demo").glob(".make-demo-*"))
    whole = open_table(tmp_path / "demo" / "active_train").read_all()
    assert whole.num_rows == counts["active_train"] == sum(pq.read_metadata(s).num_rows for s in shards)
    assert {"a_cat0", "a_cat1", "a_num2"} <= set(whole.column_names) and "a_num3" not in whole.column_names
    again = generate(config)["active_train.csv"]
    assert again.equals(whole.select(again.column_names))  # the same seed gives the same rows
    ids = whole["id"].to_pylist()
    passive = open_table(tmp_path / "demo" / "passive_train").read_all()["id"].to_pylist()
    assert len(set(ids)) == len(ids) and len(set(ids) & set(passive)) > 0.3 * len(ids)


def test_a_shard_with_another_schema_is_named(tmp_path: Path) -> None:
    folder = tmp_path / "t"
    folder.mkdir()
    pq.write_table(pa.table({"id": ["a", "b"], "x": [1.0, 2.0]}), folder / "part-0.parquet")
    pq.write_table(pa.table({"id": ["c"], "x": ["oops"]}), folder / "part-1.parquet")
    with pytest.raises(UserError, match="shard part-1.parquet stores column 'x' as string"):
        open_table(folder)
    csvs = tmp_path / "c"
    csvs.mkdir()
    (csvs / "a.csv").write_text("id,x\n1,2\n")
    (csvs / "b.csv").write_text("id,z\n3,4\n")
    with pytest.raises(UserError, match="shard b.csv lacks column 'x'"):
        open_table(csvs)


def test_statistics_over_batches_equal_the_whole_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=5000)
    x[::17] = np.nan
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"id": [f"u{i}" for i in range(5000)], "x": x,
                             "c": rng.choice(["p", "q", "r"], 5000)}), path)  # fmt: skip
    monkeypatch.setattr(tables_module, "BATCH_ROWS", 333)  # the reader streams batches of 333 rows
    table = load_party(path, "active", "id", "y")
    assert table.schema.mean[0] == pytest.approx(np.nanmean(x), rel=1e-12)
    assert table.schema.std[0] == pytest.approx(np.nanstd(x), rel=1e-9)
    assert table.schema.vocab == [["p", "q", "r"]]
    assert table.rows.num.shape == (5000, 1) and table.rows.cat.shape == (5000, 1)
    assert table.rows.ids[4999].as_py() == "u4999"


def test_a_column_with_exploding_cardinality_is_hashed_with_a_warning() -> None:
    values = pa.chunked_array([[f"v{i}" for i in range(500)] + [None]])
    table = pa.table({"c": values})
    ids = pa.chunked_array([[str(i) for i in range(501)]])
    fitter = SchemaFitter(["c"], ["c"], "t.csv", max_distinct=100, hash_buckets=64)
    for start in range(0, 501, 50):
        fitter.update(table.slice(start, 50), ids.slice(start, 50))
    schema = fitter.result()
    assert schema.hash_buckets == [64] and schema.vocab == [[]] and schema.cardinalities == [FIRST + 64]
    assert "hashing it into 64 buckets" in fitter.warnings[0]
    _, cat = encode(table, schema, "t.csv", ids, "active")
    assert cat[:500, 0].min() >= FIRST and cat[:500, 0].max() < FIRST + 64 and cat[500, 0] == MISSING
    _, again = encode(table, schema, "t.csv", ids, "active")
    assert (cat == again).all() and len(set(cat[:500, 0].tolist())) > 32  # stable, and spread


def _chunks(ids: list[str], probs: np.ndarray, federated: np.ndarray, size: int) -> list[ScoredChunk]:
    return [
        ScoredChunk(pa.chunked_array([ids[i : i + size]]), probs[i : i + size], federated[i : i + size])
        for i in range(0, len(ids), size)
    ]


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_scores_are_written_in_chunks(tmp_path: Path, suffix: str) -> None:
    ids = [f"u{i}" for i in range(30)]
    probs = np.linspace(0, 1, 30, dtype=np.float32)
    out = tmp_path / f"s{suffix}"
    write_scores(out, _chunks(ids, probs, np.arange(30) % 2 == 0, 7))
    table = pq.read_table(out) if suffix == ".parquet" else pacsv.read_csv(out)
    assert table.column_names == ["id", "score", "mode_used"] and table.num_rows == 30
    assert table["id"].to_pylist() == ids
    assert table["mode_used"].to_pylist()[:2] == ["federated", "local"]
    assert np.allclose(table["score"].to_numpy(), probs)


def test_a_full_disk_while_writing_scores_leaves_no_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kedit_vfl.vfl.serving import score as score_module

    written = []

    class FullDisk:
        def __init__(self, *args: object) -> None:
            pass

        def write_table(self, table: pa.Table) -> None:
            written.append(table.num_rows)
            if len(written) == 2:
                raise OSError(28, "No space left on device")

        def close(self) -> None:
            pass

    monkeypatch.setattr(score_module.pacsv, "CSVWriter", FullDisk)
    out = tmp_path / "scores.csv"
    with pytest.raises(UserError, match="No space left on device"):
        write_scores(out, _chunks([str(i) for i in range(20)], np.zeros(20), np.zeros(20, bool), 5))
    assert written[:2] == [5, 5] and len(written) <= 3 and list(tmp_path.iterdir()) == []


def test_a_failure_while_scoring_leaves_no_partial_file(tmp_path: Path) -> None:
    def failing() -> Iterator[ScoredChunk]:
        yield from _chunks(["a", "b"], np.zeros(2), np.zeros(2, bool), 1)
        raise UserError("t.csv: bad value")

    with pytest.raises(UserError, match="bad value"):
        write_scores(tmp_path / "s.parquet", failing())
    assert list(tmp_path.iterdir()) == []


def test_an_output_under_a_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="cannot create the output folder"):
        write_scores(tmp_path / "file" / "s.parquet", _chunks(["a"], np.zeros(1), np.zeros(1, bool), 1))


def test_dictionary_encoded_categories_encode_as_their_values(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    values = rng.choice(["p", "q", "r", "new", None], 4000).tolist()
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"id": [str(i) for i in range(4000)], "x": rng.normal(size=4000),
                             "c": values, "h": values}), path, row_group_size=1000)  # fmt: skip
    ids = pa.chunked_array([[str(i) for i in range(4000)]])
    schema = PartySchema(numeric=["x"], mean=[0.1], std=[2.0], categorical=["c", "h"],
                         vocab=[["p", "q", "r"], []], hash_buckets=[0, 16])  # fmt: skip
    source = open_table(path)
    plain = pa.concat_tables(source.batches())
    as_dictionary = pa.concat_tables(source.batches(dictionary=["c", "h"]))
    assert pa.types.is_dictionary(as_dictionary.schema.field("c").type)
    num, cat = encode(plain, schema, path, ids, "active")
    num_d, cat_d = encode(as_dictionary, schema, path, ids, "active")
    assert torch.equal(num, num_d) and torch.equal(cat, cat_d)
    expected = [MISSING if v is None else FIRST + "pqr".index(v) if v in "pqr" else OOV for v in values]
    assert cat[:, 0].tolist() == expected


def test_prefetched_hands_on_the_producer_error_and_stops_early() -> None:
    def items() -> Iterator[int]:
        yield 1
        yield 2
        raise ValueError("broken source")

    seen = []
    with pytest.raises(ValueError, match="broken source"):
        for item in prefetched(items()):
            seen.append(item)
    assert seen == [1, 2]
    endless = prefetched(iter(range(10**9)), depth=2)
    assert next(endless) == 0
    endless.close()  # the producer thread stops and is joined


def test_the_numeric_transform_over_a_block_equals_the_per_column_formula() -> None:
    rng = np.random.default_rng(0)
    n = 5000
    columns = {f"x{j}": rng.standard_normal(n) * scale for j, scale in enumerate([1e-3, 1, 1e3, 1e9])}
    columns["x1"][::7], columns["x2"][::11], columns["x3"][::13] = np.nan, np.inf, -np.inf
    columns["x3"][1::17], columns["x0"][2::19] = 1e300, -1e45  # finite, but beyond float32 once standardised
    table = pa.table({"id": [str(i) for i in range(n)], **columns})
    schema = PartySchema(numeric=list(columns), mean=[0.5, -1.0, 2.0, 3.0], std=[0.1, 2.0, 1e3, 7.0])
    num, _ = encode(table, schema, "t", table["id"], "active")
    for j, name in enumerate(schema.numeric):
        scaled = np.arcsinh((columns[name] - schema.mean[j]) / schema.std[j])  # in float64
        expected = np.where(np.isfinite(scaled), scaled, 0.0).astype(np.float32)
        # float32 asinh of the float32-rounded standardised value: within two float32 roundings
        np.testing.assert_allclose(num[:, j].numpy(), expected, rtol=2.5e-7, atol=1e-30)
    assert num[1, 3] == pytest.approx(np.arcsinh(1e300 / 7.0), rel=1e-7) and num[2, 0] < -100


def test_importing_sets_no_memory_pool_opening_a_table_does(tmp_path: Path) -> None:
    """Arrow's allocator is chosen when a table is opened, never as a side effect of an import."""
    import subprocess
    import sys

    (tmp_path / "t.csv").write_text("id,x\nu1,1\n")
    script = (
        "import os, pyarrow as pa\nos.environ.pop('ARROW_DEFAULT_MEMORY_POOL', None)\n"
        "before = pa.default_memory_pool().backend_name\n"
        "import kedit_vfl.vfl.data.loading, kedit_vfl.vfl.serving.score\n"
        "assert pa.default_memory_pool().backend_name == before, 'an import changed the pool'\n"
        "from kedit_vfl.vfl.data.read import open_table\nopen_table(os.environ['TABLE'])\n"
        "print(pa.default_memory_pool().backend_name)"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**env, "TABLE": str(tmp_path / "t.csv")})  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "system"
