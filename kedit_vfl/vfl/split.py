"""Stage 2, split training: the local + federated model on the labelled overlapped rows.

Loss: BCE on the full logit over the labelled overlapped rows, plus ``aux_weight`` x
BCE on the local branch alone over ALL the active party's labelled rows (the local
branch needs nothing from the publisher, so the advertiser's own labels on rows the
publisher lacks train it too, and the federated branch learns only what the
publisher's features add), plus, optionally, ``mpd_weight`` x
the MPD loss on batches of all overlapped rows (labelled or not), which keeps the
towers anchored to what the unlabelled pairs taught them while the few labels pull.

Then, with ``self_train_weight`` > 0, one self-training round: the model's own
federated predictions on the unlabelled overlapped rows become soft targets for the
publisher's tower and the federated head (see ``self_train_round``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from kedit_vfl.artifacts import Artifact, data_fingerprint, load_artifact
from kedit_vfl.errors import UserError
from kedit_vfl.progress import SILENT, Reporter
from kedit_vfl.seeding import resolve_device, seed_everything
from kedit_vfl.vfl.config import SplitConfig
from kedit_vfl.vfl.data import holdout_mask, load_two_party
from kedit_vfl.vfl.model import MatchingHead, SplitModel, load_prefixed
from kedit_vfl.vfl.mpd import mpd_loss, pair_scores
from kedit_vfl.vfl.store import MPD, SPLIT, model_config_of, save_vfl, schemas_of
from kedit_vfl.vfl.train import (
    FitResult,
    FlatAdamW,
    base_rate_logit,
    binary_metrics,
    fit,
    intercept_shift,
    shift_bias,
)


def labelled_split(labels: torch.Tensor, valid: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Training and validation row indices among the labelled rows (validation keyed by id)."""
    labelled = ~torch.isnan(labels)
    valid_t = torch.from_numpy(valid)
    train = torch.nonzero(labelled & ~valid_t).squeeze(1)
    val = torch.nonzero(labelled & valid_t).squeeze(1)
    return train, val


