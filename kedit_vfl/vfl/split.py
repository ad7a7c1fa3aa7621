"""Stage 2, split training: the local + federated model on the labelled overlapped rows.

Loss: BCE on the full logit, plus ``aux_weight`` x BCE on the local branch alone (so
that the local branch is a predictor of its own), plus, optionally, ``mpd_weight`` x
the MPD loss on batches of all overlapped rows (labelled or not), which keeps the
towers anchored to what the unlabelled pairs taught them while the few labels pull.
"""

from __future__ import annotations

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
from kedit_vfl.vfl.train import binary_metrics, fit, predict


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
    a = data.active.take(data.rows_a)
    labels = data.labels[data.rows_a]  # (N_overlap,)
    train_rows, val_rows = labelled_split(labels, holdout_mask(a.ids, config.val_fraction))
    if len(train_rows) < 2:
        raise UserError(
            f"{config.active}: only {len(train_rows)} labelled rows overlap with {config.passive}; "
            f"train-split needs labels (column '{config.label_col}') on overlapped rows"
        )
    if len(val_rows) == 0:
        reporter.warn("no labelled overlapped row left for validation; the last epoch is kept")
        val_rows = train_rows
    a_num, a_cat, b_num, b_cat = (t.to(device) for t in (a.num, a.cat, data.passive.num, data.passive.cat))
    y = labels.to(device)

    model = SplitModel(data.schemas, model_config).to(device)
    matcher = None
    if init is not None:
        load_prefixed(model.tower_a, init.tensors, "tower_a")
        load_prefixed(model.tower_b, init.tensors, "tower_b")
        if config.mpd_weight > 0:
            matcher = MatchingHead(model_config, init.config.get("mpd_temperature", 0.2)).to(device)
            load_prefixed(matcher, init.tensors, "matcher")
    towers = [*model.tower_a.parameters(), *model.tower_b.parameters()]
    heads = [*model.local_head.parameters(), *model.fed_head.parameters()]
    scale = config.init_lr_scale if init is not None else 1.0
    groups = [{"params": towers, "lr": config.lr * scale}, {"params": heads, "lr": config.lr}]
    if matcher is not None:
        groups.append({"params": list(matcher.parameters()), "lr": config.lr * scale})
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    n_overlap = len(a)
    negatives = init.config.get("negatives", 16) if init is not None else 0
    objective = init.config.get("objective", "infonce") if init is not None else "infonce"

    def step_loss(index: torch.Tensor) -> torch.Tensor:
        rows = train_rows[index].to(device)
        local, full = model(a_num[rows], a_cat[rows], b_num[rows], b_cat[rows])
        loss = F.binary_cross_entropy_with_logits(full, y[rows])
        loss = loss + config.aux_weight * F.binary_cross_entropy_with_logits(local, y[rows])
        if matcher is not None:
            pairs = torch.randint(n_overlap, (config.batch_size,), generator=generator).to(device)
            scores = pair_scores(
                model.tower_a,
                model.tower_b,
                matcher,
                (a_num[pairs], a_cat[pairs]),
                (b_num[pairs], b_cat[pairs]),
                negatives,
                generator,
            )
            loss = loss + config.mpd_weight * mpd_loss(scores, objective)
        return loss

    def logits(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        both = predict(
            lambda i: torch.stack(model(*(t[rows[i]] for t in (a_num, a_cat, b_num, b_cat)))), len(rows)
        )
        return both[0], both[1]  # (2, N) -> local (N,), full (N,)

    def evaluate() -> dict[str, float]:
        local, full = logits(val_rows.to(device))
        target = labels[val_rows]
        full_m = binary_metrics(target.numpy(), torch.sigmoid(full).numpy())
        local_m = binary_metrics(target.numpy(), torch.sigmoid(local).numpy())
        loss = F.binary_cross_entropy_with_logits(full, target).item()
        loss += config.aux_weight * F.binary_cross_entropy_with_logits(local, target).item()
        return {"val/loss": loss, "val/auc": full_m["auc"] or 0.0, "val/local_auc": local_m["auc"] or 0.0}

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
    metrics = {
        "rows_overlapped": n_overlap,
        "rows_labelled_train": len(train_rows),
        "rows_labelled_val": len(val_rows),
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "val_auc": result.best.get("val/auc"),
        "val_local_auc": result.best.get("val/local_auc"),
        "train_rows_per_s": round(result.rows_per_s, 1),
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
