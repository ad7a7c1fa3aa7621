"""Export the local-mode model to ONNX, with the feature transform inside the graph.

A serving system then needs no Python and no copy of the transform: it feeds raw
numbers (NaN for missing) and vocabulary indices, and reads a probability. The graph
is exported from PyTorch (:class:`OnnxScorer` wraps the model), checked with
onnxruntime against what ``kvtool vfl score --mode local`` computes for the same rows,
and written only when the two agree; a JSON sidecar beside it says how to build the
inputs (column order, vocabularies, the index convention) and what it came from.

Exporter: ``torch.onnx.export(..., dynamo=False)``, the TorchScript exporter. It needs
only the ``onnx`` package (no ``onnxscript``/``onnx-ir``), exports this small static
graph in well under a second, and supports every operator used here once ``asinh`` is
written as ``log(|x| + sqrt(x^2 + 1))``. torch marks it deprecated; the dynamo exporter
(``dynamo=True``) works on the same module if it goes, at the cost of ``onnxscript``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import nn

from kedit_vfl import __version__
from kedit_vfl.artifacts import Artifact, atomic_write, load_artifact
from kedit_vfl.errors import UserError
from kedit_vfl.progress import SILENT, Reporter
from kedit_vfl.vfl.config import DEFAULT_OPSET, ExportConfig
from kedit_vfl.vfl.data.demo import embedded
from kedit_vfl.vfl.data.encoding import encode
from kedit_vfl.vfl.data.read import _numeric_values, as_strings, read_table
from kedit_vfl.vfl.data.schema import FIRST, MISSING, OOV, PartySchema, check_schema
from kedit_vfl.vfl.models.networks import LocalModel, ServingLocal
from kedit_vfl.vfl.models.store import LOCAL, SPLIT, local_from, party_of, schemas_of, split_from
from kedit_vfl.vfl.stages.train import predict

TOLERANCE = 1e-5  # largest |onnx score - kvtool score| accepted
EDGE_ROWS = 64  # synthetic rows (NaN, inf, huge values, missing and unseen categories) always checked
INSTALL_HINT = "pip install 'kvtool[onnx]'"
_LN2 = math.log(2.0)


def sidecar_path(out: Path) -> Path:
    """``OUT.json`` beside the ONNX file."""
    return out.with_name(out.name + ".json")


class OnnxScorer(nn.Module):
    """The served graph: raw inputs -> the training transform -> the local model -> score.

    ``numeric`` (B, n_numeric) float32 raw values, NaN for missing; ``categorical``
    (B, n_categorical) int64 vocabulary indices. The transform runs in float64 (where
    :func:`kedit_vfl.vfl.data.encoding.encode` takes the ``asinh`` in float32: the two agree to
    a float32 rounding or two); indices outside a column's range count as unseen.
    """

    def __init__(self, model: LocalModel, schema: PartySchema) -> None:
        super().__init__()
        self.model = model
        self.has_numeric, self.has_categorical = bool(schema.numeric), bool(schema.categorical)
        self.register_buffer("mean", torch.tensor(schema.mean, dtype=torch.float64))
        self.register_buffer("std", torch.tensor(schema.std, dtype=torch.float64))
        self.register_buffer("cardinality", torch.tensor(schema.cardinalities, dtype=torch.long))

    @staticmethod
    def asinh(x: torch.Tensor) -> torch.Tensor:
        """``asinh`` from Log and Sqrt (no ONNX Asinh in the TorchScript exporter); exact to
        float64 rounding, and ``log(2|x|)`` past 1e8 where ``x^2`` could overflow."""
        a = x.abs()
        near = torch.log(a + torch.sqrt(a * a + 1.0))
        far = torch.log(a) + _LN2
        return torch.sign(x) * torch.where(a > 1e8, far, near)

    def transform(self, numeric: torch.Tensor) -> torch.Tensor:
        scaled = self.asinh((numeric.double() - self.mean) / self.std)  # (B, n_num) float64
        return torch.where(torch.isfinite(scaled), scaled, torch.zeros_like(scaled)).float()

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        numeric = inputs[0] if self.has_numeric else None
        categorical = inputs[-1] if self.has_categorical else None
        if categorical is not None:
            inside = (categorical >= 0) & (categorical < self.cardinality)
            categorical = torch.where(inside, categorical, torch.zeros_like(categorical))
        if numeric is not None:
            num = self.transform(numeric)
        else:  # (B, 0): the tower concatenates nothing before the embeddings
            num = categorical[:, :0].float()
        logit = self.model(num, categorical)  # (B,)
        return torch.sigmoid(logit), logit


def _ids(table: pa.Table, id_col: str | None) -> pa.ChunkedArray:
    """Row names for error messages: the id column if present, else row numbers."""
    if id_col is not None and id_col in table.column_names:
        return as_strings(table[id_col])
    numbers = pc.cast(pa.array(np.arange(1, table.num_rows + 1)), pa.string())
    return pa.chunked_array([pc.binary_join_element_wise("row ", numbers, "")])


def encode_for_onnx(
    table: pa.Table, schema: PartySchema, path: Path | str = "table", id_col: str | None = "id"
) -> tuple[np.ndarray, np.ndarray]:
    """The exported graph's inputs for a table: ``(numeric, categorical)``.

    ``numeric`` is (N, n_numeric) float32 raw values in the schema's order, NaN where
    missing; ``categorical`` is (N, n_categorical) int64: position in the sorted
    vocabulary + 2, 1 for missing, 0 for a value unseen in training.
    """
    check_schema(table, schema, path, "active")
    ids = _ids(table, id_col)
    numeric = np.empty((table.num_rows, len(schema.numeric)), dtype=np.float32)  # (N, n_numeric)
    for j, name in enumerate(schema.numeric):
        numeric[:, j] = _numeric_values(table[name], name, path, ids)  # nulls -> NaN
    categories_only = dataclasses.replace(schema, numeric=[], mean=[], std=[])
    _, categorical = encode(table, categories_only, path, ids, "active")  # (N, n_categorical)
    return numeric, categorical.numpy().astype(np.int64, copy=False)


def _require_runtime() -> Any:
    try:
        import onnx  # noqa: F401  (torch.onnx.export needs it)
        import onnxruntime
    except ImportError as exc:
        raise UserError(f"ONNX export needs the onnx and onnxruntime packages: {INSTALL_HINT}") from exc
    return onnxruntime


def _load(path: Path) -> tuple[Artifact, LocalModel, Any, str]:
    """The artifact, the model to export, the scorer ``kvtool vfl score`` uses, and its name."""
    artifact = load_artifact(path, (LOCAL, SPLIT))
    if party_of(artifact) == "passive" or "active" not in schemas_of(artifact):  # both type-checked
        raise UserError(
            f"{path}: holds only the passive party's part of a two-party run; "
            "export the active party's artifact (local mode scores the active party's rows)"
        )
    if artifact.kind == SPLIT:
        return artifact, local_from(artifact), ServingLocal.of(split_from(artifact)), "split local branch"
    model = local_from(artifact)
    return artifact, model, ServingLocal.of(model), "student"


def _edge_table(schema: PartySchema, rows: int, seed: int = 0) -> pa.Table:
    """Synthetic rows that exercise the transform: typical, huge, NaN and infinite numbers;
    known, missing and unseen categories."""
    rng = np.random.default_rng(seed)
    columns: dict[str, pa.Array] = {}
    specials = np.array([np.nan, np.inf, -np.inf, 1e30, -1e30, 0.0])
    for name, mean, std in zip(schema.numeric, schema.mean, schema.std, strict=True):
        values = mean + std * rng.normal(size=rows) * rng.choice([0.1, 1.0, 10.0], size=rows)
        special = rng.random(rows) < 0.2
        values[special] = rng.choice(specials, size=int(special.sum()))
        columns[name] = pa.array(values, pa.float64())
    for name, vocab in zip(schema.categorical, schema.vocab, strict=True):
        pool = np.asarray([*vocab, "\u2063unseen"], dtype=object)
        values = pool[rng.integers(0, len(pool), size=rows)]
        columns[name] = pa.array(values, pa.string(), mask=rng.random(rows) < 0.2)
    return pa.table(columns) if columns else pa.table({"_": pa.nulls(rows)})


def _sample(table: pa.Table, rows: int) -> pa.Table:
    """Up to ``rows`` rows spread evenly over the table."""
    if table.num_rows <= rows:
        return table
    return table.take(pa.array(np.linspace(0, table.num_rows - 1, rows).round().astype(np.int64)))


def _verification_tables(config: ExportConfig, schema: PartySchema) -> dict[str, pa.Table]:
    """The rows to check on, by where they came from: a sample of the table (``--table``,
    else the demo test table if it fits the model), then synthetic edge cases."""
    tables = {}
    path = config.table
    if path is None:
        demo = embedded("active_test.csv")
        table = read_table(demo, "verification")
        path = demo if all(c in table.column_names for c in schema.columns) else None
    else:
        table = read_table(path, "verification")
        check_schema(table, schema, path, "verification")
    if path is not None:
        tables[str(path)] = _sample(table, config.verify_rows)
    tables["synthetic"] = _edge_table(schema, EDGE_ROWS)
    return tables


def _reference(scorer: Any, table: pa.Table, schema: PartySchema, path: str, id_col: str) -> np.ndarray:
    """Scores through ``kvtool vfl score``'s own path: encode, the model in slices, sigmoid."""
    num, cat = encode(table, schema, path, _ids(table, id_col), "active")
    logits = predict(lambda i: scorer(num[i], cat[i]), len(num), 4096)
    return torch.sigmoid(logits).numpy().astype(np.float64)


