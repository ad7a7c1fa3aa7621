"""Two-party tables: reading, checking, joining on ids, and the feature transform.

Tables are read through the ``datasets`` library (Arrow, memory-mapped from its cache),
checked once, and turned into tensors with column-wise (never row-wise) operations.
The transform (means, standard deviations, vocabularies) is a :class:`PartySchema`,
fitted on the training tables and stored in every artifact, so that scoring applies
exactly the training transform and refuses a table it does not fit.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import torch

from kedit_vfl.errors import UserError
from kedit_vfl.paths import cache_dir

FORMATS = {".csv": "csv", ".parquet": "parquet", ".jsonl": "json", ".json": "json"}
# Categorical index 0 is "unseen in training", 1 is "missing"; known values start at 2.
OOV, MISSING, FIRST = 0, 1, 2
_NUMBER = r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$|^\s*[-+]?(nan|inf|infinity)\s*$"
_HOLDOUT_KEY = "kvtool-vfl-valid"  # 16 characters: pandas' hash key


def read_table(path: str | Path, role: str = "input") -> pa.Table:
    """Read a CSV, Parquet or JSON Lines file (or a folder of them) as an Arrow table."""
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
    for file in files:
        try:
            with open(file, "rb") as handle:
                handle.read(1)
        except OSError as exc:
            raise UserError(f"{file}: cannot read the file ({exc.strerror})") from exc
    (builder,) = kinds
    table = _load(builder, files, path, role)
    if table.num_rows == 0:
        raise UserError(f"{path}: the {role} table is empty (no rows)")
    return table


def _load(builder: str, files: list[Path], path: Path, role: str) -> pa.Table:
    import datasets
    from datasets.exceptions import DatasetsError

    datasets.disable_progress_bars()
    # Read failures become one UserError line below; datasets' own log lines would repeat them.
    logging.getLogger("datasets").setLevel(logging.CRITICAL + 1)
    try:
        dataset = datasets.load_dataset(
            builder,
            data_files=[str(f.resolve()) for f in files],
            split="train",
            cache_dir=str(cache_dir() / "datasets"),
        )
    except (DatasetsError, ValueError, OSError, pa.ArrowException) as exc:
        cause = exc.__cause__ or exc
        detail = str(cause).strip().splitlines()[0][:160] if str(cause).strip() else type(cause).__name__
        if "corresponds to no data" in str(exc) or "No columns to parse" in detail:
            raise UserError(f"{path}: the {role} table is empty (no rows)") from exc
        raise UserError(f"{path}: cannot read this {role} table as {builder} ({detail})") from exc
    return dataset.data.table


def require_column(table: pa.Table, name: str, path: Path | str, what: str) -> pa.ChunkedArray:
    if name not in table.column_names:
        shown = ", ".join(table.column_names[:12])
        raise UserError(f"{path}: no {what} column '{name}' (columns: {shown}); set it with --{what}-col")
    return table[name]


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
    if pc.count_distinct(ids).as_py() == len(ids):
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
    if not _is_numeric_type(column.type):
        text = pc.utf8_trim_whitespace(pc.cast(column, pa.string()))
        column = pc.if_else(pc.equal(text, ""), pa.scalar(None, pa.string()), text)
        bad = pc.invert(pc.is_in(column, value_set=pa.array(["0", "1", "0.0", "1.0"])))
    else:
        column = pc.cast(column, pa.float64())
        bad = pc.invert(pc.is_in(column, value_set=pa.array([0.0, 1.0])))
        column = pc.if_else(pc.is_nan(column), pa.scalar(None, pa.float64()), column)
        bad = pc.and_(bad, pc.is_valid(column))
    bad = pc.fill_null(pc.and_(bad, pc.is_valid(column)), False)
    if pc.any(bad).as_py():
        values = column.filter(bad)[:3].to_pylist()
        where = ids.filter(bad)[:3].to_pylist()
        raise UserError(
            f"{path}: label column '{label_col}' must hold 0, 1 or nothing; "
            f"found {', '.join(repr(v) for v in values)} (ids {', '.join(where)})"
        )
    return pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False).astype(np.float32)


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
    return pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64)


@dataclass
class PartySchema:
    """One party's features and the statistics of their training transform."""

    numeric: list[str] = field(default_factory=list)
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    categorical: list[str] = field(default_factory=list)
    vocab: list[list[str]] = field(default_factory=list)

    @property
    def cardinalities(self) -> list[int]:
        return [len(v) + FIRST for v in self.vocab]

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
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> PartySchema:
        return cls(**{k: raw[k] for k in ("numeric", "mean", "std", "categorical", "vocab")})


