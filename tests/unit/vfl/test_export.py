"""ONNX export: the graph's transform and model against encode() and the torch model."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from kedit_vfl.errors import UserError  # noqa: E402
from kedit_vfl.vfl.data.encoding import encode  # noqa: E402
from kedit_vfl.vfl.data.schema import FIRST, MISSING, OOV, PartySchema  # noqa: E402
from kedit_vfl.vfl.models.networks import LocalModel, ModelConfig  # noqa: E402
from kedit_vfl.vfl.serving.export import ExportConfig, OnnxScorer, encode_for_onnx, export_graph  # noqa: E402

BOTH = PartySchema(
    numeric=["age", "spend"],
    mean=[40.0, 120.5],
    std=[12.0, 300.0],
    categorical=["city", "device"],
    vocab=[["lyon", "nice", "paris"], ["android", "ios"]],
)
NUMERIC_ONLY = PartySchema(numeric=["age", "spend"], mean=[40.0, 120.5], std=[12.0, 300.0])
CATEGORICAL_ONLY = PartySchema(categorical=["city"], vocab=[["lyon", "nice", "paris"]])
# A column with too many values for a vocabulary: index = 2 + a hash bucket.
HASHED = PartySchema(
    numeric=["age"],
    mean=[40.0],
    std=[12.0],
    categorical=["city"],
    vocab=[["lyon", "nice", "paris"]],
    hash_buckets=[7],
)
CONFIG = ModelConfig(emb_dim=4, hidden=16, out_dim=8, head_hidden=8, dropout=0.1)


def _table(schema: PartySchema) -> pa.Table:
    """Rows with NaN, empty, infinite and huge numbers, missing and unseen categories."""
    rng = np.random.default_rng(0)
    n = 200
    columns: dict[str, pa.Array] = {"id": pa.array([f"u{i}" for i in range(n)])}
    for name, mean, std in zip(schema.numeric, schema.mean, schema.std, strict=True):
        values = mean + std * rng.normal(size=n) * 3
        values[:4] = [np.nan, np.inf, -1e30, mean]
        columns[name] = pa.array(values, mask=np.arange(n) == 4)  # row 4: null (empty cell)
    for name, vocab in zip(schema.categorical, schema.vocab, strict=True):
        values = np.asarray([*vocab, "berlin"], dtype=object)[rng.integers(0, len(vocab) + 1, size=n)]
        columns[name] = pa.array(values, mask=np.arange(n) % 7 == 0)
    return pa.table(columns)


def _model(schema: PartySchema) -> LocalModel:
    torch.manual_seed(0)
    model = LocalModel(schema, CONFIG).eval()
    with torch.no_grad():  # a bias large enough that the scores spread over (0, 1)
        model.local_head.net[-1].bias.fill_(0.3)
    return model


def _session(graph: bytes) -> ort.InferenceSession:
    return ort.InferenceSession(graph, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize(
    "schema", [BOTH, NUMERIC_ONLY, CATEGORICAL_ONLY, HASHED], ids=["both", "numeric", "categorical", "hashed"]
)
def test_onnxruntime_matches_torch_on_encoded_rows(schema: PartySchema) -> None:
    table, model = _table(schema), _model(schema)
    ids = table["id"]
    num, cat = encode(table, schema, "t.csv", ids, "active")
    with torch.no_grad():
        expected = model(num, cat.long())  # (N,)
    graph, names = export_graph(OnnxScorer(model, schema).eval(), schema)
    assert names == [
        n for n, cols in (("numeric", schema.numeric), ("categorical", schema.categorical)) if cols
    ]
    numeric, categorical = encode_for_onnx(table, schema, "t.csv")
    feeds = {"numeric": numeric, "categorical": categorical}
    score, logit = _session(graph).run(["score", "logit"], {n: feeds[n] for n in names})
    assert score.shape == (table.num_rows,) and score.dtype == np.float32
    assert np.max(np.abs(logit - expected.numpy())) < 1e-5
    assert np.max(np.abs(score - torch.sigmoid(expected).numpy())) < 1e-5


def test_encode_for_onnx_keeps_raw_numbers_and_the_index_convention() -> None:
    table = _table(BOTH)
    numeric, categorical = encode_for_onnx(table, BOTH)
    assert numeric.dtype == np.float32 and categorical.dtype == np.int64
    assert numeric.shape == (200, 2) and categorical.shape == (200, 2)
    assert math.isnan(numeric[0, 0]) and math.isnan(numeric[4, 0])  # NaN and null both -> NaN
    assert numeric[1, 0] == np.inf and numeric[3, 1] == np.float32(120.5)
    city = table["city"].to_pylist()
    for row in range(20):
        value = city[row]
        want = MISSING if value is None else OOV if value == "berlin" else FIRST + BOTH.vocab[0].index(value)
        assert categorical[row, 0] == want


def test_graph_transform_is_encode_s_transform() -> None:
    table = _table(NUMERIC_ONLY)
    num, _ = encode(table, NUMERIC_ONLY, "t.csv", table["id"], "active")
    raw, _ = encode_for_onnx(table, NUMERIC_ONLY)
    scorer = OnnxScorer(_model(NUMERIC_ONLY), NUMERIC_ONLY)
    got = scorer.transform(torch.from_numpy(raw))
    assert torch.allclose(got, num, atol=1e-6)
    assert got[0].tolist()[0] == 0.0 and got[1].tolist()[0] == 0.0  # NaN and inf -> 0


def test_asinh_matches_numpy_across_magnitudes() -> None:
    x = torch.tensor(
        [-1e300, -1e30, -1e9, -3.0, -1e-12, 0.0, 1e-8, 0.5, 7.0, 1e8, 1e12, 1e300], dtype=torch.float64
    )
    np.testing.assert_allclose(OnnxScorer.asinh(x).numpy(), np.arcsinh(x.numpy()), rtol=1e-12, atol=1e-15)


def test_out_of_range_indices_score_as_unseen() -> None:
    model = _model(CATEGORICAL_ONLY)
    graph, _ = export_graph(OnnxScorer(model, CATEGORICAL_ONLY).eval(), CATEGORICAL_ONLY)
    weird = np.array([[-3], [99], [OOV]], dtype=np.int64)
    (score,) = _session(graph).run(["score"], {"categorical": weird})
    assert score[0] == score[1] == score[2]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"format": "tflite"}, "--format tflite"),
        ({"opset": 9}, "--opset 9"),
        ({"verify_rows": 0}, "--verify-rows 0"),
    ],
)
def test_config_validation(options: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        ExportConfig(**options)
