from __future__ import annotations

from pathlib import Path

import pyarrow.csv as pacsv
import pytest
import torch
from torch import nn

from kedit_vfl.errors import UserError
from kedit_vfl.vfl.config import SplitConfig
from kedit_vfl.vfl.data.demo import DemoConfig, generate
from kedit_vfl.vfl.models.store import load_split
from kedit_vfl.vfl.stages.split import train_split
from kedit_vfl.vfl.stages.train import FlatAdamW


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(5, 3), nn.Flatten(), nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 1))


def _steps(net: nn.Sequential, optimizer, n: int = 5) -> None:
    generator = torch.Generator().manual_seed(1)
    for _ in range(n):
        x = torch.randint(5, (8, 2), generator=generator)
        loss = net(x).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def test_flat_adamw_matches_torch_adamw_with_two_learning_rates() -> None:
    ours, reference = _net(), _net()

    def groups(net: nn.Sequential) -> list[dict]:
        return [{"params": list(net[0].parameters()), "lr": 0.003}, {"params": list(net[2:].parameters())}]

    _steps(ours, FlatAdamW(groups(ours), lr=0.01, weight_decay=0.1))
    _steps(reference, torch.optim.AdamW(groups(reference), lr=0.01, weight_decay=0.1))
    for mine, theirs in zip(ours.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
    assert not torch.equal(ours[2].weight, _net()[2].weight)  # it did train


def test_flat_adamw_parameters_stay_views_through_load_state_dict() -> None:
    net = _net()
    optimizer = FlatAdamW([{"params": list(net.parameters())}], lr=0.01)
    saved = {k: v.clone() for k, v in net.state_dict().items()}
    _steps(net, optimizer, 2)
    net.load_state_dict(saved)  # what fit does to restore the best epoch
    assert torch.equal(optimizer.flat[: net[0].weight.numel()], net[0].weight.reshape(-1))
    _steps(net, optimizer, 1)  # and the optimizer still moves the module's weights
    assert not torch.equal(net[0].weight, saved["0.weight"])


def test_flat_adamw_rejects_a_repeated_parameter() -> None:
    net = _net()
    with pytest.raises(ValueError):
        FlatAdamW([{"params": [net[2].weight, net[2].weight]}], lr=0.01)


@pytest.fixture(scope="module")
def small_tables(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("vfl_self_train")
    tables = generate(DemoConfig(rows=1500, seed=5, labelled=0.6))
    pacsv.write_csv(tables["active_train.csv"], folder / "a.csv")
    pacsv.write_csv(tables["passive_train.csv"], folder / "b.csv")
    return folder / "a.csv", folder / "b.csv"


def test_self_training_round_uses_the_unlabelled_overlapped_rows(
    small_tables: tuple[Path, Path], tmp_path: Path
) -> None:
    active, passive = small_tables
    common = dict(active=active, passive=passive, epochs=3, device="cpu", seed=0)
    _, plain = train_split(SplitConfig(**common, self_train_weight=0.0, out=tmp_path / "plain.safetensors"))
    _, selfed = train_split(SplitConfig(**common, self_train_weight=1.0, out=tmp_path / "self.safetensors"))
    assert plain["self_train_rows"] == 0
    labelled = plain["rows_labelled_train"]
    # every overlapped row outside validation, labelled or not
    assert selfed["self_train_rows"] > 1.5 * selfed["rows_labelled_train_overlapped"]
    assert labelled > selfed["rows_labelled_train_overlapped"]
    a, _ = load_split(tmp_path / "plain.safetensors")
    b, _ = load_split(tmp_path / "self.safetensors")
    # the round either beat its start on validation (and changed the publisher's part) or
    # kept its start exactly (epoch 0 competes): never a worse model than it began with
    changed = not torch.equal(a.fed_head.net[1].weight, b.fed_head.net[1].weight)
    assert changed == (selfed["best_epoch"] > 0)
    assert changed == (not torch.equal(a.tower_b.mlp[0].weight, b.tower_b.mlp[0].weight))
    # the round leaves the local branch (what the student starts from) as the labels taught it
    for name in ("tower_a", "local_head"):
        for mine, theirs in zip(getattr(a, name).parameters(), getattr(b, name).parameters(), strict=True):
            assert torch.equal(mine, theirs)


def test_self_training_survives_batches_without_an_overlapped_row(
    small_tables: tuple[Path, Path], tmp_path: Path
) -> None:
    """Batches of one row: many hold only a labelled row the publisher lacks."""
    active, passive = small_tables
    config = SplitConfig(
        active=active, passive=passive, epochs=1, batch_size=1, device="cpu", out=tmp_path / "s.safetensors"
    )
    _, result = train_split(config)
    assert result["self_train_rows"] > 0
    split, _ = load_split(tmp_path / "s.safetensors")
    assert all(torch.isfinite(p).all() for p in split.parameters())


def test_self_train_weight_must_not_be_negative() -> None:
    with pytest.raises(UserError, match="self-train-weight"):
        SplitConfig(self_train_weight=-1.0)
