"""Two-party tables: reading, checking, joining on ids, and the feature transform.

Tables (a file or a folder of CSV, Parquet or JSON Lines shards) stream as Arrow record
batches, one shard after another with pyarrow's own readers; they are checked once and
turned into tensors with column-wise (never row-wise) operations.
The transform (means, standard deviations, vocabularies) is a :class:`PartySchema`,
fitted on the training tables and stored in every artifact, so that scoring applies
exactly the training transform and refuses a table it does not fit.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq
import torch

from kedit_vfl.errors import UserError
from kedit_vfl.paths import cache_dir
from kedit_vfl.vfl import arrays

FORMATS = {".csv": "csv", ".parquet": "parquet", ".jsonl": "json", ".json": "json"}
# Categorical index 0 is "unseen in training", 1 is "missing"; known values start at 2.
OOV, MISSING, FIRST = 0, 1, 2
_NUMBER = r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$|^\s*[-+]?(nan|inf|infinity)\s*$"
_HOLDOUT_KEY = "kvtool-vfl-valid"  # 16 characters: pandas' hash key
_HASH_KEY = "kvtool-vfl-hash!"


BATCH_ROWS = 1 << 18  # rows per streamed batch: bounded memory, few Python round trips
_TEXT_BLOCK = 1 << 22  # bytes per CSV / JSON block read (and, for CSV, whose types are inferred)

if "ARROW_DEFAULT_MEMORY_POOL" not in os.environ:  # the user's choice wins
    # Arrow's default allocator (mimalloc) keeps the pages of freed batches: distilling
    # 8M rows peaked at 2.8 GiB RSS with it, 1.8 GiB with malloc, at the same speed.
    pa.set_memory_pool(pa.system_memory_pool())


@dataclass
class TableSource:
    """A table on disk (a file, or a folder of shards) read as a stream of Arrow batches.

    Nothing is loaded until :meth:`batches` is iterated; each batch is a small
    ``pa.Table`` of at most :data:`BATCH_ROWS` rows, so memory does not grow with the table.
    Shards are read one after another by pull-based readers (a batch of Parquet rows, a
    CSV or JSON block at a time): Arrow's dataset scanner reads ahead of a slow consumer until whole
    files sit in memory (apache/arrow#39808). Callers overlap reading with their own work
    (:func:`kedit_vfl.vfl.background.prefetched`).
    """

    path: Path
    role: str
    files: list[Path]
    kind: str
    schema: pa.Schema  # the first shard's: every shard is read with its types

    @property
    def column_names(self) -> list[str]:
        return list(self.schema.names)

    def require_column(self, name: str, what: str) -> None:
        _check_column(self.column_names, name, self.path, what)

    def batches(
        self, columns: Sequence[str] | None = None, dictionary: Sequence[str] = (), threads: bool = True
    ) -> Iterator[pa.Table]:
        """Batches of ``columns`` (all by default), in file and row order. Parquet text
        columns named in ``dictionary`` come dictionary-encoded, as stored: no string is
        materialised per row. ``threads=False`` decodes on the calling thread only: less
        CPU in all (measured 2.5 vs 2.7-4.8 CPU-s for 8M rows) where other stages already
        keep the cores busy."""
        names = list(columns) if columns is not None else self.column_names
        try:
            for file in self.files:
                for batch in self._file_batches(file, names, dictionary, threads):
                    if batch.num_rows:
                        yield pa.Table.from_batches([batch]).select(names)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as exc:
            detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise UserError(
                f"{self.path}: cannot read this {self.role} table as {self.kind} ({detail})"
            ) from exc

    def _file_batches(
        self, file: Path, names: list[str], dictionary: Sequence[str], threads: bool
    ) -> Iterator[pa.RecordBatch]:
        schema = self.schema
        if self.kind == "parquet":
            text = [n for n in dictionary if n in names and pa.types.is_string(schema.field(n).type)]
            with pq.ParquetFile(file, read_dictionary=text or None, pre_buffer=False) as handle:
                yield from handle.iter_batches(batch_size=BATCH_ROWS, columns=names, use_threads=threads)
        elif self.kind == "csv":
            convert = pacsv.ConvertOptions(  # the first shard's types for every shard
                strings_can_be_null=True,
                include_columns=names,
                column_types={n: schema.field(n).type for n in names},
            )
            read = pacsv.ReadOptions(block_size=_TEXT_BLOCK, use_threads=threads)
            yield from pacsv.open_csv(file, read_options=read, convert_options=convert)
        else:  # JSON Lines, with the first shard's types
            read = pajson.ReadOptions(block_size=_TEXT_BLOCK, use_threads=threads)
            parse = pajson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
            for batch in pajson.open_json(file, read_options=read, parse_options=parse):
                yield batch.select(names)

    def read_all(self, columns: Sequence[str] | None = None) -> pa.Table:
        parts = list(self.batches(columns))
        if not parts:
            raise UserError(f"{self.path}: the {self.role} table is empty (no rows)")
        return pa.concat_tables(parts)


def _shard_schema(file: Path, kind: str) -> pa.Schema:
    """The shard's columns and types: stored (Parquet) or inferred from its first block."""
    if kind == "parquet":
        return pq.read_schema(file)
    if kind == "csv":  # empty fields are missing values, for text columns too
        read = pacsv.ReadOptions(block_size=_TEXT_BLOCK)
        convert = pacsv.ConvertOptions(strings_can_be_null=True)
        with pacsv.open_csv(file, read_options=read, convert_options=convert) as reader:
            return reader.schema
    with pajson.open_json(file) as reader:
        return reader.schema


def open_table(path: str | Path, role: str = "input") -> TableSource:
    """Check a CSV, Parquet or JSON Lines file (or a folder of shards) and open it as a stream.

    Every shard must have the first shard's columns (and, for Parquet, their types); a
    shard that differs is named with the column.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or folder ({role} table)")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in FORMATS)
        if not files:
            raise UserError(f"{path}: no .csv, .parquet or .jsonl files in this folder ({role} table)")
    else:
        files = [path]
    kinds = {FORMATS.get(f.suffix.lower()) for f in files}
    if None in kinds:
        raise UserError(f"{path}: unsupported file type; expected .csv, .parquet or .jsonl ({role} table)")
    if len(kinds) > 1:
        raise UserError(f"{path}: the folder mixes file formats; use one of csv, parquet or jsonl")
    (kind,) = kinds
    schemas = []
    for file in files:
        try:
            with open(file, "rb") as handle:
                if not handle.read(1):
                    raise UserError(f"{path}: the {role} table is empty (no rows)")
            schemas.append(_shard_schema(file, kind))
        except UserError:
            raise
        except OSError as exc:
            raise UserError(f"{file}: cannot read the file ({exc.strerror or exc})") from exc
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            detail = str(exc).strip().splitlines()[0][:160]
            raise UserError(f"{file}: cannot read this {role} table as {kind} ({detail})") from exc
    first = schemas[0]
    for file, schema in zip(files[1:], schemas[1:], strict=True):
        missing = [n for n in first.names if n not in schema.names]
        extra = [n for n in schema.names if n not in first.names]
        if missing or extra:
            what = f"lacks column '{missing[0]}'" if missing else f"has an extra column '{extra[0]}'"
            raise UserError(f"{path}: shard {file.name} {what} (the first shard is {files[0].name})")
        if kind == "parquet":
            for name in first.names:
                if schema.field(name).type != first.field(name).type:
                    raise UserError(
                        f"{path}: shard {file.name} stores column '{name}' as {schema.field(name).type}, "
                        f"the first shard ({files[0].name}) as {first.field(name).type}"
                    )
    return TableSource(path, role, files, {"json": "json lines"}.get(kind, kind), first)


def read_table(path: str | Path, role: str = "input", columns: Sequence[str] | None = None) -> pa.Table:
    """A whole (small) table in memory, through the same streaming reader."""
    return open_table(path, role).read_all(columns)


def require_column(table: pa.Table, name: str, path: Path | str, what: str) -> pa.ChunkedArray:
    _check_column(table.column_names, name, path, what)
    return table[name]


def _check_column(columns: list[str], name: str, path: Path | str, what: str) -> None:
    """Refuse a table without its ``what`` (id, label) column, naming the columns it has."""
    if name not in columns:
        shown = ", ".join(columns[:12])
        raise UserError(f"{path}: no {what} column '{name}' (columns: {shown}); set it with --{what}-col")


def _is_numeric_type(kind: pa.DataType) -> bool:
    return pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)


def as_strings(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """Values as strings with nulls kept; whole floats print as integers (1.0 -> '1')."""
    if pa.types.is_floating(column.type):
        values = column.to_numpy(zero_copy_only=False)
        finite = values[np.isfinite(values)]
        if np.all(finite == np.round(finite)):
            column = pa.chunked_array([pa.array(values, mask=~np.isfinite(values)).cast(pa.int64())])
        else:
            column = pc.if_else(pc.is_nan(column), pa.scalar(None, column.type), column)
    return pc.cast(column, pa.string())


def read_ids(table: pa.Table, id_col: str, path: Path | str) -> pa.ChunkedArray:
    """The id column as strings; refuse missing and duplicate ids, naming a few."""
    ids = as_strings(require_column(table, id_col, path, "id"))
    if ids.null_count:
        raise UserError(f"{path}: {ids.null_count} rows have no id in column '{id_col}'")
    return check_unique_ids(ids, id_col, path)


def check_unique_ids(ids: pa.ChunkedArray, id_col: str, path: Path | str) -> pa.ChunkedArray:
    if len(pc.unique(ids)) == len(ids):  # unique is a hash set: 3x faster than count_distinct
        return ids
    counts = pc.value_counts(ids)
    repeated = counts.filter(pc.greater(counts.field("counts"), 1))
    if len(repeated):
        names = ", ".join(repr(v) for v in repeated.field("values")[:3].to_pylist())
        more = f" and {len(repeated) - 3} more" if len(repeated) > 3 else ""
        raise UserError(f"{path}: duplicate ids in column '{id_col}': {names}{more}")
    return ids


def read_labels(table: pa.Table, label_col: str, path: Path | str, ids: pa.ChunkedArray) -> np.ndarray:
    """Labels as float32 with NaN for unlabelled rows; only 0, 1 or empty are allowed."""
    column = require_column(table, label_col, path, "label")
    numeric = _is_numeric_type(column.type)
    if numeric:  # one pass each in NumPy: Arrow's is_in / if_else / fill_null took 3x longer
        values = arrays.floats(column)  # missing -> NaN
        bad = ~np.isnan(values) & (values != 0.0) & (values != 1.0)
    else:
        text = pc.utf8_trim_whitespace(pc.cast(column, pa.string()))
        column = pc.if_else(pc.equal(text, ""), pa.scalar(None, pa.string()), text)
        bad = arrays.bools(pc.invert(pc.is_in(column, value_set=arrays.strings(["0", "1", "0.0", "1.0"]))))
        bad &= ~arrays.missing(column)
    if bad.any():
        at = pa.array(np.flatnonzero(bad)[:3])
        shown = values[bad][:3].tolist() if numeric else column.take(at).to_pylist()
        raise UserError(
            f"{path}: label column '{label_col}' must hold 0, 1 or nothing; "
            f"found {', '.join(repr(v) for v in shown)} (ids {', '.join(ids.take(at).to_pylist())})"
        )
    if not numeric:
        values = arrays.floats(column)
    return values.astype(np.float32)


def _non_numeric(column: pa.ChunkedArray) -> pa.ChunkedArray:
    text = pc.cast(column, pa.string())
    return pc.fill_null(pc.invert(pc.match_substring_regex(text, _NUMBER, ignore_case=True)), False)


def _numeric_values(column: pa.ChunkedArray, name: str, path: Path | str, ids: pa.ChunkedArray) -> np.ndarray:
    if not _is_numeric_type(column.type):
        column = pc.cast(column, pa.string())
        column = pc.if_else(
            pc.equal(pc.utf8_trim_whitespace(column), ""), pa.scalar(None, pa.string()), column
        )
        bad = _non_numeric(column)
        if pc.any(bad).as_py():
            values = ", ".join(repr(v) for v in column.filter(bad)[:3].to_pylist())
            where = ", ".join(ids.filter(bad)[:3].to_pylist())
            raise UserError(
                f"{path}: numeric column '{name}' holds non-numeric text {values} (ids {where}); "
                "fix the values or declare the column with --categorical"
            )
    return arrays.floats(column)


@dataclass
class PartySchema:
    """One party's features and the statistics of their training transform."""

    numeric: list[str] = field(default_factory=list)
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    categorical: list[str] = field(default_factory=list)
    vocab: list[list[str]] = field(default_factory=list)
    hash_buckets: list[int] = field(default_factory=list)  # per categorical column; 0 = vocabulary

    def __post_init__(self) -> None:
        if not self.hash_buckets:
            self.hash_buckets = [0] * len(self.categorical)

    @property
    def cardinalities(self) -> list[int]:
        return [FIRST + (b or len(v)) for v, b in zip(self.vocab, self.hash_buckets, strict=True)]

    @property
    def columns(self) -> list[str]:
        return self.numeric + self.categorical

    def to_dict(self) -> dict[str, Any]:
        return {
            "numeric": self.numeric,
            "mean": self.mean,
            "std": self.std,
            "categorical": self.categorical,
            "vocab": self.vocab,
            "hash_buckets": self.hash_buckets,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> PartySchema:
        keys = ("numeric", "mean", "std", "categorical", "vocab", "hash_buckets")
        return cls(**{k: raw[k] for k in keys if k in raw})


def select_features(
    table: pa.Table | TableSource,
    wanted: Sequence[str] | None,
    exclude: Sequence[str],
    path: Path | str,
    role: str,
) -> list[str]:
    """The feature columns: those asked for, or every column but the id and label."""
    if wanted:
        missing = [c for c in wanted if c not in table.column_names]
        if missing:
            raise UserError(f"{path}: --features-{role} names columns the table lacks: {', '.join(missing)}")
        return list(wanted)
    features = [c for c in table.column_names if c not in exclude]
    if not features:
        raise UserError(f"{path}: the {role} table has no feature columns besides {', '.join(exclude)}")
    return features


class _Moments:
    """Count, mean and sum of squared deviations, merged batch by batch (Chan et al.)."""

    def __init__(self) -> None:
        self.n, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, values: np.ndarray) -> None:
        values = values[np.isfinite(values)]
        if not values.size:
            return
        n_b, mean_b = values.size, float(values.mean())
        m2_b = float(((values - mean_b) ** 2).sum())
        delta, n = mean_b - self.mean, self.n + n_b
        self.mean += delta * n_b / n
        self.m2 += m2_b + delta * delta * self.n * n_b / n
        self.n = n

    def result(self) -> tuple[float, float]:
        if not self.n:
            return 0.0, 1.0
        std = (self.m2 / self.n) ** 0.5
        return self.mean, std if std > 1e-12 else 1.0


class _Counts:
    """Category frequencies merged batch by batch; gives up (``None``) past ``limit``
    distinct values, so an exploding column never exhausts memory."""

    def __init__(self, limit: int) -> None:
        self.limit, self.pending = limit, []
        self.merged: pa.Table | None = pa.table(
            {"values": pa.array([], pa.string()), "counts": pa.array([], pa.int64())}
        )

    def update(self, text: pa.ChunkedArray) -> None:
        if self.merged is None:
            return
        counts = pc.value_counts(pc.drop_null(text))
        self.pending.append(pa.table({"values": counts.field("values"), "counts": counts.field("counts")}))
        if sum(len(t) for t in self.pending) > self.limit // 4:
            self._merge()

    def _merge(self) -> None:
        if self.merged is None or not self.pending:
            return
        table = pa.concat_tables([self.merged, *self.pending])
        self.pending = []
        self.merged = (
            table.group_by("values").aggregate([("counts", "sum")]).rename_columns(["values", "counts"])
        )
        if len(self.merged) > self.limit:
            self.merged = None

    def result(self) -> pa.Table | None:
        self._merge()
        return self.merged


class SchemaFitter:
    """Decide numeric vs categorical and fit the transform in one pass over a table's batches.

    Declared columns are categorical; so is a text column unless most of its values are
    numbers, in which case the rest are reported as bad input instead of guessed at.
    Numbers get a streaming mean and standard deviation; categories their frequencies,
    kept if seen ``min_count`` times, the ``max_vocab`` most frequent; a column with
    more than ``max_distinct`` distinct values is hashed into ``hash_buckets`` buckets.
    """

    def __init__(
        self,
        features: Sequence[str],
        categorical: Sequence[str],
        path: Path | str,
        max_vocab: int = 100_000,
        min_count: int = 1,
        max_distinct: int = 1_000_000,
        hash_buckets: int = 1 << 18,
    ) -> None:
        self.features, self.declared, self.path = list(features), set(categorical), path
        self.max_vocab, self.min_count, self.hash_buckets = max_vocab, min_count, hash_buckets
        self.moments = {name: _Moments() for name in self.features}
        self.counts = {name: _Counts(max_distinct) for name in self.features}
        self.text_seen = dict.fromkeys(self.features, 0)
        self.text_bad = dict.fromkeys(self.features, 0)
        self.bad_examples: dict[str, list[tuple[Any, str]]] = {name: [] for name in self.features}
        self.numeric_typed = dict.fromkeys(self.features, True)
        self.warnings: list[str] = []

    def update(self, table: pa.Table, ids: pa.ChunkedArray) -> None:
        for name in self.features:
            column = table[name]
            numeric_type = _is_numeric_type(column.type) or pa.types.is_null(column.type)
            self.numeric_typed[name] &= numeric_type
            if name in self.declared:
                self.counts[name].update(as_strings(column))
            elif numeric_type:
                self.moments[name].update(pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False))
            else:
                text = pc.cast(column, pa.string())
                text = pc.if_else(
                    pc.equal(pc.utf8_trim_whitespace(text), ""), pa.scalar(None, pa.string()), text
                )
                bad = _non_numeric(text)
                self.text_seen[name] += len(text) - text.null_count
                n_bad = pc.sum(pc.cast(bad, pa.int64())).as_py() or 0
                self.text_bad[name] += n_bad
                if n_bad and len(self.bad_examples[name]) < 3:
                    for value, row_id in zip(
                        text.filter(bad)[:3].to_pylist(), ids.filter(bad)[:3].to_pylist(), strict=True
                    ):
                        self.bad_examples[name].append((value, row_id))
                numbers = pc.cast(text.filter(pc.invert(bad)), pa.float64()).to_numpy(zero_copy_only=False)
                self.moments[name].update(numbers)
                self.counts[name].update(text)

    def result(self) -> PartySchema:
        schema = PartySchema()
        for name in self.features:
            text_like = False
            if name not in self.declared and not self.numeric_typed[name]:
                seen = self.text_seen[name]
                text_like = (1.0 - self.text_bad[name] / seen if seen else 0.0) < 0.5
            if name in self.declared or text_like:
                counts = self.counts[name].result()
                schema.categorical.append(name)
                if counts is None:
                    self.warnings.append(
                        f"{self.path}: categorical column '{name}' has too many distinct values for a "
                        f"vocabulary; hashing it into {self.hash_buckets} buckets"
                    )
                    schema.vocab.append([])
                    schema.hash_buckets.append(self.hash_buckets)
                    continue
                kept = counts.filter(pc.greater_equal(counts["counts"], self.min_count))
                order = np.argsort(-kept["counts"].to_numpy(), kind="stable")[: self.max_vocab]
                schema.vocab.append(sorted(kept["values"].take(pa.array(order)).to_pylist()))
                schema.hash_buckets.append(0)
                continue
            if self.text_bad[name]:
                values = ", ".join(repr(v) for v, _ in self.bad_examples[name][:3])
                where = ", ".join(i for _, i in self.bad_examples[name][:3])
                raise UserError(
                    f"{self.path}: numeric column '{name}' holds non-numeric text {values} (ids {where}); "
                    "fix the values or declare the column with --categorical"
                )
            mean, std = self.moments[name].result()
            schema.numeric.append(name)
            schema.mean.append(mean)
            schema.std.append(std)
        return schema