def train_split(config: SplitConfig, reporter: Reporter = SILENT) -> tuple[Artifact, dict[str, Any]]:
    """Train the split model (towers from MPD or from scratch); write ``vfl.split``."""
    generator = seed_everything(config.seed)
    device = resolve_device(config.device)
    init = load_artifact(config.init, MPD) if config.init is not None else None
    model_config = model_config_of(init) if init is not None else config.model
    if init is not None and (config.features_active or config.features_passive or config.categorical):
        reporter.warn("the feature columns and their transform come from --init; column options are ignored")
    data = load_two_party(
        config.active,
        config.passive,
        config.id_col,
        config.label_col,
        config.features_active,
        config.features_passive,
        config.categorical,
        schemas=schemas_of(init) if init is not None else None,
    )
    assert data.passive is not None and data.labels is not None
    n_active, n_overlap = len(data.active), len(data.rows_a)
    b_row = torch.full((n_active,), -1, dtype=torch.long)  # active row -> its passive row, -1 if none
    b_row[data.rows_a] = torch.arange(n_overlap)
    usable = data.labels.clone()
    if config.aux_weight == 0:  # no local loss: only the labelled overlapped rows teach anything
        usable[b_row < 0] = float("nan")
    train_rows, val_rows = labelled_split(usable, holdout_mask(data.active.ids, config.val_fraction))
    if int((b_row[train_rows] >= 0).sum()) < 2:
        raise UserError(
            f"{config.active}: fewer than 2 labelled rows overlap with {config.passive}; "
            f"train-split needs labels (column '{config.label_col}') on overlapped rows"
        )
    if len(val_rows) == 0 or int((b_row[val_rows] >= 0).sum()) == 0:
        reporter.warn("no labelled overlapped row left for validation; validating on training rows")
        val_rows = train_rows
    a_num, a_cat = data.active.num.to(device), data.active.cat.to(device)
    b_num, b_cat = data.passive.num.to(device), data.passive.cat.to(device)
    y, b_row = data.labels.to(device), b_row.to(device)
    rows_a = data.rows_a.to(device)

    model = SplitModel(data.schemas, model_config).to(device)
    matcher = None
    if init is not None:
        load_prefixed(model.tower_a, init.tensors, "tower_a")
        load_prefixed(model.tower_b, init.tensors, "tower_b")
        if config.mpd_weight > 0:
            matcher = MatchingHead(model_config, init.config.get("mpd_temperature", 0.2)).to(device)
            load_prefixed(matcher, init.tensors, "matcher")
    shift_bias(model.local_head, base_rate_logit(data.labels[train_rows]))  # start at the base rate
    towers = [*model.tower_a.parameters(), *model.tower_b.parameters()]
    heads = [*model.local_head.parameters(), *model.fed_head.parameters()]
    scale = config.init_lr_scale if init is not None else 1.0
    groups = [{"params": towers + heads, "lr": config.lr}]
    if scale != 1.0:
        groups = [{"params": towers, "lr": config.lr * scale}, {"params": heads, "lr": config.lr}]
    if matcher is not None:
        groups.append({"params": list(matcher.parameters()), "lr": config.lr * scale})
    optimizer = FlatAdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    negatives = init.config.get("negatives", 16) if init is not None else 0
    objective = init.config.get("objective", "infonce") if init is not None else "infonce"

    def logits(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Local logits for ``rows`` (B,), full logits for their overlapped ones (B_ov,), the mask."""
        partner = b_row[rows]
        overlapped = partner >= 0
        if bool(overlapped.all()):  # the common case: no masking needed
            local, full = model(a_num[rows], a_cat[rows], b_num[partner], b_cat[partner])
            return local, full, overlapped
        partner = partner[overlapped]
        local, full = model.partial(a_num[rows], a_cat[rows], overlapped, b_num[partner], b_cat[partner])
        return local, full, overlapped

    def loss_of(rows: torch.Tensor) -> torch.Tensor:
        local, full, overlapped = logits(rows)
        target = y[rows]
        full_target = target if len(full) == len(target) else target[overlapped]
        loss = F.binary_cross_entropy_with_logits(full, full_target) if len(full) else full.sum()
        if config.aux_weight > 0:
            loss = loss + config.aux_weight * F.binary_cross_entropy_with_logits(local, target)
        return loss

    def step_loss(index: torch.Tensor) -> torch.Tensor:
        loss = loss_of(train_rows[index].to(device))
        if matcher is not None:
            pairs = torch.randint(n_overlap, (config.batch_size,), generator=generator).to(device)
            a_rows = rows_a[pairs]
            scores = pair_scores(
                model.tower_a,
                model.tower_b,
                matcher,
                (a_num[a_rows], a_cat[a_rows]),
                (b_num[pairs], b_cat[pairs]),
                negatives,
                generator,
            )
            loss = loss + config.mpd_weight * mpd_loss(scores, objective)
        return loss

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        local, full, overlapped = logits(val_rows.to(device))
        local, full, target = local.cpu(), full.cpu(), data.labels[val_rows]
        full_target = target[overlapped.cpu()]
        full_loss = F.binary_cross_entropy_with_logits(full, full_target).item()
        local_loss = F.binary_cross_entropy_with_logits(local, target).item()
        return {
            "val/loss": full_loss + config.aux_weight * local_loss,
            "val/auc": binary_metrics(full_target.numpy(), torch.sigmoid(full).numpy())["auc"] or 0.0,
            "val/local_auc": binary_metrics(target.numpy(), torch.sigmoid(local).numpy())["auc"] or 0.0,
        }

    result = fit(
        model,
        optimizer,
        step_loss,
        len(train_rows),
        evaluate,
        epochs=config.epochs,
        batch_size=config.batch_size,
        patience=config.patience,
        generator=generator,
        reporter=reporter,
        description="split training",
    )
    speed, self_train_rows = result.rows_per_s, 0
    if config.self_train_weight > 0:
        args = (config, model, logits, y, b_row, train_rows, val_rows, evaluate, generator, reporter)
        result, self_train_rows = self_train_round(*args)
    with torch.no_grad():  # calibrate both branches' intercepts on their training rows
        rows = train_rows.to(device)
        local, full, overlapped = logits(rows)
        local_shift = intercept_shift(local, y[rows]) if config.aux_weight > 0 else 0.0
        full_shift = intercept_shift(full, y[rows][overlapped])
    shift_bias(model.local_head, local_shift)
    shift_bias(model.fed_head, full_shift - local_shift)
    metrics = {
        "rows_overlapped": n_overlap,
        "rows_labelled_train": len(train_rows),
        "rows_labelled_train_overlapped": int((b_row[train_rows.to(device)] >= 0).sum()),
        "rows_labelled_val": len(val_rows),
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "val_auc": result.best.get("val/auc"),
        "val_local_auc": result.best.get("val/local_auc"),
        "train_rows_per_s": round(speed, 1),
        "self_train_rows": self_train_rows,
    }
    modules = {name: getattr(model, name) for name in ("tower_a", "tower_b", "local_head", "fed_head")}
    artifact = save_vfl(
        SPLIT,
        modules,
        config,
        data.schemas,
        model_config,
        "vfl train-split",
        metrics,
        parents=(init,) if init is not None else (),
        data=data_fingerprint([config.active, config.passive]),
    )
    return artifact, {"out": str(config.out), "kind": SPLIT, "init": "mpd" if init else "scratch", **metrics}


def self_train_round(
    config: SplitConfig,
    model: SplitModel,
    logits: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    y: torch.Tensor,
    b_row: torch.Tensor,
    train_rows: torch.Tensor,
    val_rows: torch.Tensor,
    evaluate: Callable[[], dict[str, float]],
    generator: torch.Generator,
    reporter: Reporter,
) -> tuple[FitResult, int]:
    """One round of self-training on the unlabelled overlapped rows.

    The trained split model's federated predictions on every overlapped row become soft
    targets (weight ``self_train_weight``) for a further fit of the publisher's tower and
    the federated head, over the training rows of the first fit plus every unlabelled
    overlapped row outside validation, with dropout as the noise and the labelled
    overlapped rows keeping their label loss. The
    local branch (``f_A``, ``l_L``) stays what the labels taught it: the student starts
    from it, and the round only refines what the publisher's features add.
    Returns the round's FitResult and the number of rows it trained on.
    """
    model.eval()
    overlapped = torch.nonzero(b_row >= 0).squeeze(1)
    with torch.no_grad():
        _, teacher, _ = logits(overlapped)
    soft = torch.full((len(b_row),), float("nan"), device=y.device)  # active row -> teacher probability
    soft[overlapped] = torch.sigmoid(teacher)
    keep = torch.zeros(len(b_row), dtype=torch.bool, device=y.device)
    keep[train_rows] = True
    keep[overlapped] = True
    keep[val_rows] = False
    rows_all = torch.nonzero(keep).squeeze(1)  # (R,) active rows: labelled or overlapped, not validation
    frozen = [*model.tower_a.parameters(), *model.local_head.parameters()]
    for p in frozen:
        p.requires_grad_(False)

    def step_loss(index: torch.Tensor) -> torch.Tensor:
        _, full, overlapped_rows = logits(rows_all[index])
        if len(full) == 0:  # only labelled rows the publisher lacks: nothing to learn here
            return torch.zeros((), device=full.device, requires_grad=True)
        target = y[rows_all[index]][overlapped_rows]  # (B_ov,) label or NaN
        loss = config.self_train_weight * F.binary_cross_entropy_with_logits(
            full, soft[rows_all[index]][overlapped_rows]
        )
        labelled = ~torch.isnan(target)
        if bool(labelled.any()):
            loss = loss + F.binary_cross_entropy_with_logits(full[labelled], target[labelled])
        return loss

    trained = [*model.tower_b.parameters(), *model.fed_head.parameters()]
    optimizer = FlatAdamW(
        [{"params": trained}], lr=config.lr * config.init_lr_scale, weight_decay=config.weight_decay
    )
    try:
        result = fit(
            model,
            optimizer,
            step_loss,
            len(rows_all),
            evaluate,
            epochs=config.epochs,
            batch_size=config.batch_size,
            patience=config.patience,
            generator=generator,
            reporter=reporter,
            description="self-training",
        )
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return result, len(rows_all)
