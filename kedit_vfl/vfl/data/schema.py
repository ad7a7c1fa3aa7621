"""The feature transform of one party (:class:`PartySchema`): which columns, their
means and deviations, vocabularies; fitted in one streaming pass and stored in every
artifact, so scoring applies exactly the training transform."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kedit_vfl.errors import UserError
from kedit_vfl.vfl.data.read import (
    TableSource,
    _is_numeric_type,
    _non_numeric,
    as_strings,
)

# Categorical index 0 is "unseen in training", 1 is "missing"; known values start at 2.
OOV, MISSING, FIRST = 0, 1, 2


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


def schemas_to_dict(schemas: dict[str, PartySchema]) -> dict[str, Any]:
    return {role: schema.to_dict() for role, schema in schemas.items()}


def schemas_from_dict(raw: dict[str, Any]) -> dict[str, PartySchema]:
    return {role: PartySchema.from_dict(value) for role, value in raw.items()}
