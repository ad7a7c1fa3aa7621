"""Stage 1, Matched Pair Detection: self-supervised pretraining on unlabelled overlapped rows.

For a batch of aligned rows the true pairs ``(h_A_i, h_B_i)`` are positives; each row
gets ``k`` negatives ``(h_A_i, h_B_pi(i))`` from ``k`` in-batch derangements ``pi``.
The towers learn what the two views of one user share.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from kedit_vfl.artifacts import Artifact
from kedit_vfl.errors import UserError
from kedit_vfl.progress import SILENT, Reporter
from kedit_vfl.seeding import resolve_device, seed_everything
from kedit_vfl.vfl.channel.party import PassiveTraining, Protection
from kedit_vfl.vfl.channel.session import ActiveSide, resume_tag_in_process
from kedit_vfl.vfl.config import MPDConfig
from kedit_vfl.vfl.data.encoding import holdout_mask
from kedit_vfl.vfl.models.networks import MatchingHead, Tower
from kedit_vfl.vfl.models.store import MPD
from kedit_vfl.vfl.stages.checkpoint import CheckpointStore, TrainingState
from kedit_vfl.vfl.stages.runner import Stage, Trained, run_stage
from kedit_vfl.vfl.stages.train import FlatAdamW, fit, loop_of


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
    head: MatchingHead,
    h_a: torch.Tensor,
    h_b: torch.Tensor,
    k: int,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """(B, 1 + k) matching scores for a batch of aligned rows' embeddings."""
    negatives = derangements(len(h_a), min(k, len(h_a) - 1), generator).to(h_a.device)
    return head(h_a, h_b, negatives)


def pretrain_mpd(config: MPDConfig, reporter: Reporter = SILENT) -> tuple[Artifact | None, dict[str, Any]]:
    """Pretrain both towers and the matching head on the overlapped rows; write ``vfl.mpd``.

    In a two-party run each side writes its own ``vfl.mpd``: the active party's tower and
    matching head, the passive party's tower.
    """
    generator = seed_everything(config.seed)
    device = resolve_device(config.device)
    stage = Stage(
        COMMAND, MPD, config, config.model, PassiveTraining((config.lr,), config.weight_decay), Protection()
    )

    def train(side: ActiveSide, store: CheckpointStore) -> Trained:
        return _train_active(config, side, store, generator, reporter, device)

    return run_stage(stage, train, reporter, device)


COMMAND = "pretrain-mpd"


def _train_active(
    config: MPDConfig,
    side: ActiveSide,
    store: CheckpointStore,
    generator: torch.Generator,
    reporter: Reporter,
    device: torch.device,
) -> Trained:
    """The active side's MPD training: the matching task on the overlapped rows."""
    n_overlap = len(side.rows_a)  # overlap position i -> its active row side.rows_a[i]
    if n_overlap < 4:
        raise UserError(
            f"{config.active}: only {n_overlap} ids overlap with the passive table; MPD needs at least 4"
        )
    valid = torch.from_numpy(
        holdout_mask(side.table.rows.ids.take(pa.array(side.rows_a.numpy())), config.val_fraction)
    )
    train_rows, val_rows = torch.nonzero(~valid).squeeze(1), torch.nonzero(valid).squeeze(1)
    if len(val_rows) < 2:
        val_rows = train_rows
    a_num, a_cat = side.table.rows.num.to(device), side.table.rows.cat.to(device)
    rows_a = side.rows_a.to(device)
    tower_a = Tower(side.table.schema, config.model).to(device)
    head = MatchingHead(config.model, config.mpd_temperature).to(device)
    modules = torch.nn.ModuleDict({"tower_a": tower_a, "matcher": head})
    optimizer = FlatAdamW(
        [{"params": list(modules.parameters())}], lr=config.lr, weight_decay=config.weight_decay
    )
    link = side.link
    resume_from = side.resume_from or resume_tag_in_process(config, store)
    if side.passive is not None and resume_from is not None:
        side.passive.resume(resume_from)
    state = TrainingState(store, {"sampling": generator}, resume_from)

    def scores_for(rows: torch.Tensor, gen: torch.Generator | None, train: bool) -> torch.Tensor:
        h_b = link.embed(rows, train)
        return pair_scores(
            head,
            tower_a(a_num[rows_a[rows.to(device)]], a_cat[rows_a[rows.to(device)]]),
            h_b,
            config.negatives,
            gen,
        )

    def step_loss(index: torch.Tensor) -> torch.Tensor:
        rows = train_rows[index]
        if len(rows) < 2:  # a last batch of one row has no negative
            rows = train_rows[torch.randint(len(train_rows), (2,), generator=generator)]
        return mpd_loss(scores_for(rows, generator, train=True), config.objective)

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        fixed = torch.Generator().manual_seed(config.seed)
        losses, hits = [], []
        for rows in val_rows.split(config.batch_size):
            if len(rows) < 2:
                continue
            scores = scores_for(rows, fixed, train=False)
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
        **loop_of(config),
        generator=generator,
        reporter=reporter,
        description="MPD pretraining",
        peer=link,
        state=state,
    )
    metrics = {
        "rows_overlapped": n_overlap,
        "rows_train": len(train_rows),
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "val_loss": result.best.get("val/loss"),
        "val_match_acc": result.best.get("val/match_acc"),
        "chance_match_acc": 1.0 / (1 + min(config.negatives, config.batch_size - 1)),
        "train_rows_per_s": round(result.rows_per_s, 1),
    }
    return Trained({"tower_a": tower_a, "matcher": head}, metrics)
