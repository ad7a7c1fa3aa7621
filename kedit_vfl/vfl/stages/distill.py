"""Stage 3, SplitKD: distil the federated teacher into a student the advertiser serves alone.

The student (``f_A`` then ``l_L``, initialised from the teacher's local branch) trains
on ALL the active party's rows: soft targets from the teacher in federated mode where
the publisher holds the row (with ``kd_local_rows``, from the teacher's local branch
elsewhere too), and the hard label where one exists;
loss ``kd_weight * KD + (1 - kd_weight) * BCE``.
Without a teacher the same code trains the local-only baseline on the labelled rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from kedit_vfl.artifacts import Artifact, data_fingerprint
from kedit_vfl.errors import UserError
from kedit_vfl.progress import SILENT, Reporter
from kedit_vfl.seeding import resolve_device, seed_everything
from kedit_vfl.vfl.channel.party import PassiveTraining, Protection
from kedit_vfl.vfl.channel.session import ActiveSide, open_active, passive_tower, serve_passive
from kedit_vfl.vfl.config import DistillConfig
from kedit_vfl.vfl.data.encoding import holdout_mask
from kedit_vfl.vfl.data.loading import PartyTable, load_party
from kedit_vfl.vfl.models.networks import ActiveSplit, LocalModel
from kedit_vfl.vfl.models.store import (
    LOCAL,
    SPLIT,
    load_for_party,
    model_config_of,
    protection_clip,
    run_id_of,
    save_vfl,
    schemas_of,
    split_from,
    two_party_extra,
)
from kedit_vfl.vfl.privacy.leakage import GradientRecorder, leakage
from kedit_vfl.vfl.stages.runner import load_active
from kedit_vfl.vfl.stages.selection import FOLDS, fit_cross_validated, too_few_to_select
from kedit_vfl.vfl.stages.split import labelled_split
from kedit_vfl.vfl.stages.train import (
    base_rate_logit,
    binary_metrics,
    fit,
    intercept_shift,
    loop_of,
    predict,
    shift_bias,
)


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Binary distillation: BCE between tempered probabilities, scaled by T^2 (Hinton et al.)."""
    soft = torch.sigmoid(teacher / temperature)
    return F.binary_cross_entropy_with_logits(student / temperature, soft) * temperature**2


COMMAND = "distill"


@torch.no_grad()
def teacher_logits(
    teacher: ActiveSplit, table: PartyTable, side: ActiveSide, device: torch.device, local_rows: bool
) -> torch.Tensor:
    """(N_active,) teacher logits: federated where the passive row exists; elsewhere the
    teacher's local branch (``local_rows``) or NaN (no soft target)."""
    a_num, a_cat = table.rows.num.to(device), table.rows.cat.to(device)
    if local_rows:
        out = predict(lambda i: teacher.local_logit(a_num[i], a_cat[i]), len(table.rows))
    else:
        out = torch.full((len(table.rows),), float("nan"))
    rows_a, positions, link = side.rows_a.to(device), torch.arange(len(side.rows_a)), side.link
    fed = predict(  # a slice at a time: the publisher's embeddings are requested as needed
        lambda i: teacher.with_embedding(a_num[rows_a[i]], a_cat[rows_a[i]], link.embed(positions[i], False))[
            1
        ],
        len(rows_a),
    )
    out[side.rows_a] = fed
    return out


def open_serving(
    config: Any,
    command: str,
    table: PartyTable,
    artifact: Artifact,
    device: torch.device,
    passive_path: Path | None = None,
    check_beside_join: bool = False,
) -> ActiveSide:
    """The active side of a stage that only scores with a split model (``distill``'s
    teacher, federated ``score``): the passive party serves embeddings, trains nothing,
    and the parties need agree only on the model's sizes. ``check_beside_join``: see
    :func:`kedit_vfl.vfl.data.loading.align_unique`."""
    model_config = model_config_of(artifact)
    return open_active(
        config,
        command,
        table,
        model_config=model_config,
        passive_schema=schemas_of(artifact).get("passive"),
        passive_init=artifact,
        partner=run_id_of(artifact),
        protection=serving_protection(artifact),
        training=PassiveTraining(),
        store=None,
        device=device,
        passive_path=passive_path,
        shared={"model": model_config.to_dict(), "ids_in_clear": config.ids_in_clear},
        check_beside_join=check_beside_join,
    )


