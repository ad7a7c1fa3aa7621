"""Serving: score every active row, locally or with the publisher's features.

Local mode needs only the active party: the distilled student (``vfl.local``), or the
split model's local branch. Federated mode uses the split model's full logit where the
publisher holds the row and falls back to a local score elsewhere, and says which rows did.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import torch

from kedit_vfl.artifacts import atomic_write, load_artifact, read_metadata
from kedit_vfl.errors import UserError
from kedit_vfl.progress import SILENT, Reporter, Task
from kedit_vfl.seeding import resolve_device
from kedit_vfl.vfl.channel.session import ActiveSide
from kedit_vfl.vfl.config import ScoreConfig, default_output
from kedit_vfl.vfl.data import arrays
from kedit_vfl.vfl.data.demo import embedded
from kedit_vfl.vfl.data.encoding import Party, encode
from kedit_vfl.vfl.data.loading import PartyTable
from kedit_vfl.vfl.data.read import TableSource, as_strings, open_table, read_labels, stream_ids
from kedit_vfl.vfl.data.schema import PartySchema, check_schema
from kedit_vfl.vfl.models.networks import ServingLocal, ServingSplit
from kedit_vfl.vfl.models.store import (
    LOCAL,
    SPLIT,
    load_for_party,
    load_local,
    local_from,
    schemas_of,
    split_from,
)
from kedit_vfl.vfl.serving.background import Behind, prefetched
from kedit_vfl.vfl.stages.distill import open_serving, serve_embeddings
from kedit_vfl.vfl.stages.train import StreamingMetrics, predict, single_thread

COMMAND = "score"


def _model_path(config: ScoreConfig) -> Path:
    if config.model is not None:
        return config.model
    return default_output("local.safetensors" if config.mode == "local" else "split.safetensors")


def fallback_path(given: Path | None, split_path: Path, split_sha: str | None) -> Path | None:
    """The student for rows the publisher lacks: the given one, else a sibling distilled from this model."""
    if given is not None:
        return given
    sibling = split_path.parent / "local.safetensors"
    if sibling.is_file():
        provenance = read_metadata(sibling).get("provenance", "")
        if split_sha and split_sha in provenance:
            return sibling
    return None


@dataclass
class ScoredChunk:
    """Scores of one streamed batch, in the table's row order."""

    ids: pa.ChunkedArray
    probs: np.ndarray  # (B,) float32
    federated: np.ndarray  # (B,) bool: scored with the publisher's embedding


# float32 scores: what the model computes (float64 only added digits, and a quarter of the
# writing time). mode_used goes out dictionary-encoded, as its two values, never a string
# per row; Parquet readers see a string column (the Arrow schema is not stored).
OUTPUT_SCHEMA = pa.schema(
    [("id", pa.string()), ("score", pa.float32()), ("mode_used", pa.dictionary(pa.int8(), pa.string()))]
)


MODES_USED = arrays.strings(["local", "federated"])


def _chunk_table(chunk: ScoredChunk) -> pa.Table:
    mode_used = pa.DictionaryArray.from_arrays(arrays.from_numpy(chunk.federated.view(np.int8)), MODES_USED)
    probs = arrays.from_numpy(chunk.probs.astype(np.float32, copy=False))
    columns = [chunk.ids.cast(pa.string()), probs, mode_used]
    return pa.table(columns, schema=OUTPUT_SCHEMA)


def stream_scores(chunks: Iterable[ScoredChunk], json_lines: bool) -> None:
    """The scores on stdout as they are computed: CSV, or one JSON object per row."""
    import json

    sink = sys.stdout.buffer
    if not json_lines:
        writer = pacsv.CSVWriter(sink, OUTPUT_SCHEMA)
        for chunk in chunks:
            writer.write_table(_chunk_table(chunk))
        writer.close()
    else:
        for chunk in chunks:
            ids = chunk.ids.cast(pa.string()).to_pylist()
            modes = np.where(chunk.federated, "federated", "local")
            lines = (
                json.dumps({"id": i, "score": float(p), "mode_used": str(m)})
                for i, p, m in zip(ids, chunk.probs.tolist(), modes, strict=True)
            )
            sink.write(("\n".join(lines) + "\n").encode())
    sink.flush()


def write_scores(out: Path, chunks: Iterable[ScoredChunk]) -> None:
    """``id,score,mode_used`` chunk by chunk as ``chunks`` are scored: Parquet if ``out``
    ends in .parquet, else CSV. Each chunk is written on a background thread while the
    next is scored; atomically (a failure, or a full or read-only disk, leaves no file)."""
    parquet = out.suffix.lower() == ".parquet"

    def write(tmp: Path) -> None:
        # No dictionary or statistics for the (unique) ids: they cost a third of the time. No
        # statistics for mode_used either (a third of its time): local mode writes one value,
        # and federated mode has both in nearly every row group.
        if parquet:
            writer = pq.ParquetWriter(
                tmp,
                OUTPUT_SCHEMA,
                use_dictionary=["mode_used"],
                write_statistics=["score"],
                store_schema=False,
            )
        else:
            writer = pacsv.CSVWriter(tmp, OUTPUT_SCHEMA)
        try:
            with Behind() as behind:
                for chunk in chunks:
                    behind.submit(lambda c=chunk: writer.write_table(_chunk_table(c)))
                behind.wait()
        finally:
            writer.close()

    atomic_write(out, write)


