"""What the publisher received, kept on its own side: the record ``kvtool vfl audit`` reads.

``train-split --record-received FILE`` makes the party holding the publisher's tower
keep, per user of the overlap that sent it gradients, the first gradient and the sum of
all (each row's own gradient, as the active party sent it, defences applied), and the
count. The file is Parquet, one row per user, so the publisher can open it with any
tool: ``id`` (text), ``gradients`` (int32), ``first`` and ``total`` (fixed-size lists
of float32), and the file metadata key ``kvtool`` (JSON: kind, version, width, run id).
It holds nothing the publisher did not already receive; it only stops it from being
thrown away, so that the publisher can see what an attacker on its side could learn.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from kedit_vfl import __version__
from kedit_vfl.artifacts import atomic_write
from kedit_vfl.errors import UserError
from kedit_vfl.vfl.privacy.leakage import GradientRecorder

KIND = "vfl.received-gradients"
MAX_WIDTH = 4096  # an embedding wider than this is not one kvtool wrote


@dataclass
class Received:
    """A record read back: one row per user that sent gradients."""

    ids: list[str]
    gradients: torch.Tensor  # (N,) int: gradients received per user
    first: torch.Tensor  # (N, d) the first one
    total: torch.Tensor  # (N, d) their sum
    meta: dict[str, Any]


def write_received(path: Path, recorder: GradientRecorder, ids: pa.ChunkedArray, meta: dict[str, Any]) -> int:
    """Write the users of ``recorder`` that received gradients (``ids`` per overlap
    position); returns how many."""
    seen = torch.nonzero(recorder.seen).squeeze(1)
    width = recorder.first.shape[1]
    text_ids = ids.cast(pa.string()) if ids.type != pa.string() else ids
    table = pa.table(
        {
            "id": text_ids.take(pa.array(seen.numpy())),
            "gradients": pa.array(recorder.count[seen].numpy(), pa.int32()),
            "first": _vectors(recorder.first[seen], width),
            "total": _vectors(recorder.total[seen], width),
        }
    )
    header = {"kind": KIND, "kvtool_version": __version__, "width": width, **meta}
    table = table.replace_schema_metadata({"kvtool": json.dumps(header)})
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))
    return len(seen)


def _vectors(values: torch.Tensor, width: int) -> pa.FixedSizeListArray:
    flat = pa.array(values.float().contiguous().numpy().reshape(-1), pa.float32())
    return pa.FixedSizeListArray.from_arrays(flat, width)


def read_received(path: Path) -> Received:
    """Read and check a record written by :func:`write_received`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file (a record written by train-split --record-received)")
    try:
        handle = pq.ParquetFile(path)
        raw = (handle.schema_arrow.metadata or {}).get(b"kvtool")
        header = json.loads(raw) if raw else None
    except (pa.ArrowInvalid, OSError, ValueError) as exc:
        raise UserError(f"{path}: not a Parquet file ({str(exc).splitlines()[0][:160]})") from exc
    if not isinstance(header, dict) or header.get("kind") != KIND:
        raise UserError(f"{path}: not a record of received gradients (train-split --record-received)")
    width = header.get("width")
    if not isinstance(width, int) or not 1 <= width <= MAX_WIDTH:
        raise UserError(f"{path}: the record's width {width!r} is not an embedding width (1-{MAX_WIDTH})")
    expected = {
        "id": pa.string(),
        "gradients": pa.int32(),
        "first": pa.list_(pa.float32(), width),
        "total": pa.list_(pa.float32(), width),
    }
    schema = handle.schema_arrow
    for name, kind in expected.items():
        if name not in schema.names or not schema.field(name).type.equals(kind):
            raise UserError(f"{path}: column '{name}' is missing or not {kind}")
    try:
        table = handle.read(columns=list(expected))
    except (pa.ArrowInvalid, OSError) as exc:
        raise UserError(f"{path}: cannot read the record ({str(exc).splitlines()[0][:160]})") from exc
    if table.column("id").null_count or table.column("first").null_count or table.column("total").null_count:
        raise UserError(f"{path}: the record has missing values")
    first, total = (_matrix(table.column(name), width) for name in ("first", "total"))
    if not (torch.isfinite(first).all() and torch.isfinite(total).all()):
        raise UserError(f"{path}: the record holds NaN or infinite gradients")
    gradients = torch.from_numpy(table.column("gradients").to_numpy().astype(np.int64))
    if len(gradients) and int(gradients.min()) < 1:
        raise UserError(f"{path}: a user is listed with no gradient received")
    ids = table.column("id").to_pylist()
    if len(set(ids)) != len(ids):
        raise UserError(f"{path}: a user id appears twice")
    return Received(ids, gradients, first, total, header)


def _matrix(column: pa.ChunkedArray, width: int) -> torch.Tensor:
    if len(column) == 0:
        return torch.zeros(0, width)
    flat = pa.concat_arrays([chunk.flatten() for chunk in column.chunks]).to_numpy(zero_copy_only=False)
    return torch.from_numpy(flat.astype(np.float32).reshape(len(column), width))