def serving_protection(artifact: Artifact) -> Protection:
    """What of a split model's protection applies when it only scores: the clip."""
    return Protection(clip=protection_clip(artifact))


def distill(config: DistillConfig, reporter: Reporter = SILENT) -> tuple[Artifact | None, dict[str, Any]]:
    """Train the local student (or, with no teacher, the local-only baseline); write ``vfl.local``.

    In a two-party run the passive party only serves its embeddings for the teacher's
    soft targets; the student trains on the active side alone.
    """
    generator = seed_everything(config.seed)
    device = resolve_device(config.device)
    if config.teacher is None and config.party != "both":
        raise UserError("distill without --teacher trains the local-only baseline; it needs no --party")
    parent = load_for_party(config.teacher, SPLIT, config.party, "--teacher") if config.teacher else None
    schemas = schemas_of(parent) if parent is not None else {}
    if config.party == "passive":
        assert parent is not None
        return None, serve_embeddings(config, COMMAND, parent, reporter, device)
    table = load_active(config, schemas.get("active"), True, reporter)
    soft, traffic, teacher_extra, n_overlap, audited = None, None, {}, 0, {}
    if parent is not None:
        teacher = split_from(parent).to(device)
        side = open_serving(config, COMMAND, table, parent, device)
        if config.audit:  # distillation only asks for embeddings: the audit checks that none crossed
            side.link.recorder = GradientRecorder(len(side.rows_a), side.link.width)
        try:
            with reporter.task("teacher's soft targets", total=None):
                soft = teacher_logits(teacher, table, side, device, config.kd_local_rows)
            side.link.finish()
            traffic, teacher_extra = side.traffic(), two_party_extra(side)
        finally:
            side.close()
        n_overlap = len(side.rows_a)
        if side.link.recorder is not None:
            assert table.labels is not None
            audited = {
                "label_leakage": leakage(side.link.recorder, table.labels[side.rows_a]),
                # what the teacher's own training let cross (train-split --audit), if it was audited
                "teacher_label_leakage": (parent.extra.get("metrics") or {}).get("label_leakage"),
            }
    labels = table.labels
    assert labels is not None
    train_labelled, val_rows = labelled_split(labels, holdout_mask(table.rows.ids, config.val_fraction))
    if len(val_rows) == 0:
        reporter.warn("no labelled row left for validation; the last epoch is kept")
        val_rows = train_labelled
    if soft is None:
        train_rows = train_labelled
    else:
        keep = ~torch.isnan(soft) | ~torch.isnan(labels)  # a soft target or a label
        keep[val_rows] = False
        train_rows = torch.nonzero(keep).squeeze(1)
    if len(train_rows) < 2:
        raise UserError(f"{config.active}: too few rows to train on ({len(train_rows)}); label some rows")
    model_config = model_config_of(parent) if parent is not None else config.model
    student = LocalModel(table.schema, model_config).to(device)
    if parent is not None:
        student.tower_a.load_state_dict(teacher.tower_a.state_dict())
        student.local_head.load_state_dict(teacher.local_head.state_dict())
    else:  # start at the base rate instead of spending the first epochs on the intercept
        shift_bias(student.local_head, base_rate_logit(labels[train_labelled]))
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    a_num, a_cat = table.rows.num.to(device), table.rows.cat.to(device)
    y = labels.to(device)
    soft = soft.to(device) if soft is not None else None
    lam = config.kd_weight if parent is not None else 0.0

    def rows_loss(rows: torch.Tensor) -> torch.Tensor:
        rows = rows.to(device)
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

    def scored(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        on = rows.to(device)
        return predict(lambda i: student(a_num[on[i]], a_cat[on[i]]), len(on)), labels[rows]

    def evaluate() -> dict[str, float | None]:
        logit, target = scored(val_rows)
        auc = binary_metrics(target.numpy(), torch.sigmoid(logit).numpy())["auc"]
        return {
            "val/loss": F.binary_cross_entropy_with_logits(logit, target).item(),
            "val/auc": auc,
        }  # None: one class

    held = too_few_to_select(labels[val_rows])
    if held is not None:  # early stopping on these rows would pick noise: k-fold over every label
        reporter.warn(
            f"{held}: the epochs are chosen by {FOLDS}-fold cross-validation over every labelled row instead"
        )
        labelled_rows = torch.unique(torch.cat([train_labelled, val_rows]))
        result = fit_cross_validated(
            student,
            lambda: torch.optim.AdamW(student.parameters(), lr=config.lr, weight_decay=config.weight_decay),
            rows_loss,
            lambda rows: F.binary_cross_entropy_with_logits(*scored(rows)).item(),
            labelled_rows,
            labels[labelled_rows],
            always=train_rows[torch.isnan(labels[train_rows])],  # soft targets only: in every fold
            **loop_of(config),
            generator=generator,
        )
        train_rows = torch.cat([train_rows, val_rows]).unique()  # every row trained the final model
    else:
        result = fit(
            student,
            optimizer,
            lambda index: rows_loss(train_rows[index]),
            len(train_rows),
            evaluate,
            **loop_of(config),
            generator=generator,
            reporter=reporter,
            description="SplitKD" if parent is not None else "local only",
        )
    labelled = train_rows[~torch.isnan(labels[train_rows])]
    with torch.no_grad():
        fitted = predict(lambda i: student(a_num[labelled[i]], a_cat[labelled[i]]), len(labelled))
    shift_bias(student.local_head, intercept_shift(fitted, labels[labelled]))
    if held is None and result.best.get("val/auc") is None:
        reporter.warn("the validation rows hold one class only: validation AUC undefined (null)")
    metrics = {
        "rows_active": len(table.rows),
        "rows_train": len(train_rows),
        "rows_with_teacher_federated": n_overlap if parent is not None else 0,
        "rows_labelled_val": len(val_rows),
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "val_auc": result.best.get("val/auc"),
        "model_selection": "hold-out" if held is None else f"{FOLDS}-fold cross-validation",
        "cv_loss": result.best.get("cv/loss"),
    }
    paths = [config.active] + ([config.passive] if parent is not None and config.party == "both" else [])
    artifact = save_vfl(
        LOCAL,
        {"tower_a": student.tower_a, "local_head": student.local_head},
        config,
        {"active": table.schema},
        model_config,
        f"vfl {config.command}",
        metrics,
        parents=(parent,) if parent is not None else (),
        data=data_fingerprint(paths),
        party="active",
        extra=teacher_extra,
    )
    result = {"out": str(config.out), "kind": LOCAL, "party": config.party, **metrics, **audited}
    return artifact, {**result, "traffic": traffic} if traffic is not None else result


def serve_embeddings(
    config: Any, command: str, parent: Artifact, reporter: Reporter, device: torch.device
) -> dict[str, Any]:
    """The passive party of ``distill`` and ``score``: serve the tower's embeddings, train nothing."""
    model_config = model_config_of(parent)
    table = load_party(
        config.passive,
        "passive",
        config.id_col,
        config.label_col,
        schema=schemas_of(parent)["passive"],
        warn=reporter.warn,
    )
    return serve_passive(
        config,
        command,
        table,
        passive_tower(table.schema, model_config, getattr(config, "seed", 0), parent),
        model_config=model_config,
        partner=run_id_of(parent),
        protection=serving_protection(parent),
        training=PassiveTraining(),
        resumable=False,
        save=None,
        reporter=reporter,
        device=device,
        shared={"model": model_config.to_dict(), "ids_in_clear": config.ids_in_clear},
    )
