"""The label-leakage audit: it measures a leak where there is one, and nothing where not."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import torch

from kedit_vfl.artifacts import load_artifact
from kedit_vfl.errors import UserError
from kedit_vfl.vfl.config import AuditConfig, DistillConfig, MPDConfig, SplitConfig
from kedit_vfl.vfl.data.demo import DemoConfig, generate
from kedit_vfl.vfl.models.store import load_split
from kedit_vfl.vfl.privacy.audit import audit
from kedit_vfl.vfl.privacy.leakage import CalibratedNoise, GradientRecorder, attack_auc, leakage
from kedit_vfl.vfl.privacy.received import read_received, write_received
from kedit_vfl.vfl.stages.distill import distill
from kedit_vfl.vfl.stages.mpd import pretrain_mpd
from kedit_vfl.vfl.stages.split import defences_in_effect, randomised_response, train_split


def test_recorder_keeps_the_first_and_the_sum_of_each_rows_gradients() -> None:
    recorder = GradientRecorder(4, 2)
    recorder.add(torch.tensor([0, 2]), torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    recorder.add(torch.tensor([2, 3]), torch.tensor([[2.0, 2.0], [1.0, 1.0]]))
    # each row's own gradient: the batch mean's times the batch's rows
    assert torch.equal(recorder.first[2], torch.tensor([0.0, 2.0]))
    assert torch.equal(recorder.total[2], torch.tensor([4.0, 6.0]))
    assert recorder.seen.tolist() == [True, False, True, True] and recorder.observations == 4


def test_attacks_find_labels_in_separable_gradients_and_not_in_noise() -> None:
    generator = torch.Generator().manual_seed(0)
    labels = (torch.rand(300, generator=generator) < 0.1).float()
    direction = torch.randn(8, generator=generator)
    sent = (labels - 0.1).unsqueeze(1) * direction + 0.01 * torch.randn(300, 8, generator=generator)
    recorder = GradientRecorder(300, 8)
    recorder.add(torch.arange(300), sent / 300)
    leaked = leakage(recorder, labels)
    assert leaked["norm"] > 0.95 and leaked["direction"] > 0.95 and leaked["accumulated"] > 0.95
    quiet = GradientRecorder(300, 8)
    quiet.add(torch.arange(300), torch.randn(300, 8, generator=generator))
    assert leakage(quiet, labels)["accumulated"] < 0.65
    assert attack_auc(torch.rand(10), torch.zeros(10)) is None  # one class: undefined
    assert leakage(GradientRecorder(3, 2), labels[:3])["rows"] == 0  # nothing crossed


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("audit")
    tables = generate(DemoConfig(rows=2000, seed=11, labelled=0.5))
    pacsv.write_csv(tables["active_train.csv"], folder / "a.csv")
    pacsv.write_csv(tables["passive_train.csv"], folder / "b.csv")
    return folder / "a.csv", folder / "b.csv"


def test_the_audit_reproduces_the_leak_of_undefended_split_training(
    demo: tuple[Path, Path], tmp_path: Path
) -> None:
    active, passive = demo
    config = SplitConfig(
        active=active, passive=passive, device="cpu", epochs=5, audit=True, local_first=False,
        aux_weight=0.0, self_train_weight=0.0, freeze_passive=False, out=tmp_path / "v.safetensors",
    )  # fmt: skip
    _, result = train_split(config)
    leaked = result["label_leakage"]
    assert leaked["rows"] == result["rows_labelled_train_overlapped"]
    assert leaked["accumulated"] >= 0.95  # the literature's leak, measured
    _, plain = train_split(SplitConfig(active=active, passive=passive, device="cpu", epochs=5,
                                       local_first=False, out=tmp_path / "p.safetensors"))  # fmt: skip
    assert "label_leakage" not in plain


def test_the_audit_needs_one_process() -> None:
    with pytest.raises(UserError, match="--audit runs in one process"):
        SplitConfig(audit=True, party="active", rendezvous="tcp://127.0.0.1:29999", insecure=True)


def test_randomised_response_flips_the_chosen_rows_at_its_rate() -> None:
    labels = torch.tensor([0.0, 1.0] * 5000 + [float("nan")] * 10)
    where = torch.ones(len(labels), dtype=torch.bool)
    where[:2000] = False
    assert randomised_response(labels, where, 0.0, 0) is labels  # off
    noisy = randomised_response(labels, where, 1.0, 0)
    assert torch.equal(noisy[:2000], labels[:2000])  # only where asked
    assert torch.isnan(noisy[-10:]).all()  # unlabelled rows stay unlabelled
    rate = float((noisy[2000:10000] != labels[2000:10000]).float().mean())
    assert abs(rate - 1 / (1 + torch.e)) < 0.02
    again = randomised_response(labels, where, 1.0, 0)
    assert torch.equal(torch.nan_to_num(noisy, nan=-1.0), torch.nan_to_num(again, nan=-1.0))  # seeded


def test_defences_bound_what_the_audit_finds(demo: tuple[Path, Path], tmp_path: Path) -> None:
    active, passive = demo
    common = dict(active=active, passive=passive, device="cpu", epochs=5)
    mpd = tmp_path / "m.safetensors"
    pretrain_mpd(MPDConfig(**common, out=mpd))
    base = dict(common, init=mpd, audit=True, local_first=False)  # joint: gradients cross every step
    _, frozen = train_split(SplitConfig(**base, freeze_passive=True, out=tmp_path / "f.safetensors"))
    assert frozen["label_leakage"]["rows"] == 0 and frozen["passive_frozen"]  # nothing crossed
    assert frozen["label_leakage"]["gradients"] == 0
    defence = frozen["defence"]  # the same run without the defence, for its price
    assert defence["in_effect"] == "frozen publisher tower" and defence["leak_undefended"] >= 0.9
    assert defence["val_auc_cost"] == pytest.approx(1 - frozen["val_auc"] / defence["val_auc_undefended"])
    _, student = distill(DistillConfig(**common, teacher=tmp_path / "f.safetensors", audit=True,
                                       out=tmp_path / "s.safetensors"))  # fmt: skip
    assert student["label_leakage"]["gradients"] == 0  # distillation only asks for embeddings
    assert student["teacher_label_leakage"] == frozen["label_leakage"]
    model, _ = load_split(tmp_path / "f.safetensors")
    pretrained = load_artifact(mpd, "vfl.mpd")
    for name, value in model.tower_b.state_dict().items():
        assert torch.equal(value, pretrained.tensors[f"tower_b.{name}"])  # held as MPD left it
    _, noisy = train_split(
        SplitConfig(**base, freeze_passive=False, label_epsilon=0.4, out=tmp_path / "n.safetensors")
    )
    assert noisy["label_epsilon"] == 0.4
    assert noisy["label_leakage"]["accumulated"] < 0.8  # the randomised labels bound the attack


def test_defence_options_are_checked() -> None:
    assert SplitConfig().freeze_passive  # the default: no label gradient crosses
    with pytest.raises(UserError, match="add --train-passive"):
        SplitConfig(mpd_weight=0.1, init=Path("m.safetensors"))
    with pytest.raises(UserError, match="--label-epsilon -1"):
        SplitConfig(label_epsilon=-1.0)


def test_calibrated_noise_clips_at_the_observed_quantile_and_scales_for_the_run() -> None:
    own = torch.cat([torch.full((50, 4), 0.01), torch.full((50, 4), 1.0)])  # norms 0.02 and 2.0
    quiet = CalibratedNoise(quantile=0.5, multiplier=0.0, observations=100, seed=0)
    clipped = quiet(own)
    assert quiet.clip == pytest.approx(float(torch.quantile(own.norm(dim=1), 0.5)))
    assert float(clipped.norm(dim=1).max()) <= quiet.clip + 1e-6  # large gradients bound, small kept
    assert torch.allclose(clipped[:50], own[:50])  # below the clip: untouched
    noisy = CalibratedNoise(quantile=0.5, multiplier=1.0, observations=100, seed=0)
    out = noisy(own)
    assert noisy.noise_std == pytest.approx(noisy.clip * 10.0)  # multiplier x clip x sqrt(100)
    assert float((out - quiet(own)).std()) == pytest.approx(noisy.noise_std, rel=0.2)


def _record(path: Path, gradients: torch.Tensor, ids: list[str]) -> None:
    recorder = GradientRecorder(len(ids), gradients.shape[1])
    recorder.add(torch.arange(len(ids)), gradients / len(ids))
    write_received(path, recorder, pa.chunked_array([pa.array(ids)]), {"run_id": "r"})


def test_the_publishers_audit_reads_its_record_and_scores_the_attacks(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(1)
    labels = (torch.rand(400, generator=generator) < 0.2).float()
    leaky = (labels - 0.2).unsqueeze(1) * torch.randn(16, generator=generator)
    ids = [f"u{i}" for i in range(400)]
    _record(tmp_path / "leaky.parquet", leaky + 0.01 * torch.randn(400, 16, generator=generator), ids)
    _record(tmp_path / "noise.parquet", torch.randn(400, 16, generator=generator), ids)
    back = read_received(tmp_path / "leaky.parquet")
    assert back.ids == ids and back.gradients.tolist() == [1] * 400 and back.meta["run_id"] == "r"
    pacsv.write_csv(pa.table({"id": ids[:300], "y": labels[:300].numpy()}), tmp_path / "labels.csv")
    leaked = audit(AuditConfig(record=tmp_path / "leaky.parquet", labels=tmp_path / "labels.csv",
                               scores=tmp_path / "scores.csv"))  # fmt: skip
    assert leaked["rows_labelled"] == 300 and leaked["attack_auc"]["accumulated"] > 0.95
    assert leaked["concentration"] > 0.9 > leaked["concentration_of_noise"]
    scores = pacsv.read_csv(tmp_path / "scores.csv")
    assert scores.num_rows == 400 and "guessed_rare_class" in scores.column_names
    quiet = audit(AuditConfig(record=tmp_path / "noise.parquet", labels=tmp_path / "labels.csv"))
    assert (
        quiet["attack_auc"]["accumulated"] < 0.65
        and "look like noise" in audit(AuditConfig(record=tmp_path / "noise.parquet"))["verdict"]
    )


def test_the_audit_refuses_what_is_not_a_record(tmp_path: Path) -> None:
    pacsv.write_csv(pa.table({"id": ["a"]}), tmp_path / "table.csv")
    with pytest.raises(UserError, match="not a Parquet file"):
        read_received(tmp_path / "table.csv")
    pq.write_table(pa.table({"id": ["a"]}), tmp_path / "plain.parquet")
    with pytest.raises(UserError, match="not a record of received gradients"):
        read_received(tmp_path / "plain.parquet")
    _record(tmp_path / "nan.parquet", torch.full((2, 4), float("nan")), ["a", "b"])
    with pytest.raises(UserError, match="NaN or infinite"):
        read_received(tmp_path / "nan.parquet")
    with pytest.raises(UserError, match="no such file"):
        read_received(tmp_path / "missing.parquet")
    _record(tmp_path / "ok.parquet", torch.ones(2, 4), ["a", "b"])
    pacsv.write_csv(pa.table({"id": ["a"], "y": [3]}), tmp_path / "bad_labels.csv")
    with pytest.raises(UserError, match="other than 0 and 1"):
        audit(AuditConfig(record=tmp_path / "ok.parquet", labels=tmp_path / "bad_labels.csv"))


def test_the_defences_in_effect_are_named_as_they_apply() -> None:
    frozen = SplitConfig(init=Path("m.safetensors"), noise_multiplier=1.0)
    assert defences_in_effect(frozen) == ["frozen publisher tower"]  # no gradient for noise to touch
    trained = SplitConfig(freeze_passive=False, label_epsilon=1.0, noise_multiplier=0.5)
    assert defences_in_effect(trained) == ["randomised response, epsilon 1", "calibrated gradient noise x0.5"]
    assert defences_in_effect(SplitConfig(freeze_passive=False)) == []
