"""What a scoring request and its answer look like, and how a request's rows are checked
against the served model's features and encoded exactly as ``kvtool vfl score`` encodes a
table's rows (the same transform, so the same scores).

Every problem is one line naming the row (its position and id) and the feature, so an ad
server's log says what to fix; the server answers it with a 4xx and keeps running.
"""

from __future__ import annotations

import math
from typing import Literal, Optional, Union

import pyarrow as pa
import torch
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr

from kedit_vfl.vfl.data.encoding import encode
from kedit_vfl.vfl.data.schema import PartySchema

MAX_ID_CHARS = 256
FeatureValue = Union[StrictInt, StrictFloat, StrictStr, None]  # null: a missing value


class Row(BaseModel):
    """One user to score: the advertiser's features of that user, keyed by column name."""

    model_config = ConfigDict(extra="forbid")
    id: StrictStr = Field(
        min_length=1, max_length=MAX_ID_CHARS, description="The user id (as in the tables)."
    )
    features: dict[str, FeatureValue] = Field(
        description="Every feature column of the model: a number (numeric columns), a string "
        "(categorical columns) or null (missing)."
    )


class ScoreRequest(BaseModel):
    """One row, or a batch of rows (up to --max-batch)."""

    model_config = ConfigDict(extra="forbid")
    rows: list[Row] = Field(min_length=1)


class Scored(BaseModel):
    id: str
    score: float = Field(description="The click probability.")
    path: Literal["federated", "local"] = Field(description="Which model served the row.")
    reason: Optional[str] = Field(
        description="Why the local model served it: local-model, not-agreed, publisher-down or deadline; "
        "null for federated rows."
    )


class ScoreResponse(BaseModel):
    model: str = Field(description="sha256 of the model file that answered (changes on reload).")
    results: list[Scored]


class BadRequest(Exception):
    """A request the server refuses (one line), with its HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def _where(index: int, row: Row) -> str:
    return f"row {index} (id {row.id!r})"


def check_rows(rows: list[Row], schema: PartySchema) -> None:
    """Every row has exactly the model's features, each of the right type; else BadRequest (422)."""
    numeric, categorical = set(schema.numeric), set(schema.categorical)
    expected = len(numeric) + len(categorical)
    for index, row in enumerate(rows):
        features = row.features
        if len(features) != expected or not all(name in features for name in schema.columns):
            missing = [c for c in schema.columns if c not in features]
            if missing:
                raise BadRequest(
                    422,
                    f"{_where(index, row)}: missing feature '{missing[0]}'"
                    + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                    + "; send null for a missing value",
                )
            unknown = sorted(c for c in features if c not in numeric and c not in categorical)
            raise BadRequest(
                422,
                f"{_where(index, row)}: unknown feature '{unknown[0][:80]}'; this model takes "
                + ", ".join(schema.columns),
            )
        for name in schema.numeric:
            value = features[name]
            if value is not None and not isinstance(value, (int, float)):
                raise BadRequest(
                    422,
                    f"{_where(index, row)}: feature '{name}' is numeric: send a number or null",
                )
        for name in schema.categorical:
            value = features[name]
            if value is not None and not isinstance(value, str):
                raise BadRequest(
                    422,
                    f"{_where(index, row)}: feature '{name}' is categorical: send a string or null",
                )


def encode_rows(rows: list[Row], schema: PartySchema) -> tuple[torch.Tensor, torch.Tensor]:
    """(num (B, n_numeric) float32, cat (B, n_categorical)): the training transform, as in ``score``."""
    ids = pa.chunked_array([pa.array([row.id for row in rows], pa.string())])
    columns: dict[str, pa.Array] = {}
    for name in schema.numeric:
        columns[name] = pa.array([_number(row.features[name]) for row in rows], pa.float64())
    for name in schema.categorical:
        columns[name] = pa.array([row.features[name] for row in rows], pa.string())
    num, cat = encode(pa.table(columns), schema, "request", ids, "active")
    return num.contiguous(), cat


def _number(value: object) -> float | None:
    """A JSON number as the float a CSV reader would parse (integers beyond 2**53 rounded)."""
    if value is None:
        return None
    try:
        number = float(value)  # type: ignore[arg-type]
    except OverflowError:  # an integer beyond float64: infinite, which the transform mends as missing
        return math.inf if value > 0 else -math.inf  # type: ignore[operator]
    return number if not math.isnan(number) else None