@dataclass
class _Batch:
    """One streamed batch of the active table, encoded."""

    start: int  # the table row of its first row
    ids: pa.ChunkedArray
    labels: np.ndarray | None
    num: torch.Tensor
    cat: torch.Tensor


def _encoded_batches(
    source: TableSource, schema: PartySchema, config: ScoreConfig, has_labels: bool, gathered: bool
) -> Iterator[_Batch]:
    """``gathered``: rows will be picked out by index (federated mode), so each row's
    numbers are made contiguous here, on the encoding thread (the stream measured 10%
    faster at 8M rows)."""
    columns = [config.id_col, *([config.label_col] if has_labels else []), *schema.columns]
    start = 0
    batches = source.batches(columns, dictionary=schema.categorical, threads=False)
    for batch in prefetched(batches):  # read on a thread of its own, ahead of the encoding
        ids = as_strings(batch[config.id_col])
        if ids.null_count:
            raise UserError(f"{source.path}: {ids.null_count} rows have no id in column '{config.id_col}'")
        labels = read_labels(batch, config.label_col, source.path, ids) if has_labels else None
        num, cat = encode(batch, schema, source.path, ids, "active")
        yield _Batch(start, ids, labels, num.contiguous() if gathered else num, cat)
        start += batch.num_rows


