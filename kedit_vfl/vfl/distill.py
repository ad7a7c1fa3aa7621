"""Stage 3, SplitKD: distil the federated teacher into a student the advertiser serves alone.

The student (``f_A`` then ``l_L``, initialised from the teacher's local branch) trains
on ALL the active party's rows: soft targets from the teacher in federated mode where
the publisher holds the row (with ``kd_local_rows``, from the teacher's local branch
elsewhere too), and the hard label where one exists;
loss ``kd_weight * KD + (1 - kd_weight) * BCE``.
Without a teacher the same code trains the local-only baseline on the labelled rows.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from kedit_vfl.artifacts import Artifact, data_fingerprint
from kedit_vfl.errors import UserError
from kedit_vfl.progress import SILENT, Reporter
from kedit_vfl.seeding import resolve_device, seed_everything
from kedit_vfl.vfl.config import DistillConfig
from kedit_vfl.vfl.data import TwoPartyData, holdout_mask, load_two_party
from kedit_vfl.vfl.model import LocalModel, SplitModel
from kedit_vfl.vfl.split import labelled_split
from kedit_vfl.vfl.store import LOCAL, load_split, model_config_of, save_vfl, schemas_of
from kedit_vfl.vfl.train import base_rate_logit, binary_metrics, fit, intercept_shift, predict, shift_bias


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Binary distillation: BCE between tempered probabilities, scaled by T^2 (Hinton et al.)."""
    soft = torch.sigmoid(teacher / temperature)
    return F.binary_cross_entropy_with_logits(student / temperature, soft) * temperature**2


@torch.no_grad()
def teacher_logits(
    teacher: SplitModel, data: TwoPartyData, device: torch.device, local_rows: bool
) -> torch.Tensor:
    """(N_active,) teacher logits: federated where the passive row exists; elsewhere the
    teacher's local branch (``local_rows``) or NaN (no soft target)."""
    a_num, a_cat = data.active.num.to(device), data.active.cat.to(device)
    if local_rows:
        out = predict(lambda i: teacher.local_logit(a_num[i], a_cat[i]), len(data.active))
    else:
        out = torch.full((len(data.active),), float("nan"))
    rows_a = data.rows_a.to(device)
    b_num, b_cat = data.passive.num.to(device), data.passive.cat.to(device)
    fed = predict(lambda i: teacher(a_num[rows_a[i]], a_cat[rows_a[i]], b_num[i], b_cat[i])[1], len(rows_a))
    out[data.rows_a] = fed
    return out


def distill(config: DistillConfig, reporter: Reporter = SILENT) -> tuple[Artifact, dict[str, Any]]:
    """Train the local student (or, with no teacher, the local-only baseline); write ``vfl.local``."""
    generator = seed_everything(config.seed)
    device = resolve_device(config.device)
    teacher, parent = (None, None) if config.teacher is None else load_split(config.teacher)
    data = load_two_party(
        config.active,
        config.passive if teacher is not None else None,
        config.id_col,
        config.label_col,
        config.features_active,
        (),
        config.categorical,
        schemas=schemas_of(parent) if parent is not None else None,
    )
    assert data.labels is not None
    train_labelled, val_rows = labelled_split(data.labels, holdout_mask(data.active.ids, config.val_fraction))
    if len(val_rows) == 0:
        reporter.warn("no labelled row left for validation; the last epoch is kept")
        val_rows = train_labelled
    if teacher is None:
        train_rows, soft = train_labelled, None
    else:
        teacher = teacher.to(device)
        soft = teacher_logits(teacher, data, device, config.kd_local_rows)
        keep = ~torch.isnan(soft) | ~torch.isnan(data.labels)  # a soft target or a label
        keep[val_rows] = False
        train_rows = torch.nonzero(keep).squeeze(1)
    if len(train_rows) < 2:
        raise UserError(f"{config.active}: too few rows to train on ({len(train_rows)}); label some rows")
    model_config = model_config_of(parent) if parent is not None else config.model
    student = LocalModel(data.schemas["active"], model_config).to(device)
    if teacher is not None:
        student.tower_a.load_state_dict(teacher.tower_a.state_dict())
        student.local_head.load_state_dict(teacher.local_head.state_dict())
    else:  # start at the base rate instead of spending the first epochs on the intercept
        shift_bias(student.local_head, base_rate_logit(data.labels[train_labelled]))
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    a_num, a_cat = data.active.num.to(device), data.active.cat.to(device)
    y = data.labels.to(device)
    soft = soft.to(device) if soft is not None else None
    lam = config.kd_weight if teacher is not None else 0.0

    def step_loss(index: torch.Tensor) -> torch.Tensor:
        rows = train_rows[index].to(device)
        logit = student(a_num[rows], a_cat[rows])
        target = y[rows]
        labelled = ~torch.isnan(target)
        hard = (
            F.binary_cross_entropy_with_logits(logit[labelled], target[labelled])
            if labelled.any()
            else logit.sum() * 0.0
        )
        if soft is None:
            return hard
        taught = ~torch.isnan(soft[rows])
        kd = (
            kd_loss(logit[taught], soft[rows][taught], config.temperature)
            if taught.any()
            else 0.0 * logit.sum()
        )
        return lam * kd + (1 - lam) * hard

    def evaluate() -> dict[str, float]:
        rows = val_rows.to(device)
        logit = predict(lambda i: student(a_num[rows[i]], a_cat[rows[i]]), len(rows))
        target = data.labels[val_rows]
        auc = binary_metrics(target.numpy(), torch.sigmoid(logit).numpy())["auc"]
        return {"val/loss": F.binary_cross_entropy_with_logits(logit, target).item(), "val/auc": auc or 0.0}

    result = fit(
        student,
        optimizer,
        step_loss,
        len(train_rows),
        evaluate,
        epochs=config.epochs,
        batch_size=config.batch_size,
        patience=config.patience,
        generator=generator,
        reporter=reporter,
        description="SplitKD" if teacher is not None else "local only",
    )
    labelled = train_rows[~torch.isnan(data.labels[train_rows])]
    with torch.no_grad():
        fitted = predict(lambda i: student(a_num[labelled[i]], a_cat[labelled[i]]), len(labelled))
    shift_bias(student.local_head, intercept_shift(fitted, data.labels[labelled]))
    metrics = {
        "rows_active": len(data.active),
        "rows_train": len(train_rows),
        "rows_with_teacher_federated": int(len(data.rows_a)) if teacher is not None else 0,
        "rows_labelled_val": len(val_rows),
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "val_auc": result.best.get("val/auc"),
    }
    paths = [config.active] + ([config.passive] if teacher is not None else [])
    artifact = save_vfl(
        LOCAL,
        {"tower_a": student.tower_a, "local_head": student.local_head},
        config,
        {"active": data.schemas["active"]},
        model_config,
        "vfl distill",
        metrics,
        parents=(parent,) if parent is not None else (),
        data=data_fingerprint(paths),
    )
    return artifact, {"out": str(config.out), "kind": LOCAL, **metrics}
