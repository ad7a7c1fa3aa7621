from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from kedit_vfl.errors import UserError
from kedit_vfl.vfl.channel.party import PassiveLink, PassiveParty, PassiveTraining, Protection, clip_rows
from kedit_vfl.vfl.data.encoding import Party
from kedit_vfl.vfl.data.schema import PartySchema
from kedit_vfl.vfl.models.networks import ActiveSplit, ModelConfig, Tower
from kedit_vfl.vfl.stages.checkpoint import CheckpointStore, TrainingState, latest_common
from kedit_vfl.vfl.stages.train import FlatAdamW, average_ranks

CONFIG = ModelConfig(hidden=8, out_dim=4, head_hidden=4, dropout=0.0)
SCHEMA_A = PartySchema(numeric=["a1", "a2"], mean=[0.0, 0.0], std=[1.0, 1.0])
SCHEMA_B = PartySchema(numeric=["b1", "b2", "b3"], mean=[0.0] * 3, std=[1.0] * 3)


def _passive(n: int = 10, protection: Protection = Protection(), lr: float = 0.1) -> PassiveParty:
    torch.manual_seed(1)
    rows = Party(
        pa.chunked_array([[str(i) for i in range(n)]]), torch.randn(n, 3), torch.zeros(n, 0, dtype=torch.long)
    )
    tower = Tower(SCHEMA_B, CONFIG)
    party = PassiveParty(rows, torch.arange(n).flip(0), tower, seed=0, protection=protection,
                         training=PassiveTraining((lr,)))  # fmt: skip
    party.phase(0)
    return party


def test_clip_rows_bounds_norms_and_keeps_small_rows() -> None:
    x = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]])
    clipped = clip_rows(x, 1.0)
    assert torch.allclose(clipped.norm(dim=1), torch.tensor([1.0, 0.5, 0.0]))
    assert torch.equal(clip_rows(x, 0.0), x)


def test_protection_refuses_negative_settings() -> None:
    with pytest.raises(UserError, match="--gradient-noise"):
        Protection(gradient_noise=-1.0)


def test_split_boundary_gives_the_gradients_of_one_joint_graph() -> None:
    """Backward on the active side, sent gradients, backward on the passive side: the
    passive tower's update equals the one a single autograd graph would make."""
    party = _passive()
    reference = Tower(SCHEMA_B, CONFIG)
    reference.load_state_dict(party.tower.state_dict())
    model = ActiveSplit({"active": SCHEMA_A}, CONFIG)
    a_num = torch.randn(5, 2)
    keys = torch.tensor([0, 3, 4, 7, 9])
    link = PassiveLink(party, Protection(), seed=0, device=torch.device("cpu"))
    _, full = model.with_embedding(a_num, torch.zeros(5, 0, dtype=torch.long), link.embed(keys, train=True))
    full.sum().backward()
    optimizer = FlatAdamW([{"params": list(reference.parameters())}], lr=0.1)
    rows = party.overlap_rows[keys]
    h = reference(party.num[rows], party.cat[rows])
    (model.fed_head(model.tower_a(a_num, torch.zeros(5, 0, dtype=torch.long)), h)).sum().backward()
    expected = [p.grad.clone() for p in reference.parameters()]
    link.step()
    optimizer.step()
    for got, want in zip(party.tower.parameters(), reference.parameters(), strict=True):
        assert torch.allclose(got, want, atol=1e-6)
    assert all(e is not None for e in expected)


class _Remote:
    """The party behind a stand-in for the wire: the link takes the two-process path."""

    def __init__(self, party: PassiveParty) -> None:
        self.party, self.width, self.seen = party, party.width, []

    def embed(self, keys: torch.Tensor, train: bool) -> torch.Tensor:
        return self.party.embed(keys, train)

    def step(self, grads: list[torch.Tensor]) -> None:
        self.seen.extend(grads)
        self.party.step(grads)


def test_gradient_protection_clips_each_rows_own_gradient() -> None:
    remote = _Remote(_passive())
    link = PassiveLink(remote, Protection(clip=0.01), seed=0, device=torch.device("cpu"))  # type: ignore[arg-type]
    h = link.embed(torch.arange(8), train=True)
    (100.0 * h.sum(dim=1)).mean().backward()  # each row's own gradient has norm 100 * 2
    link.step()
    per_row = remote.seen[0] * 8  # back to each row's own gradient
    assert torch.allclose(per_row.norm(dim=1), torch.full((8,), 0.01), atol=1e-6)


