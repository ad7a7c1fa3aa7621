from __future__ import annotations

import pytest
import torch

from kedit_vfl.vfl.data.schema import PartySchema
from kedit_vfl.vfl.models.networks import MatchingHead, ModelConfig, Tower
from kedit_vfl.vfl.stages.mpd import derangements, mpd_loss, pair_scores


@pytest.mark.parametrize(("n", "k"), [(2, 1), (5, 4), (64, 16), (513, 8)])
def test_negatives_are_derangements_and_distinct_per_row(n: int, k: int) -> None:
    negatives = derangements(n, k, torch.Generator().manual_seed(n))
    assert negatives.shape == (k, n)
    rows = torch.arange(n)
    for pi in negatives:
        assert torch.equal(pi.sort().values, rows)  # a permutation
        assert not torch.any(pi == rows)  # with no fixed point
    # no row gets the same negative twice
    assert all(len(set(col.tolist())) == k for col in negatives.T)


def test_derangements_need_room() -> None:
    with pytest.raises(ValueError):
        derangements(1, 1)
    with pytest.raises(ValueError):
        derangements(4, 4)


def test_derangements_are_seeded() -> None:
    a = derangements(50, 3, torch.Generator().manual_seed(7))
    b = derangements(50, 3, torch.Generator().manual_seed(7))
    c = derangements(50, 3, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("objective", ["infonce", "bce"])
def test_mpd_loss_prefers_true_pairs(objective: str) -> None:
    good = torch.tensor([[5.0, -5.0, -5.0]]).repeat(4, 1)
    bad = torch.tensor([[-5.0, 5.0, 5.0]]).repeat(4, 1)
    assert mpd_loss(good, objective) < 0.05 < mpd_loss(bad, objective)


def test_pair_scores_shape_and_learning_signal() -> None:
    torch.manual_seed(0)
    schema_a = PartySchema(numeric=["a"], mean=[0.0], std=[1.0], categorical=["c"], vocab=[["x", "y"]])
    schema_b = PartySchema(numeric=["b1", "b2"], mean=[0.0, 0.0], std=[1.0, 1.0])
    config = ModelConfig(hidden=16, out_dim=8, head_hidden=8, dropout=0.0)
    tower_a, tower_b, head = Tower(schema_a, config), Tower(schema_b, config), MatchingHead(config, 0.2)
    shared = torch.randn(32, 1)
    a = (shared, torch.randint(0, 4, (32, 1)))
    b = (torch.cat([shared, -shared], dim=1), torch.zeros(32, 0, dtype=torch.long))
    params = [*tower_a.parameters(), *tower_b.parameters(), *head.parameters()]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    losses = []
    for step in range(60):
        scores = pair_scores(head, tower_a(*a), tower_b(*b), 4, torch.Generator().manual_seed(step))
        assert scores.shape == (32, 5)
        loss = mpd_loss(scores, "infonce")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]  # the views share a factor, so matching is learnable