def fit_schema(
    table: pa.Table,
    features: Sequence[str],
    categorical: Sequence[str],
    path: Path | str,
    ids: pa.ChunkedArray,
    max_vocab: int = 100_000,
) -> PartySchema:
    """:class:`SchemaFitter` over one in-memory table."""
    fitter = SchemaFitter(features, categorical, path, max_vocab=max_vocab)
    fitter.update(table, ids)
    return fitter.result()


def check_schema(table: pa.Table | TableSource, schema: PartySchema, path: Path | str, role: str) -> None:
    """Refuse a table whose columns do not fit the model's feature schema."""
    missing = [c for c in schema.columns if c not in table.column_names]
    if missing:
        raise UserError(
            f"{path}: {role} table does not match the model's feature schema: "
            f"missing column(s) {', '.join(missing[:5])} (the model expects {', '.join(schema.columns)})"
        )


def encode(
    table: pa.Table, schema: PartySchema, path: Path | str, ids: pa.ChunkedArray, role: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply the training transform: standardised (then asinh-compressed) numbers, vocabulary indices.

    Missing and infinite numbers become the training mean (0 after standardising);
    missing categories map to index 1 and categories unseen in training to index 0. The
    numbers come as a column-major (N, n_numeric) float32 view.
    """
    check_schema(table, schema, path, role)
    n = table.num_rows
    raw = [_numeric_values(table[name], name, path, ids) for name in schema.numeric]  # float64 columns
    scaled = np.empty((len(raw), n), dtype=np.float32)  # (n_numeric, N): a column per row
    centred = np.empty(n)
    with np.errstate(over="ignore"):  # beyond float32: infinite here, mended below
        for j, values in enumerate(raw):  # standardised in float64, rounded once to float32
            np.subtract(values, schema.mean[j], out=centred)  # times 1/std: a quarter faster than dividing
            np.multiply(centred, 1.0 / schema.std[j], out=scaled[j])
    # arcsinh: linear near 0, tames heavy tails. In float32 it takes half the time of
    # float64 and differs by a float32 rounding or two (what the network sees anyway).
    np.arcsinh(scaled, out=scaled)
    infinite = np.isinf(scaled)  # an infinite value, or one beyond float32 once standardised (rare)
    for j in np.flatnonzero(infinite.any(axis=1)):
        at = np.flatnonzero(infinite[j])
        exact = np.arcsinh((raw[j][at] - schema.mean[j]) / schema.std[j])  # float64: finite if the value is
        scaled[j, at] = np.where(np.isfinite(exact), exact, 0.0)
    numbers = torch.from_numpy(scaled)
    torch.nan_to_num_(numbers, nan=0.0)  # missing (no infinity is left); one pass, half of NumPy's two
    num = numbers.T  # (N, n_numeric), column-major: matrix products read it as it is, without a copy
    cat = np.zeros((n, len(schema.categorical)), dtype=np.int32)  # (N, n_categorical)
    for j, name in enumerate(schema.categorical):
        cat[:, j] = _category_index(table[name], schema.vocab[j], schema.hash_buckets[j])
    return num, torch.from_numpy(cat)


def _category_index(column: pa.ChunkedArray, vocab: list[str], buckets: int) -> np.ndarray:
    """Index of each value: ``FIRST +`` its vocabulary position (or hash bucket), else OOV/MISSING.

    A dictionary-encoded column is mapped through its (small) dictionary, then by its codes:
    the same indices as for the plain values, without touching a string per row.
    """
    if pa.types.is_dictionary(column.type):
        out = np.empty(len(column), dtype=np.int64)
        start = 0
        for chunk in column.chunks:
            mapped = _category_index(pa.chunked_array([chunk.dictionary]), vocab, buckets)
            rows = out[start : start + len(chunk)]
            start += len(chunk)
            if not len(mapped):  # an empty dictionary: every value is missing
                rows[:] = MISSING
                continue
            np.take(mapped, arrays.integers(chunk.indices, 0), out=rows)
            if chunk.null_count:
                rows[arrays.missing(chunk.indices)] = MISSING
        return out
    text = as_strings(column)
    missing = arrays.missing(text)
    if buckets:
        return np.where(missing, MISSING, FIRST + hashed_bucket(text, buckets))
    index = pc.index_in(text, value_set=arrays.strings(vocab))
    position = arrays.integers(index, OOV - FIRST)  # OOV once FIRST is added: not in the vocabulary
    return np.where(missing, MISSING, FIRST + position.astype(np.int64))


def hashed_bucket(text: pa.ChunkedArray, buckets: int) -> np.ndarray:
    """A stable bucket in ``[0, buckets)`` per value (the same on every machine and run)."""
    values = pc.fill_null(text, "").to_numpy(zero_copy_only=False)
    return (_hashed(values, _HASH_KEY) % np.uint64(buckets)).astype(np.int64)


def _hashed(values: np.ndarray, key: str) -> np.ndarray:
    """pandas' stable 64-bit string hash (SipHash with a 16-character key), per value."""
    import pandas as pd  # here, not at the top: 0.3 s off the start of every command that never hashes

    return pd.util.hash_array(np.asarray(values, dtype=object), hash_key=key)


@dataclass
class Party:
    """One party's rows after the transform."""

    ids: pa.ChunkedArray
    num: torch.Tensor  # (N, n_numeric) float32
    cat: torch.Tensor  # (N, n_categorical) int64

    def take(self, index: torch.Tensor) -> Party:
        return Party(self.ids.take(arrays.from_numpy(index.numpy())), self.num[index], self.cat[index])

    def __len__(self) -> int:
        return int(self.num.shape[0])


def align(active_ids: pa.ChunkedArray, passive_ids: pa.ChunkedArray) -> tuple[torch.Tensor, torch.Tensor]:
    """Active row -> passive row positions for the ids both parties hold (one hash join)."""
    position = pc.index_in(active_ids, value_set=pa.concat_arrays(passive_ids.chunks))
    found = pc.is_valid(position).to_numpy(zero_copy_only=False)
    rows_a = np.flatnonzero(found)
    rows_b = position.filter(pc.is_valid(position)).to_numpy(zero_copy_only=False).astype(np.int64)
    return torch.from_numpy(rows_a), torch.from_numpy(rows_b)


def align_unique(
    active_ids: pa.ChunkedArray,
    passive_ids: pa.ChunkedArray,
    id_col: str,
    passive_path: Path | str,
    beside: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`align`, with the passive ids checked for repeats.

    ``beside`` runs the check on a thread beside the join: both are Arrow hash tables
    that run without the GIL, so on two cores the check is nearly free (8M active and
    5M passive ids: 2.2 s for both against 3.7 s one after the other, measured). Both
    tables are then in memory at once (about 0.4 GiB more at that size), so only
    ``score`` does it, where the time matters and the rest of the memory is small.
    """
    if not beside:
        check_unique_ids(passive_ids, id_col, passive_path)
        return align(active_ids, passive_ids)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvtool-ids") as pool:
        checked = pool.submit(check_unique_ids, passive_ids, id_col, passive_path)
        rows = align(active_ids, passive_ids)
        checked.result()  # repeated passive ids: the user's error, raised here
    return rows


def holdout_mask(ids: pa.ChunkedArray, fraction: float) -> np.ndarray:
    """A stable validation subset keyed by id, so that every stage holds out the same rows."""
    if fraction <= 0:
        return np.zeros(len(ids), dtype=bool)
    threshold, parts = np.uint64(round(fraction * 10_000)), []
    for start in range(0, len(ids), BATCH_ROWS):  # a slice at a time: Python strings are large
        values = ids.slice(start, BATCH_ROWS).to_numpy(zero_copy_only=False)
        hashes = _hashed(values, _HOLDOUT_KEY)
        parts.append((hashes % np.uint64(10_000)) < threshold)
    return np.concatenate(parts)


@dataclass
class TwoPartyData:
    """Both parties' rows, transformed, with the overlap between them."""

    active: Party
    labels: torch.Tensor | None  # (N_active,) float32, NaN = unlabelled; None = no label column
    passive: Party | None  # (N_overlap, ...) passive rows aligned with ``rows_a``
    rows_a: torch.Tensor  # (N_overlap,) active row index of each overlapped pair
    schemas: dict[str, PartySchema]


@dataclass
class PartyTable:
    """One party's table after reading and the transform: what a party holds alone."""

    rows: Party
    labels: torch.Tensor | None  # (N,) float32, NaN = unlabelled; None = no label column
    schema: PartySchema
    path: Path


class _Spool:
    """Rows appended batch by batch to a scratch file, then memory-mapped as one tensor.

    The encoded columns of a table of any size live in the page cache, not in the
    process's own memory: the file is unlinked once mapped, so nothing is left behind.
    """

    def __init__(self, width: int, dtype: np.dtype) -> None:
        self.width, self.dtype, self.rows = width, np.dtype(dtype), 0
        folder = cache_dir() / "spool"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            handle, name = tempfile.mkstemp(dir=folder, suffix=".bin")
        except OSError as exc:
            raise UserError(
                f"{folder}: cannot write scratch space for the encoded table ({exc.strerror})"
            ) from exc
        self.file, self.name = os.fdopen(handle, "wb"), name

    def append(self, block: np.ndarray) -> None:
        try:
            self.file.write(np.ascontiguousarray(block, dtype=self.dtype).tobytes())
        except OSError as exc:
            self.close()
            raise UserError(
                f"{self.name}: cannot write the encoded table ({exc.strerror}); is the disk full?"
            ) from exc
        self.rows += len(block)

    def close(self) -> None:
        if not self.file.closed:
            self.file.close()
        if os.path.exists(self.name):
            os.unlink(self.name)

    def tensor(self) -> torch.Tensor:
        self.file.close()
        try:
            if self.rows == 0 or self.width == 0:
                return torch.from_numpy(np.zeros((self.rows, self.width), dtype=self.dtype))
            mapped = np.memmap(self.name, dtype=self.dtype, mode="r+", shape=(self.rows, self.width))
            return torch.from_numpy(mapped)
        finally:
            os.unlink(self.name)  # the mapping keeps the data; the name goes


def load_party(
    path: Path,
    role: str,
    id_col: str,
    label_col: str,
    features: Sequence[str] | None = None,
    categorical: Sequence[str] = (),
    schema: PartySchema | None = None,
    require_labels: bool = False,
    warn: Callable[[str], None] | None = None,
    unique_ids: bool = True,
) -> PartyTable:
    """Read, check and transform one party's table, streaming it in batches.

    Without ``schema`` one pass fits the transform (:class:`SchemaFitter`); one more
    encodes every batch into memory-mapped columns. Only the ids (and labels) are held
    in memory, so memory does not grow with the table beyond them and the statistics.
    A two-party run calls this on each side with only that side's table; columns named
    in ``categorical`` that this table lacks are the other party's and are ignored.
    ``unique_ids=False`` leaves the check for repeated ids to the caller
    (:func:`align_unique`).
    """
    source = open_table(path, role)
    source.require_column(id_col, "id")
    has_labels = role == "active" and (require_labels or label_col in source.column_names)
    if has_labels:
        source.require_column(label_col, "label")
    if schema is None:
        chosen = select_features(source, features, (id_col, label_col), path, role)
        fitter = SchemaFitter(chosen, categorical, path)
        for batch in source.batches([id_col, *chosen]):
            fitter.update(batch, as_strings(batch[id_col]))
        schema = fitter.result()
        for message in fitter.warnings:
            if warn is not None:
                warn(message)
    check_schema(source, schema, path, role)
    columns = [id_col, *([label_col] if has_labels else []), *schema.columns]
    num_spool = _Spool(len(schema.numeric), np.float32)
    cat_spool = _Spool(len(schema.categorical), np.int32)
    id_chunks, label_chunks, missing_ids = [], [], 0
    try:
        for batch in source.batches(columns, dictionary=schema.categorical):
            ids = as_strings(batch[id_col])
            missing_ids += ids.null_count
            if missing_ids:
                continue  # reported below, with the count over the whole table
            if has_labels:
                label_chunks.append(read_labels(batch, label_col, path, ids))
            num, cat = encode(batch, schema, path, ids, role)
            num_spool.append(num.numpy())
            cat_spool.append(cat.numpy())
            id_chunks.extend(ids.chunks)
        if missing_ids:
            raise UserError(f"{path}: {missing_ids} rows have no id in column '{id_col}'")
        if not id_chunks:
            raise UserError(f"{path}: the {role} table is empty (no rows)")
        ids = pa.chunked_array(id_chunks, pa.string())
        ids = check_unique_ids(ids, id_col, path) if unique_ids else ids
        num_t, cat_t = num_spool.tensor(), cat_spool.tensor()
    finally:
        num_spool.close()
        cat_spool.close()
    labels = torch.from_numpy(np.concatenate(label_chunks)) if has_labels else None
    return PartyTable(Party(ids, num_t, cat_t), labels, schema, Path(path))


def load_two_party(
    active_path: Path,
    passive_path: Path | None,
    id_col: str,
    label_col: str,
    features_active: Sequence[str] | None = None,
    features_passive: Sequence[str] | None = None,
    categorical: Sequence[str] = (),
    schemas: dict[str, PartySchema] | None = None,
    require_labels: bool = True,
) -> TwoPartyData:
    """Read, check, transform and join the two tables.

    With ``schemas`` (from an artifact) the stored transform is applied and the tables
    must fit it; without, the transform is fitted on these tables.
    """
    if schemas is None and categorical:
        known = set(open_table(active_path, "active").column_names)
        if passive_path is not None:
            known |= set(open_table(passive_path, "passive").column_names)
        undeclared = [c for c in categorical if c not in known]
        if undeclared:
            raise UserError(f"--categorical names columns no table has: {', '.join(undeclared)}")
    schemas = schemas or {}
    active = load_party(
        active_path,
        "active",
        id_col,
        label_col,
        features_active,
        categorical,
        schemas.get("active"),
        require_labels,
    )
    fitted = {"active": active.schema}
    passive, rows_a = None, torch.zeros(0, dtype=torch.long)
    if passive_path is not None:
        other = load_party(
            passive_path,
            "passive",
            id_col,
            label_col,
            features_passive,
            categorical,
            schemas.get("passive"),
            unique_ids=False,
        )
        fitted["passive"] = other.schema
        rows_a, rows_b = align_unique(active.rows.ids, other.rows.ids, id_col, passive_path)
        if len(rows_a) == 0:
            raise UserError(
                f"{active_path} and {passive_path}: no id appears in both tables (id column '{id_col}'); "
                "the parties must key the same users"
            )
        passive = other.rows.take(rows_b)
    return TwoPartyData(active.rows, active.labels, passive, rows_a, fitted)


def schemas_to_dict(schemas: dict[str, PartySchema]) -> dict[str, Any]:
    return {role: schema.to_dict() for role, schema in schemas.items()}


def schemas_from_dict(raw: dict[str, Any]) -> dict[str, PartySchema]:
    return {role: PartySchema.from_dict(value) for role, value in raw.items()}
