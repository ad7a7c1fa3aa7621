"""Model selection with few labels: the linear probe, k-fold epoch choice, calibration."""

from __future__ import annotations

from pathlib import Path

import pyarrow.csv as pacsv
import torch
import torch.nn.functional as F
from torch import nn

from kedit_vfl.vfl.config import LocalConfig
from kedit_vfl.vfl.data.demo import DemoConfig, generate
from kedit_vfl.vfl.stages.distill import distill
from kedit_vfl.vfl.stages.probe import linear_probe
from kedit_vfl.vfl.stages.selection import fit_cross_validated, stratified_folds, too_few_to_select
from kedit_vfl.vfl.stages.train import intercept_shift


def test_too_few_to_select_counts_each_class() -> None:
    assert too_few_to_select(torch.tensor([1.0] * 10 + [0.0] * 10)) is None
    reason = too_few_to_select(torch.tensor([1.0] * 3 + [0.0] * 50))
    assert reason is not None and "3 positive and 50 negative" in reason
    assert too_few_to_select(torch.zeros(100)) is not None  # one class: nothing to choose with


def test_stratified_folds_deal_each_class_evenly() -> None:
    labels = torch.tensor([1.0] * 12 + [0.0] * 30)
    fold = stratified_folds(labels, torch.Generator().manual_seed(0))
    for k in range(5):
        assert int((labels[fold == k] == 1).sum()) in (2, 3)
        assert int((labels[fold == k] == 0).sum()) == 6


def test_linear_probe_finds_the_signal_the_offset_lacks_and_declines_noise() -> None:
    generator = torch.Generator().manual_seed(0)
    n = 400
    features = torch.randn(n, 6, generator=generator) * 3 + 1  # raw scale: the probe standardises
    offset = torch.randn(n, generator=generator) * 0.5
    logit = offset + 2.0 * (features[:, 2] - 1) / 3
    labels = (torch.rand(n, generator=generator) < torch.sigmoid(logit)).float()
    probe = linear_probe(features, offset, labels, generator)
    assert probe is not None and probe.cv_loss < probe.offset_loss
    assert int(probe.weight.abs().argmax()) == 2 and probe.weight[2] > 0
    fitted = offset + features @ probe.weight + probe.bias
    assert F.binary_cross_entropy_with_logits(fitted, labels) < F.binary_cross_entropy_with_logits(
        offset, labels
    )
    noise = torch.randn(n, 6, generator=generator)
    plain = (torch.rand(n, generator=generator) < torch.sigmoid(offset)).float()
    declined = linear_probe(noise, offset, plain, generator)
    assert declined is None or declined.strength >= 0.1  # noise: the strongest regularisers win
    assert linear_probe(features, offset, torch.tensor([1.0] * 3 + [0.0] * (n - 3)), generator) is None


def test_cross_validated_epochs_train_on_every_labelled_row() -> None:
    torch.manual_seed(0)
    x = torch.randn(120, 3)
    y = (x[:, 0] + 0.3 * torch.randn(120) > 0).float()
    model = nn.Linear(3, 1)

    def rows_loss(rows: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(model(x[rows]).squeeze(1), y[rows])

    def rows_val_loss(rows: torch.Tensor) -> float:
        with torch.no_grad():
            return rows_loss(rows).item()

    before = rows_val_loss(torch.arange(120))
    result = fit_cross_validated(
        model, lambda: torch.optim.Adam(model.parameters(), lr=0.05), rows_loss, rows_val_loss,
        torch.arange(120), y, epochs=20, batch_size=16, patience=5, min_epoch_rows=1,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert 1 <= result.best_epoch <= 20 and result.best["cv/folds"] == 5
    assert result.best["cv/loss"] < before  # out of fold, training beat the start
    assert rows_val_loss(torch.arange(120)) < before  # and the final model trained


def test_intercept_shift_matches_a_probability_target_without_overshooting() -> None:
    logits = torch.cat([torch.full((50,), -30.0), torch.full((50,), 30.0)])  # saturated scores
    shift = intercept_shift(logits, torch.full((100,), 0.2))
    assert abs(shift) < 100 and torch.sigmoid(logits + shift).mean().item() < 0.6


def test_train_local_cross_validates_when_validation_is_tiny(tmp_path: Path) -> None:
    tables = generate(DemoConfig(rows=800, seed=9, labelled=0.08))
    pacsv.write_csv(tables["active_train.csv"], tmp_path / "a.csv")
    warnings: list[str] = []

    class Recorder:
        def task(self, description, total):  # noqa: ANN001, ANN201
            from kedit_vfl.progress import SILENT

            return SILENT.task(description, total)

        def log(self, message: str) -> None:
            pass

        def warn(self, message: str) -> None:
            warnings.append(message)

    _, result = distill(
        LocalConfig(active=tmp_path / "a.csv", device="cpu", epochs=5, out=tmp_path / "own.safetensors"),
        Recorder(),
    )
    assert result["model_selection"] == "5-fold cross-validation" and result["cv_loss"] > 0
    assert any("cross-validation" in w for w in warnings)
    assert result["val_auc"] is None  # no hold-out was kept: no hold-out figure
