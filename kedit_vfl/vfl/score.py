"""Serving: score every active row, locally or with the publisher's features.

Local mode needs only the active party: the distilled student (``vfl.local``), or the
split model's local branch. Federated mode uses the split model's full logit where the
publisher holds the row and falls back to a local score elsewhere, and says which rows did.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import torch

from kedit_vfl.artifacts import atomic_write, load_artifact, read_metadata
from kedit_vfl.errors import UserError
from kedit_vfl.progress import SILENT, Reporter
from kedit_vfl.seeding import resolve_device
from kedit_vfl.vfl.config import ScoreConfig, default_output
from kedit_vfl.vfl.data import load_party
from kedit_vfl.vfl.demo import embedded
from kedit_vfl.vfl.distill import open_serving, serve_embeddings
from kedit_vfl.vfl.store import (
    LOCAL,
    SPLIT,
    load_for_party,
    load_local,
    local_from,
    schemas_of,
    split_from,
)
from kedit_vfl.vfl.train import binary_metrics, predict

COMMAND = "score"


def _model_path(config: ScoreConfig) -> Path:
    if config.model is not None:
        return config.model
    return default_output("local.safetensors" if config.mode == "local" else "split.safetensors")


def _fallback_path(config: ScoreConfig, split_path: Path, split_sha: str | None) -> Path | None:
    """The student for rows the publisher lacks: the given one, else a sibling distilled from this model."""
    if config.fallback is not None:
        return config.fallback
    sibling = split_path.parent / "local.safetensors"
    if sibling.is_file():
        provenance = read_metadata(sibling).get("provenance", "")
        if split_sha and split_sha in provenance:
            return sibling
    return None


OUTPUT_CHUNK = 1 << 20  # rows per written chunk


def write_scores(out: Path, ids: pa.ChunkedArray, probs: np.ndarray, federated: np.ndarray) -> None:
    """``id,score,mode_used`` in chunks: Parquet if ``out`` ends in .parquet, else CSV;
    atomically (a full or read-only disk leaves no partial file)."""
    schema = pa.schema([("id", pa.string()), ("score", pa.float64()), ("mode_used", pa.string())])
    parquet = out.suffix.lower() == ".parquet"

    def write(tmp: Path) -> None:
        writer = pq.ParquetWriter(tmp, schema) if parquet else pacsv.CSVWriter(tmp, schema)
        try:
            for start in range(0, len(probs), OUTPUT_CHUNK):
                stop = min(start + OUTPUT_CHUNK, len(probs))
                mode_used = pc.if_else(pa.array(federated[start:stop]), "federated", "local")
                chunk = pa.table(
                    [
                        ids.slice(start, stop - start).cast(pa.string()),
                        pa.array(probs[start:stop].astype(np.float64)),
                        mode_used,
                    ],
                    schema=schema,
                )
                writer.write_table(chunk)
        finally:
            writer.close()

    atomic_write(out, write)


def score(config: ScoreConfig, reporter: Reporter = SILENT) -> dict[str, Any]:
    """Score the active table; write ``id,score,mode_used``; report counts and metrics.

    In a two-party run (federated mode) the passive party serves its embeddings for the
    overlapping rows and writes nothing; the active party writes the scores.
    """
    start = time.perf_counter()
    device = resolve_device(config.device)
    model_path = _model_path(config)
    if config.party == "passive":
        artifact = load_for_party(model_path, SPLIT, "passive", "--model")
        return {"mode": config.mode, **serve_embeddings(config, COMMAND, artifact, reporter, device)}
    if config.mode == "local":
        artifact = load_artifact(model_path, (LOCAL, SPLIT))
        if artifact.kind == SPLIT:
            local_fn, used = split_from(artifact).to(device).local_logit, "split local branch"
        else:
            local_fn, used = local_from(artifact).to(device), "student"
        split = None
    else:
        artifact = load_for_party(model_path, SPLIT, config.party, "--model")
        split = split_from(artifact).to(device)
        fallback = _fallback_path(config, model_path, artifact.sha256)
        local_fn, used = split.local_logit, "split local branch"
        if fallback is not None:
            student, student_artifact = load_local(fallback)
            if student_artifact.extra["schema"]["active"] != artifact.extra["schema"]["active"]:
                raise UserError(
                    f"{fallback}: this fallback model's feature schema differs from {model_path}'s; "
                    "use a student distilled from that split model"
                )
            local_fn, used = student.to(device), f"student {fallback}"
    passive = config.passive
    if config.mode == "federated" and passive is None and config.party == "both":
        if config.active != embedded("active_test.csv"):
            raise UserError("--mode federated needs --passive (the publisher's table for these rows)")
        passive = embedded("passive_test.csv")
    schemas = schemas_of(artifact)
    with reporter.task("reading and transforming the table", total=None):
        table = load_party(config.active, "active", config.id_col, config.label_col, schema=schemas["active"])
    n = len(table.rows)
    a_num, a_cat = table.rows.num.to(device), table.rows.cat.to(device)
    logits = torch.empty(n)
    federated = torch.zeros(n, dtype=torch.bool)
    traffic = None
    if split is not None:
        side = open_serving(config, COMMAND, table, artifact, device, passive_path=passive)
        try:
            with torch.no_grad(), reporter.task("scoring with the publisher's embeddings", total=None):
                rows_a, positions, link = side.rows_a.to(device), torch.arange(len(side.rows_a)), side.link
                logits[side.rows_a] = predict(  # a slice at a time: embeddings requested as needed
                    lambda i: split.with_embedding(
                        a_num[rows_a[i]], a_cat[rows_a[i]], link.embed(positions[i], train=False)
                    )[1],
                    len(rows_a),
                    config.batch_size,
                )
            side.link.finish()
            traffic = side.traffic()
        finally:
            side.close()
        federated[side.rows_a] = True
    local_rows = torch.nonzero(~federated).squeeze(1).to(device)
    with torch.no_grad(), reporter.task("scoring", total=None):
        if len(local_rows) == n:  # every row local: contiguous slices, no gather
            logits = predict(lambda i: local_fn(a_num[i], a_cat[i]), n, config.batch_size)
        else:
            logits[local_rows.cpu()] = predict(
                lambda i: local_fn(a_num[local_rows[i]], a_cat[local_rows[i]]),
                len(local_rows),
                config.batch_size,
            )
    probs = torch.sigmoid(logits).numpy()
    out = config.out or default_output(f"scores_{config.mode}.csv")
    write_scores(out, table.rows.ids, probs, federated.numpy())
    result: dict[str, Any] = {
        "out": str(out),
        "model": str(model_path),
        "model_kind": artifact.kind,
        "mode": config.mode,
        "party": config.party,
        "local_scorer": used,
        "rows": n,
        "rows_federated": int(federated.sum()),
        "rows_local_fallback": int(n - federated.sum()) if config.mode == "federated" else 0,
        "rows_labelled": 0,
        "auc": None,
        "logloss": None,
    }
    if table.labels is not None:
        labelled = ~np.isnan(table.labels.numpy())
        result["rows_labelled"] = int(labelled.sum())
        if labelled.any():
            result.update(binary_metrics(table.labels.numpy()[labelled], probs[labelled]))
    if traffic is not None:
        result["traffic"] = traffic
    result["seconds"] = round(time.perf_counter() - start, 3)
    return result