def export_graph(
    scorer: OnnxScorer, schema: PartySchema, opset: int = DEFAULT_OPSET
) -> tuple[bytes, list[str]]:
    """The ONNX graph of ``scorer`` (bytes) and its input names (``numeric`` and/or ``categorical``)."""
    names, example = [], []
    if schema.numeric:
        names.append("numeric")
        example.append(torch.zeros(2, len(schema.numeric)))
    if schema.categorical:
        names.append("categorical")
        example.append(torch.full((2, len(schema.categorical)), FIRST, dtype=torch.long))
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            scorer,
            tuple(example),
            buffer,
            dynamo=False,
            opset_version=opset,
            input_names=names,
            output_names=["score", "logit"],
            dynamic_axes={name: {0: "batch"} for name in [*names, "score", "logit"]},
        )
    return buffer.getvalue(), names


def _run(session: Any, names: list[str], numeric: np.ndarray, categorical: np.ndarray) -> np.ndarray:
    feeds = {"numeric": numeric, "categorical": categorical}
    return session.run(["score"], {name: feeds[name] for name in names})[0]


def _hashed(schema: PartySchema) -> dict[str, Any]:
    """Columns encoded by hashing instead of a vocabulary (index = 2 + bucket), if any."""
    buckets = getattr(schema, "hash_buckets", None) or [0] * len(schema.categorical)
    hashed = {name: b for name, b in zip(schema.categorical, buckets, strict=True) if b}
    if not hashed:
        return {}
    return {"columns": hashed, "bucket": "kedit_vfl.vfl.data.encoding.hashed_bucket(value, buckets)"}


