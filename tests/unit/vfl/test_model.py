from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kedit_vfl.errors import UserError
from kedit_vfl.vfl.config import SplitConfig
from kedit_vfl.vfl.data.schema import PartySchema
from kedit_vfl.vfl.models.networks import LocalModel, ModelConfig, ServingLocal, ServingSplit, SplitModel
from kedit_vfl.vfl.models.store import LOCAL, SPLIT, load_local, load_split, save_vfl
from kedit_vfl.vfl.stages.train import StreamingMetrics, binary_metrics, intercept_shift

SCHEMAS = {
    "active": PartySchema(
        numeric=["a1", "a2"], mean=[0.0, 0.0], std=[1.0, 1.0], categorical=["c"], vocab=[["x"]]
    ),
    "passive": PartySchema(numeric=["b1"], mean=[0.0], std=[1.0]),
}
CONFIG = ModelConfig(hidden=16, out_dim=8, head_hidden=8, dropout=0.0)


def _batch(n: int = 6) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(0)
    return (
        torch.randn(n, 2),
        torch.randint(0, 3, (n, 1)),
        torch.randn(n, 1),
        torch.zeros(n, 0, dtype=torch.long),
    )


def test_local_branch_needs_no_passive_input() -> None:
    model = SplitModel(SCHEMAS, CONFIG).eval()
    a_num, a_cat, b_num, b_cat = _batch()
    local = model.local_logit(a_num, a_cat)
    local_again, full = model(a_num, a_cat, b_num, b_cat)
    assert torch.allclose(local, local_again)
    local.sum().backward()
    assert all(p.grad is None for p in model.tower_b.parameters())  # the publisher's tower is never touched
    assert all(p.grad is None for p in model.fed_head.parameters())
    assert torch.allclose(full, local)  # a fresh federated head adds nothing yet
    with torch.no_grad():
        for p in model.fed_head.parameters():
            p.normal_()
    assert not torch.allclose(model(a_num, a_cat, b_num, b_cat)[1], local)  # a trained one does


def test_partial_batch_matches_the_full_forward_on_overlapped_rows() -> None:
    model = SplitModel(SCHEMAS, CONFIG).eval()
    a_num, a_cat, b_num, b_cat = _batch()
    overlapped = torch.tensor([True, False, True, True, False, False])
    local, full = model.partial(a_num, a_cat, overlapped, model.tower_b(b_num[overlapped], b_cat[overlapped]))
    ref_local, ref_full = model(a_num, a_cat, b_num, b_cat)
    assert torch.allclose(local, ref_local) and torch.allclose(full, ref_full[overlapped])
    none = torch.zeros(6, dtype=torch.bool)
    local, full = model.partial(a_num, a_cat, none, torch.zeros(0, CONFIG.out_dim))
    assert full.shape == (0,) and torch.allclose(local, ref_local)


@pytest.mark.parametrize(
    "schema",
    [
        PartySchema(
            numeric=["a1", "a2", "a3"],
            mean=[0.0] * 3,
            std=[1.0] * 3,
            categorical=["c", "d"],
            vocab=[["x", "y"], ["u", "v", "w"]],
            hash_buckets=[0, 7],
        ),
        PartySchema(numeric=["a1", "a2"], mean=[0.0, 0.0], std=[1.0, 1.0]),  # numbers only
        PartySchema(categorical=["c", "d"], vocab=[["x"], ["u", "v"]]),  # categories only
    ],
    ids=["mixed", "numeric", "categorical"],
)
def test_serving_form_scores_like_the_modules(schema: PartySchema) -> None:
    torch.manual_seed(1)
    student = LocalModel(schema, ModelConfig(hidden=16, out_dim=8, head_hidden=8, dropout=0.3)).eval()
    split = SplitModel({"active": schema, "passive": SCHEMAS["passive"]}, CONFIG).eval()
    n = 50
    num = torch.randn(n, len(schema.numeric)) * 3
    cat = torch.zeros(n, len(schema.categorical), dtype=torch.int32)
    for j, cardinality in enumerate(schema.cardinalities):
        cat[:, j] = torch.randint(0, cardinality, (n,))
    with torch.no_grad():
        for model, expected in ((student, student(num, cat)), (split, split.local_logit(num, cat))):
            serving = ServingLocal.of(model)
            got = serving(num, cat)
            assert got.shape == (n,) and torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
            assert torch.allclose(
                serving(num, cat.long()), expected, atol=1e-5, rtol=1e-5
            )  # int64 indices too
            assert serving(num[:0], cat[:0]).shape == (0,)
        h_b = torch.randn(n, CONFIG.out_dim)
        serving_split = ServingSplit(split)
        for got, expected in zip(
            serving_split.with_embedding(num, cat, h_b), split.with_embedding(num, cat, h_b), strict=True
        ):
            assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
        assert torch.allclose(serving_split(num, cat), split.local_logit(num, cat), atol=1e-5)


