"""Stage 1, Matched Pair Detection: self-supervised pretraining on unlabelled overlapped rows.

For a batch of aligned rows the true pairs ``(h_A_i, h_B_i)`` are positives; each row
gets ``k`` negatives ``(h_A_i, h_B_pi(i))`` from ``k`` in-batch derangements ``pi``.
The towers learn what the two views of one user share.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from kedit_vfl.artifacts import Artifact, data_fingerprint
from kedit_vfl.errors import UserError
from kedit_vfl.progress import SILENT, Reporter
from kedit_vfl.seeding import resolve_device, seed_everything
from kedit_vfl.vfl.config import MPDConfig
from kedit_vfl.vfl.data import holdout_mask, load_two_party
from kedit_vfl.vfl.model import MatchingHead, Tower
from kedit_vfl.vfl.store import MPD, save_vfl
from kedit_vfl.vfl.train import fit


def derangements(n: int, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``k`` derangements of ``range(n)`` that also differ from each other at every position.

    Arrange the rows in a random cycle and pair each with the row ``s`` places further
    on, for ``k`` distinct shifts ``s`` in ``1..n-1``: no row meets itself, no pair repeats.
    Returns (k, n).
    """
    if n < 2 or not 1 <= k < n:
        raise ValueError(f"need 1 <= k < n for derangements, got n={n}, k={k}")
    order = torch.randperm(n, generator=generator)
    shifts = torch.randperm(n - 1, generator=generator)[:k] + 1  # (k,)
    position = torch.empty(n, dtype=torch.long)
    position[order] = torch.arange(n)
    return order[(position[None, :] + shifts[:, None]) % n]  # (k, n)


def mpd_loss(scores: torch.Tensor, objective: str) -> torch.Tensor:
    """Loss for (B, 1 + k) pair scores whose column 0 is the true pair.

    ``bce``: each pair classified alone (positives weighted k times, to balance);
    ``infonce``: a softmax over the true pair and its k negatives.
    """
    if objective == "infonce":
        return F.cross_entropy(scores, torch.zeros(len(scores), dtype=torch.long, device=scores.device))
    k = scores.shape[1] - 1
    targets = torch.zeros_like(scores)
    targets[:, 0] = 1.0
    weights = torch.ones_like(scores)
    weights[:, 0] = float(k)
    return F.binary_cross_entropy_with_logits(scores, targets, weight=weights) * (1 + k) / (2 * k)


def pair_scores(
    tower_a: Tower,
    tower_b: Tower,
    head: MatchingHead,
    a: tuple[torch.Tensor, torch.Tensor],
    b: tuple[torch.Tensor, torch.Tensor],
    k: int,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """(B, 1 + k) matching scores for a batch of aligned rows."""
    negatives = derangements(len(a[0]), min(k, len(a[0]) - 1), generator).to(a[0].device)
    return head(tower_a(*a), tower_b(*b), negatives)


def pretrain_mpd(config: MPDConfig, reporter: Reporter = SILENT) -> tuple[Artifact, dict[str, Any]]:
    """Pretrain both towers and the matching head on the overlapped rows; write ``vfl.mpd``."""
    generator = seed_everything(config.seed)
    device = resolve_device(config.device)
    data = load_two_party(
        config.active,
        config.passive,
        config.id_col,
        config.label_col,
        config.features_active,
        config.features_passive,
        config.categorical,
        require_labels=False,
    )
    assert data.passive is not None
    a = data.active.take(data.rows_a)
    if len(a) < 4:
        raise UserError(
            f"{config.active}: only {len(a)} ids overlap with {config.passive}; MPD needs at least 4"
        )
    valid = torch.from_numpy(holdout_mask(a.ids, config.val_fraction))
    train_rows, val_rows = torch.nonzero(~valid).squeeze(1), torch.nonzero(valid).squeeze(1)
    if len(val_rows) < 2:
        val_rows = train_rows
    tensors = [t.to(device) for t in (a.num, a.cat, data.passive.num, data.passive.cat)]

    tower_a = Tower(data.schemas["active"], config.model).to(device)
    tower_b = Tower(data.schemas["passive"], config.model).to(device)
    head = MatchingHead(config.model, config.mpd_temperature).to(device)
    modules = torch.nn.ModuleDict({"tower_a": tower_a, "tower_b": tower_b, "matcher": head})
    optimizer = torch.optim.AdamW(modules.parameters(), lr=config.lr, weight_decay=config.weight_decay)

    def scores_for(rows: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        a_num, a_cat, b_num, b_cat = (t[rows.to(device)] for t in tensors)
        return pair_scores(tower_a, tower_b, head, (a_num, a_cat), (b_num, b_cat), config.negatives, gen)

    def step_loss(index: torch.Tensor) -> torch.Tensor:
        rows = train_rows[index]
        if len(rows) < 2:  # a last batch of one row has no negative
            rows = train_rows[torch.randint(len(train_rows), (2,), generator=generator)]
        return mpd_loss(scores_for(rows, generator), config.objective)

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        fixed = torch.Generator().manual_seed(config.seed)
        losses, hits = [], []
        for rows in val_rows.split(config.batch_size):
            if len(rows) < 2:
                continue
            scores = scores_for(rows, fixed)
            losses.append(mpd_loss(scores, config.objective).item() * len(rows))
            hits.append((scores.argmax(1) == 0).float().sum().item())
        n = sum(len(r) for r in val_rows.split(config.batch_size) if len(r) >= 2)
        return {"val/loss": float(np.sum(losses) / n), "val/match_acc": float(np.sum(hits) / n)}

    result = fit(
        modules,
        optimizer,
        step_loss,
        len(train_rows),
        evaluate,
        epochs=config.epochs,
        batch_size=config.batch_size,
        patience=config.patience,
        generator=generator,
        reporter=reporter,
        description="MPD pretraining",
    )
    metrics = {
        "rows_overlapped": len(a),
        "rows_train": len(train_rows),
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "val_loss": result.best.get("val/loss"),
        "val_match_acc": result.best.get("val/match_acc"),
        "chance_match_acc": 1.0 / (1 + min(config.negatives, config.batch_size - 1)),
    }
    artifact = save_vfl(
        MPD,
        {"tower_a": tower_a, "tower_b": tower_b, "matcher": head},
        config,
        data.schemas,
        config.model,
        "vfl pretrain-mpd",
        metrics,
        data=data_fingerprint([config.active, config.passive]),
    )
    return artifact, {"out": str(config.out), "kind": MPD, **metrics}