def _sidecar(
    config: ExportConfig, artifact: Artifact, schema: PartySchema, names: list[str], check: dict[str, Any]
) -> dict[str, Any]:
    inputs = []
    if "numeric" in names:
        inputs.append(
            {
                "name": "numeric",
                "dtype": "float32",
                "shape": ["batch", len(schema.numeric)],
                "columns": schema.numeric,
                "missing": "NaN",
            }
        )
    if "categorical" in names:
        inputs.append(
            {
                "name": "categorical",
                "dtype": "int64",
                "shape": ["batch", len(schema.categorical)],
                "columns": schema.categorical,
            }
        )
    return {
        "format": "kvtool.onnx",
        "onnx": config.out_path.name,
        "inputs": inputs,
        "outputs": [
            {"name": "score", "dtype": "float32", "shape": ["batch"], "meaning": "sigmoid(logit)"},
            {"name": "logit", "dtype": "float32", "shape": ["batch"]},
        ],
        "categorical_index": {
            "rule": "position of the value (as text) in the column's sorted vocabulary + 2",
            "unseen": OOV,
            "missing": MISSING,
            "first": FIRST,
        },
        "vocabularies": dict(zip(schema.categorical, schema.vocab, strict=True)),
        "hash_buckets": _hashed(schema),
        "transform_in_graph": {
            "numeric": "asinh((x - mean) / std) in float64; NaN or infinite -> 0",
            "mean": schema.mean,
            "std": schema.std,
        },
        "artifact": {
            "path": str(artifact.path),
            "kind": artifact.kind,
            "sha256": artifact.sha256,
            "branch": "tower_a + local_head",
        },
        "opset": config.opset,
        "exporter": f"torch.onnx.export (TorchScript, dynamo=False), torch {torch.__version__}",
        "kvtool_version": __version__,
        "verification": check,
        "config": json.loads(json.dumps(dataclasses.asdict(config), default=str)),
    }