@pytest.mark.parametrize("protection", [Protection(), Protection(clip=0.5)])
def test_one_process_and_two_process_paths_make_the_same_update(protection: Protection) -> None:
    parties = [_passive(protection=protection), _passive(protection=protection)]
    links = [
        PassiveLink(parties[0], protection, seed=0, device=torch.device("cpu")),
        PassiveLink(_Remote(parties[1]), protection, seed=0, device=torch.device("cpu")),  # type: ignore[arg-type]
    ]
    weight = torch.randn(4)
    for link in links:
        for step in range(3):
            h = link.embed(torch.arange(step, step + 6), train=True)
            (h @ weight).pow(2).mean().backward()
            link.step()
    for a, b in zip(parties[0].tower.parameters(), parties[1].tower.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_embedding_noise_only_in_training_and_clip_always() -> None:
    party = _passive(protection=Protection(clip=0.05, embedding_noise=1.0))
    clean = party.embed(torch.arange(6), train=False)
    assert torch.all(clean.norm(dim=1) <= 0.05 + 1e-6)
    noisy = party.embed(torch.arange(6), train=True)
    assert (noisy - clean).abs().mean() > 0.3  # noise of std 1 on top of the clipped rows
    # Outside the agreed overlap: zeros when scoring (the same answer for "not a user of mine"
    # and "not agreed"), a refusal when training.
    mixed = party.embed(torch.tensor([10, 2, -1]), train=False)
    assert torch.equal(mixed[0], torch.zeros(mixed.shape[1])) and torch.equal(mixed[2], mixed[0])
    assert torch.allclose(mixed[1], clean[2])
    with pytest.raises(UserError, match="outside the agreed overlap"):
        party.embed(torch.tensor([10]), train=True)


def test_checkpoint_store_keeps_the_last_three_and_finds_the_common_one(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "c")
    for epoch in range(1, 6):
        store.save((0, epoch), {"epoch": epoch})
    assert store.tags() == [(0, 3), (0, 4), (0, 5)]
    assert store.load((0, 4)) == {"epoch": 4}
    assert latest_common(store.tags(), [(0, 2), (0, 3), (0, 4)]) == (0, 4)
    assert latest_common([(0, 1)], [(1, 1)]) is None
    store.clear()
    assert not (tmp_path / "c").exists()


def test_training_state_restores_weights_optimizer_and_generators(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "c")
    model = torch.nn.Linear(3, 1)
    optimizer = FlatAdamW([{"params": list(model.parameters())}], lr=0.1)
    generator = torch.Generator().manual_seed(5)
    state = TrainingState(store, {"g": generator})
    state.register("model", model)
    state.register("optimizer", optimizer)
    state.extra["soft"] = torch.ones(2)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    state.save((1, 2), {"epoch": 2})
    after = (model.weight.detach().clone(), torch.rand(3, generator=generator), torch.rand(3))
    fresh_model = torch.nn.Linear(3, 1)
    fresh_optimizer = FlatAdamW([{"params": list(fresh_model.parameters())}], lr=0.1)
    fresh_generator = torch.Generator()
    resumed = TrainingState(store, {"g": fresh_generator}, resume_from=(1, 2))
    assert torch.equal(resumed.extra["soft"], torch.ones(2)) and resumed.skip(0) and not resumed.skip(1)
    resumed.register("model", fresh_model)
    resumed.register("optimizer", fresh_optimizer)
    assert resumed.resume(0) is None and resumed.resume(1) == {"epoch": 2}
    assert torch.equal(fresh_model.weight, after[0]) and fresh_optimizer.steps == 1
    assert torch.equal(torch.rand(3, generator=fresh_generator), after[1])
    assert torch.equal(torch.rand(3), after[2])


def test_average_ranks_share_ties() -> None:
    assert np.allclose(average_ranks(np.array([0.3, 0.1, 0.3, 0.2])), [3.5, 1.0, 3.5, 2.0])


def test_a_party_that_never_trains_serves_the_towers_embeddings() -> None:
    torch.manual_seed(2)
    schema = PartySchema(numeric=["b1"], mean=[0.0], std=[1.0], categorical=["c"], vocab=[["x", "y"]])
    rows = Party(
        pa.chunked_array([[str(i) for i in range(8)]]), torch.randn(8, 1), torch.randint(0, 4, (8, 1))
    )
    tower = Tower(schema, CONFIG).eval()
    party = PassiveParty(rows, torch.arange(8).flip(0), tower, seed=0, protection=Protection(clip=0.5))
    assert party.serving is not None  # no training phases: the serving form
    with torch.no_grad():
        expected = clip_rows(tower(rows.num.flip(0), rows.cat.flip(0)), 0.5)
    assert torch.allclose(party.embed(torch.arange(8), train=False), expected, atol=1e-6)
    with torch.no_grad():
        tower.mlp[0].bias.add_(1.0)
        changed = clip_rows(tower(rows.num.flip(0), rows.cat.flip(0)), 0.5)
    assert not torch.allclose(changed, expected, atol=1e-3)
    party.load_state_dict(party.state_dict())  # weights loaded (a resume): the serving form follows them
    assert torch.allclose(party.embed(torch.arange(8), train=False), changed, atol=1e-6)
    assert _passive().serving is None  # a training party runs the modules