class _Federated:
    """Where the publisher holds a row: its overlap position, by active row, batch by batch."""

    def __init__(self, side: ActiveSide) -> None:
        self.side = side
        rows = side.rows_a
        if bool((rows[1:] >= rows[:-1]).all()):  # already in table order (a join in one process)
            self.order = torch.arange(len(rows))
        else:
            self.order = torch.argsort(rows, stable=True)  # overlap positions by active row
        self.rows = side.rows_a[self.order].numpy()  # (N_overlap,) ascending active rows

    def in_batch(self, start: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows within the batch, their overlap positions) for table rows [start, start + size)."""
        lo, hi = np.searchsorted(self.rows, [start, start + size])
        return torch.from_numpy(self.rows[lo:hi] - start), self.order[lo:hi]


def score(config: ScoreConfig, reporter: Reporter = SILENT) -> dict[str, Any]:
    """Score the active table; write ``id,score,mode_used``; report counts and metrics.

    The table streams through: each batch is read and encoded on a background thread,
    scored, and written behind, so memory does not grow with the table and both cores
    work. Every input row gets one output row, in order, repeated ids included. Local
    mode reads the table once; federated mode first reads the ids to align them with the
    publisher's (whose ids must be unique), then streams the features.

    In a two-party run (federated mode) the passive party serves its embeddings for the
    overlapping rows and writes nothing; the active party writes the scores.

    PyTorch runs on one thread throughout: the stages already keep the cores busy, and
    its idle OpenMP workers would spin on them (measured: 20% more CPU and wall time
    for 8M rows with two).
    """
    with single_thread():
        return _score(config, reporter)


def untrained_local_branch(artifact: Any, path: Path, use: str) -> None:
    """Refuse to score with a split model's local branch that no loss ever trained
    (vanilla VFL: ``train-split --aux-weight 0``): its scores would be noise."""
    if artifact.config.get("aux_weight") == 0:
        raise UserError(
            f"{path}: its local branch was never trained (--aux-weight 0, vanilla VFL); {use} "
            "(from 'kvtool vfl train-local' or 'kvtool vfl distill')"
        )


def _score(config: ScoreConfig, reporter: Reporter) -> dict[str, Any]:
    start_time = time.perf_counter()
    device = resolve_device(config.device)
    model_path = _model_path(config)
    if config.party == "passive":
        artifact = load_for_party(model_path, SPLIT, "passive", "--model")
        return {"mode": config.mode, **serve_embeddings(config, COMMAND, artifact, reporter, device)}
    if config.mode == "local":
        artifact = load_artifact(model_path, (LOCAL, SPLIT))
        if artifact.kind == SPLIT:
            untrained_local_branch(artifact, model_path, "score with a vfl.local model instead")
            local_fn, used = ServingLocal.of(split_from(artifact)).to(device), "split local branch"
        else:
            local_fn, used = ServingLocal.of(local_from(artifact)).to(device), "student"
        split = None
    else:
        artifact = load_for_party(model_path, SPLIT, config.party, "--model")
        split = ServingSplit(split_from(artifact)).to(device)
        fallback = fallback_path(config.fallback, model_path, artifact.sha256)
        local_fn, used = split, "split local branch"
        if fallback is None and artifact.config.get("aux_weight") == 0:
            # Rows the publisher holds need no local branch (a pooled table has none other);
            # the first row that would fall back on the untrained branch stops the run.
            def local_fn(num: torch.Tensor, cat: torch.Tensor) -> torch.Tensor:
                if len(num):
                    untrained_local_branch(
                        artifact, model_path, "give --fallback for the rows the publisher lacks"
                    )
                return split(num, cat)

        if fallback is not None:
            student, student_artifact = load_local(fallback)
            if student_artifact.extra["schema"]["active"] != artifact.extra["schema"]["active"]:
                raise UserError(
                    f"{fallback}: this fallback model's feature schema differs from {model_path}'s; "
                    "use a student distilled from that split model"
                )
            local_fn, used = ServingLocal.of(student).to(device), f"student {fallback}"
    passive = config.passive
    if config.mode == "federated" and passive is None and config.party == "both":
        if config.active != embedded("active_test.csv"):
            raise UserError("--mode federated needs --passive (the publisher's table for these rows)")
        passive = embedded("passive_test.csv")
    schema = schemas_of(artifact)["active"]
    source = open_table(config.active, "active")
    source.require_column(config.id_col, "id")
    check_schema(source, schema, source.path, "active")
    has_labels = config.label_col in source.column_names
    side, federated_rows = None, None
    if split is not None:
        with reporter.task("reading the ids and aligning them with the publisher's", total=None):
            ids = stream_ids(source, config.id_col)
            no_features = torch.zeros((len(ids), 0))  # the features stream in later, batch by batch
            table = PartyTable(Party(ids, no_features, no_features.int()), None, schema, source.path)
            side = open_serving(
                config, COMMAND, table, artifact, device, passive_path=passive, check_beside_join=True
            )
            federated_rows = _Federated(side)

    @torch.no_grad()
    def score_batch(batch: _Batch) -> ScoredChunk:
        num, cat, size = batch.num.to(device), batch.cat.to(device), len(batch.num)
        logits = torch.empty(size)
        federated = torch.zeros(size, dtype=torch.bool)
        if federated_rows is not None:
            assert split is not None
            rows, positions = federated_rows.in_batch(batch.start, size)
            link, on = federated_rows.side.link, rows.to(device)

            def full_logit(i: slice) -> torch.Tensor:  # embeddings requested a slice at a time
                return split.with_embedding(num[on[i]], cat[on[i]], link.embed(positions[i], train=False))[1]

            logits[rows] = predict(full_logit, len(rows), config.batch_size)
            federated[rows] = True
        if not federated.any():  # every row local: contiguous slices, no gather
            logits = predict(lambda i: local_fn(num[i], cat[i]), size, config.batch_size)
        else:
            local = torch.nonzero(~federated).squeeze(1)
            at = local.to(device)
            logits[local] = predict(lambda i: local_fn(num[at[i]], cat[at[i]]), len(local), config.batch_size)
        return ScoredChunk(batch.ids, torch.sigmoid(logits).numpy(), federated.numpy())

    counts = {"rows": 0, "rows_federated": 0}
    metrics = StreamingMetrics()

    def scored(task: Task) -> Iterator[ScoredChunk]:
        encoded = _encoded_batches(source, schema, config, has_labels, gathered=federated_rows is not None)
        for batch in prefetched(encoded):
            chunk = score_batch(batch)
            if batch.labels is not None:
                known = ~np.isnan(batch.labels)
                metrics.update(batch.labels[known], chunk.probs[known])
            counts["rows"] += len(chunk.probs)
            counts["rows_federated"] += int(chunk.federated.sum())
            task.advance(len(chunk.probs))
            yield chunk
        if counts["rows"] == 0:
            raise UserError(f"{source.path}: the active table is empty (no rows)")

    out = config.out or default_output(f"scores_{config.mode}.csv")
    try:
        with reporter.task("scoring", total=None) as task:
            if config.to_stdout:
                stream_scores(scored(task), config.json_lines)
            else:
                write_scores(out, scored(task))
        if side is not None:
            side.link.finish()
    finally:
        if side is not None:
            side.close()
    n, n_federated = counts["rows"], counts["rows_federated"]
    result: dict[str, Any] = {
        "out": str(out),
        "model": str(model_path),
        "model_kind": artifact.kind,
        "mode": config.mode,
        "party": config.party,
        "local_scorer": used,
        "rows": n,
        "rows_federated": n_federated,
        "rows_local_fallback": n - n_federated if config.mode == "federated" else 0,
        "rows_labelled": metrics.rows,
        **metrics.result(),
    }
    if side is not None:
        result["traffic"] = side.traffic()
    result["seconds"] = round(time.perf_counter() - start_time, 3)
    return result