def export_onnx(config: ExportConfig, reporter: Reporter = SILENT) -> dict[str, Any]:
    """Export, verify against the local-mode scores, then write the ONNX file and its sidecar.

    Nothing is written unless onnxruntime reproduces the scores within 1e-5.
    """
    start = time.perf_counter()
    ort = _require_runtime()
    artifact, model, scorer, branch = _load(config.model_path)
    schema = schemas_of(artifact)["active"]
    with reporter.task("exporting to ONNX", total=None):
        graph, names = export_graph(OnnxScorer(model, schema).eval(), schema, config.opset)
    with reporter.task("checking onnxruntime against kvtool vfl score", total=None):
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        diffs, counts = [], {}
        for source, rows in _verification_tables(config, schema).items():
            expected = _reference(scorer, rows, schema, source, config.id_col)
            got = _run(session, names, *encode_for_onnx(rows, schema, source, config.id_col))
            diffs.append(float(np.max(np.abs(got.astype(np.float64) - expected))))
            counts[source] = rows.num_rows
    diff = max(diffs)
    table = next((s for s in counts if s != "synthetic"), None)
    check = {
        "rows": sum(counts.values()),
        "rows_from_table": counts.get(table, 0),
        "rows_synthetic": counts["synthetic"],
        "table": table,
        "max_abs_diff": diff,
        "tolerance": TOLERANCE,
    }
    if not diff < TOLERANCE:
        raise UserError(
            f"{config.model_path}: the ONNX graph's scores differ from kvtool vfl score's by {diff:.2e} "
            f"(tolerance {TOLERANCE:g}) on {check['rows']} rows; nothing was written (float32 inputs keep "
            "about 7 significant digits: a column of large values with a small spread loses precision)"
        )
    out, side = config.out_path, sidecar_path(config.out_path)
    meta = _sidecar(config, artifact, schema, names, check)
    atomic_write(out, lambda tmp: tmp.write_bytes(graph))
    try:
        atomic_write(side, lambda tmp: tmp.write_text(json.dumps(meta, indent=2) + "\n"))
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    return {
        "out": str(out),
        "sidecar": str(side),
        "model": str(config.model_path),
        "model_kind": artifact.kind,
        "branch": branch,
        "format": config.format,
        "inputs": names,
        "outputs": ["score", "logit"],
        "opset": config.opset,
        "bytes": len(graph),
        "rows_verified": check["rows"],
        "rows_from_table": check["rows_from_table"],
        "verify_table": table,
        "max_abs_diff": diff,
        "seconds": round(time.perf_counter() - start, 3),
    }