def select_features(
    table: pa.Table, wanted: Sequence[str] | None, exclude: Sequence[str], path: Path | str, role: str
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


def fit_schema(
    table: pa.Table,
    features: Sequence[str],
    categorical: Sequence[str],
    path: Path | str,
    ids: pa.ChunkedArray,
    max_vocab: int = 100_000,
) -> PartySchema:
    """Decide numeric vs categorical and fit the transform on a training table.

    Declared columns are categorical; so is a text column unless most of its values are
    numbers, in which case the rest are reported as bad input instead of guessed at.
    """
    schema = PartySchema()
    for name in features:
        column = table[name]
        text_like = not _is_numeric_type(column.type)
        if text_like and name not in categorical:
            nonblank = pc.drop_null(pc.cast(column, pa.string()))
            numeric_share = (
                1.0 - pc.mean(pc.cast(_non_numeric(nonblank), pa.float64())).as_py() if len(nonblank) else 0
            )
            text_like = numeric_share < 0.5
        if name in categorical or text_like:
            counts = pc.value_counts(pc.drop_null(as_strings(column)))
            order = np.argsort(-counts.field("counts").to_numpy(), kind="stable")[:max_vocab]
            schema.categorical.append(name)
            schema.vocab.append(sorted(counts.field("values").take(pa.array(order)).to_pylist()))
        else:
            values = _numeric_values(column, name, path, ids)
            finite = values[np.isfinite(values)]
            mean = float(finite.mean()) if finite.size else 0.0
            std = float(finite.std()) if finite.size else 1.0
            schema.numeric.append(name)
            schema.mean.append(mean)
            schema.std.append(std if std > 1e-12 else 1.0)
    return schema


def check_schema(table: pa.Table, schema: PartySchema, path: Path | str, role: str) -> None:
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

    Missing numbers become the training mean (0 after standardising); missing
    categories map to index 1 and categories unseen in training to index 0.
    """
    check_schema(table, schema, path, role)
    n = table.num_rows
    num = np.zeros((n, len(schema.numeric)), dtype=np.float32)  # (N, n_numeric)
    for j, name in enumerate(schema.numeric):
        values = _numeric_values(table[name], name, path, ids)
        scaled = np.arcsinh((values - schema.mean[j]) / schema.std[j])  # linear near 0, tames heavy tails
        num[:, j] = np.where(np.isfinite(scaled), scaled, 0.0)
    cat = np.zeros((n, len(schema.categorical)), dtype=np.int64)  # (N, n_categorical)
    for j, name in enumerate(schema.categorical):
        text = as_strings(table[name])
        index = pc.index_in(text, value_set=pa.array(schema.vocab[j], pa.string()))
        known = pc.add(pc.cast(index, pa.int64()), FIRST).to_numpy(zero_copy_only=False)
        missing = pc.is_null(text).to_numpy(zero_copy_only=False)
        seen = pc.is_valid(index).to_numpy(zero_copy_only=False)
        cat[:, j] = np.where(missing, MISSING, np.where(seen, np.nan_to_num(known), OOV))
    return torch.from_numpy(num), torch.from_numpy(cat)


@dataclass
class Party:
    """One party's rows after the transform."""

    ids: pa.ChunkedArray
    num: torch.Tensor  # (N, n_numeric) float32
    cat: torch.Tensor  # (N, n_categorical) int64

    def take(self, index: torch.Tensor) -> Party:
        return Party(self.ids.take(pa.array(index.numpy())), self.num[index], self.cat[index])

    def __len__(self) -> int:
        return int(self.num.shape[0])


def align(active_ids: pa.ChunkedArray, passive_ids: pa.ChunkedArray) -> tuple[torch.Tensor, torch.Tensor]:
    """Active row -> passive row positions for the ids both parties hold (one hash join)."""
    position = pc.index_in(active_ids, value_set=pa.concat_arrays(passive_ids.chunks))
    found = pc.is_valid(position).to_numpy(zero_copy_only=False)
    rows_a = np.flatnonzero(found)
    rows_b = position.filter(pc.is_valid(position)).to_numpy(zero_copy_only=False).astype(np.int64)
    return torch.from_numpy(rows_a), torch.from_numpy(rows_b)


def holdout_mask(ids: pa.ChunkedArray, fraction: float) -> np.ndarray:
    """A stable validation subset keyed by id, so that every stage holds out the same rows."""
    if fraction <= 0:
        return np.zeros(len(ids), dtype=bool)
    hashes = pd.util.hash_array(
        np.asarray(ids.to_numpy(zero_copy_only=False), dtype=object), hash_key=_HOLDOUT_KEY
    )
    return (hashes % np.uint64(10_000)) < np.uint64(round(fraction * 10_000))


@dataclass
class TwoPartyData:
    """Both parties' rows, transformed, with the overlap between them."""

    active: Party
    labels: torch.Tensor | None  # (N_active,) float32, NaN = unlabelled; None = no label column
    passive: Party | None  # (N_overlap, ...) passive rows aligned with ``rows_a``
    rows_a: torch.Tensor  # (N_overlap,) active row index of each overlapped pair
    schemas: dict[str, PartySchema]

    @property
    def overlapped(self) -> torch.Tensor:
        """(N_active,) bool: which active rows the passive party also holds."""
        mask = torch.zeros(len(self.active), dtype=torch.bool)
        mask[self.rows_a] = True
        return mask


@dataclass
class PartyTable:
    """One party's table after reading and the transform: what a party holds alone."""

    rows: Party
    labels: torch.Tensor | None  # (N,) float32, NaN = unlabelled; None = no label column
    schema: PartySchema
    path: Path


def load_party(
    path: Path,
    role: str,
    id_col: str,
    label_col: str,
    features: Sequence[str] | None = None,
    categorical: Sequence[str] = (),
    schema: PartySchema | None = None,
    require_labels: bool = False,
) -> PartyTable:
    """Read, check and transform one party's table (fitting its transform unless given).

    A two-party run calls this on each side with only that side's table; columns named
    in ``categorical`` that this table lacks are the other party's and are ignored.
    """
    table = read_table(path, role)
    ids = read_ids(table, id_col, path)
    labels = None
    if role == "active" and (require_labels or label_col in table.column_names):
        labels = torch.from_numpy(read_labels(table, label_col, path, ids))
    if schema is None:
        chosen = select_features(table, features, (id_col, label_col), path, role)
        schema = fit_schema(table, chosen, categorical, path, ids)
    num, cat = encode(table, schema, path, ids, role)
    return PartyTable(Party(ids, num, cat), labels, schema, Path(path))


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
    table_a = read_table(active_path, "active")
    ids_a = read_ids(table_a, id_col, active_path)
    labels = None
    if require_labels or label_col in table_a.column_names:
        labels = torch.from_numpy(read_labels(table_a, label_col, active_path, ids_a))
    tables = {"active": (table_a, ids_a, active_path)}
    if passive_path is not None:
        table_b = read_table(passive_path, "passive")
        tables["passive"] = (table_b, read_ids(table_b, id_col, passive_path), passive_path)
    if schemas is None:
        known = set().union(*(t.column_names for t, _, _ in tables.values()))
        undeclared = [c for c in categorical if c not in known]
        if undeclared:
            raise UserError(f"--categorical names columns no table has: {', '.join(undeclared)}")
        wanted = {"active": features_active, "passive": features_passive}
        schemas = {}
        for role, (table, ids, path) in tables.items():
            features = select_features(table, wanted[role], (id_col, label_col), path, role)
            schemas[role] = fit_schema(table, features, categorical, path, ids)
    parties = {}
    for role, (table, ids, path) in tables.items():
        num, cat = encode(table, schemas[role], path, ids, role)
        parties[role] = Party(ids, num, cat)
    passive, rows_a = None, torch.zeros(0, dtype=torch.long)
    if "passive" in parties:
        rows_a, rows_b = align(ids_a, parties["passive"].ids)
        if len(rows_a) == 0:
            raise UserError(
                f"{active_path} and {passive_path}: no id appears in both tables (id column '{id_col}'); "
                "the parties must key the same users"
            )
        passive = parties["passive"].take(rows_b)
    return TwoPartyData(parties["active"], labels, passive, rows_a, schemas)


def schemas_to_dict(schemas: dict[str, PartySchema]) -> dict[str, Any]:
    return {role: schema.to_dict() for role, schema in schemas.items()}


def schemas_from_dict(raw: dict[str, Any]) -> dict[str, PartySchema]:
    return {role: PartySchema.from_dict(value) for role, value in raw.items()}