def test_split_and_local_artifacts_round_trip(tmp_path: Path) -> None:
    model = SplitModel(SCHEMAS, CONFIG).eval()
    config = SplitConfig(
        active=tmp_path / "a.csv", passive=tmp_path / "b.csv", out=tmp_path / "split.safetensors"
    )
    save_vfl(SPLIT, {n: getattr(model, n) for n in ("tower_a", "tower_b", "local_head", "fed_head")},
             config, SCHEMAS, CONFIG, "test", {"val_auc": 0.5})  # fmt: skip
    loaded, artifact = load_split(tmp_path / "split.safetensors")
    batch = _batch()
    assert torch.allclose(loaded(*batch)[1], model(*batch)[1])
    assert artifact.extra["schema"]["passive"]["numeric"] == ["b1"] and artifact.extra["party"] == "both"

    student = LocalModel(SCHEMAS["active"], CONFIG).eval()
    config = SplitConfig(
        active=tmp_path / "a.csv", passive=tmp_path / "b.csv", out=tmp_path / "local.safetensors"
    )
    save_vfl(LOCAL, {"tower_a": student.tower_a, "local_head": student.local_head}, config,
             {"active": SCHEMAS["active"]}, CONFIG, "test", {})  # fmt: skip
    loaded_student, artifact = load_local(tmp_path / "local.safetensors")
    assert torch.allclose(loaded_student(*batch[:2]), student(*batch[:2]))
    assert artifact.party == "active" and "passive" not in artifact.extra["schema"]
    with pytest.raises(UserError, match="expected a vfl.split artifact, got vfl.local"):
        load_split(tmp_path / "local.safetensors")


def test_intercept_shift_calibrates_the_mean_prediction() -> None:
    torch.manual_seed(0)
    logits = torch.randn(1000) - 3.0
    labels = (torch.rand(1000) < 0.3).float()
    shift = intercept_shift(logits, labels)
    assert abs(torch.sigmoid(logits + shift).mean().item() - labels.mean().item()) < 1e-4


def test_binary_metrics() -> None:
    result = binary_metrics([0, 1, 0, 1], [0.1, 0.9, 0.2, 0.8])
    assert result["auc"] == 1.0 and 0 < result["logloss"] < 0.25
    assert binary_metrics([0, 0], [0.1, 0.2])["auc"] is None


@pytest.mark.parametrize("kind", ["float32", "ties", "signed", "float64"])
def test_binary_metrics_match_the_pairwise_definition(kind: str) -> None:
    """AUC = P(positive scored above negative) + P(tie) / 2, on both the sort-key path
    (float32 scores) and the rank path (scores float32 cannot hold)."""
    rng = np.random.default_rng(len(kind))
    n = 300
    scores = {
        "float32": rng.random(n).astype(np.float32),
        "ties": (rng.integers(0, 5, n) / 4).astype(np.float32),
        "signed": np.where(rng.random(n) < 0.2, np.float32(-0.0), rng.normal(size=n).astype(np.float32)),
        "float64": rng.random(n),
    }[kind]
    labels = (rng.random(n) < 0.4).astype(np.float32)
    pos, neg = scores[labels == 1][:, None], scores[labels == 0][None, :]
    pairwise = ((pos > neg) + 0.5 * (pos == neg)).mean()
    likelihood = np.where(labels == 1, scores, 1 - scores).astype(np.float64)
    result = binary_metrics(labels, scores)
    assert result["auc"] == pytest.approx(pairwise, abs=1e-12)
    if kind != "signed":
        expected = -np.log(np.clip(likelihood, 1e-7, None)).mean()
        assert result["logloss"] == pytest.approx(expected, rel=1e-5)


def test_streamed_metrics_equal_the_whole_table_metrics() -> None:
    rng = np.random.default_rng(3)
    scores = (rng.integers(0, 50, 1000) / 49).astype(np.float32)  # many ties across chunks
    labels = (rng.random(1000) < scores).astype(np.float32)
    metrics = StreamingMetrics()
    for part in np.array_split(np.arange(1000), [10, 11, 400, 400, 999]):  # an empty chunk too
        metrics.update(labels[part], scores[part])
    streamed, whole = metrics.result(), binary_metrics(labels, scores)
    assert streamed["auc"] == whole["auc"] and streamed["logloss"] == pytest.approx(
        whole["logloss"], rel=1e-12
    )
    assert StreamingMetrics().result() == {"auc": None, "logloss": None}
    one_class = StreamingMetrics()
    one_class.update(np.zeros(3), np.full(3, 0.5, np.float32))
    assert one_class.result()["auc"] is None
