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

import math
import tempfile
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from kedit_vfl.artifacts import Artifact
from kedit_vfl.errors import UserError
from kedit_vfl.progress import SILENT, Reporter
from kedit_vfl.seeding import resolve_device, seed_everything
from kedit_vfl.vfl.channel.party import PassiveLink, PassiveTraining
from kedit_vfl.vfl.channel.session import ActiveSide, resume_tag_in_process
from kedit_vfl.vfl.config import SplitConfig
from kedit_vfl.vfl.data.encoding import holdout_mask
from kedit_vfl.vfl.models.networks import ActiveSplit, MatchingHead, ModelConfig, Tower
from kedit_vfl.vfl.models.store import (
    MPD,
    SPLIT,
    load_for_party,
    load_weights,
    model_config_of,
    mpd_settings,
)
from kedit_vfl.vfl.privacy.leakage import CalibratedNoise, GradientRecorder, leakage
from kedit_vfl.vfl.privacy.received import write_received
from kedit_vfl.vfl.stages.checkpoint import CheckpointStore, TrainingState
from kedit_vfl.vfl.stages.mpd import mpd_loss, pair_scores
from kedit_vfl.vfl.stages.probe import Probe, linear_probe
from kedit_vfl.vfl.stages.runner import Stage, Trained, run_stage
from kedit_vfl.vfl.stages.selection import FOLDS, fit_cross_validated, too_few_to_select
from kedit_vfl.vfl.stages.train import (
    PREDICT_SLICE,
    FitResult,
    FlatAdamW,
    base_rate_logit,
    binary_metrics,
    fit,
    intercept_shift,
    loop_of,
    shift_bias,
)


def labelled_split(labels: torch.Tensor, valid: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Training and validation row indices among the labelled rows (validation keyed by id)."""
    labelled = ~torch.isnan(labels)
    valid_t = torch.from_numpy(valid)
    train = torch.nonzero(labelled & ~valid_t).squeeze(1)
    val = torch.nonzero(labelled & valid_t).squeeze(1)
    return train, val


COMMAND = "train-split"


def passive_phase_lrs(config: SplitConfig, initialised: bool) -> tuple[float, ...]:
    """The passive tower's learning rate in the fit and in the self-training round (0: a
    frozen tower, which still keeps the phases, snapshots and checkpoints in step)."""
    if config.freeze_passive and initialised:
        return (0.0, 0.0) if config.self_train_weight > 0 else (0.0,)
    first = config.lr * (config.init_lr_scale if initialised else 1.0)
    return (first, config.lr * config.init_lr_scale) if config.self_train_weight > 0 else (first,)


def train_split(
    config: SplitConfig, reporter: Reporter = SILENT, price_defence: bool = True
) -> tuple[Artifact | None, dict[str, Any]]:
    """Train the split model (towers from MPD or from scratch); write ``vfl.split``.

    In a two-party run the active party writes its towers and heads, the passive party
    its tower; both artifacts carry the same run id. With ``config.audit`` and
    ``price_defence``, the defence's cost is measured by a second, undefended run
    (benchmarks that run the undefended configuration anyway turn it off).
    """
    generator = seed_everything(config.seed)
    device = resolve_device(config.device)
    init = load_for_party(config.init, MPD, config.party, "--init") if config.init is not None else None
    model_config = model_config_of(init) if init is not None else config.model
    if init is not None and (config.features_active or config.features_passive or config.categorical):
        reporter.warn("the feature columns and their transform come from --init; column options are ignored")
    stage = Stage(
        COMMAND,
        SPLIT,
        config,
        model_config,
        PassiveTraining(
            passive_phase_lrs(config, init is not None),
            0.0 if config.freeze_passive and init is not None else config.weight_decay,
        ),
        config.protection,
        parent=init,
        extra={"protection": config.protection.to_dict()},
        require_labels=True,
    )

    def train(side: ActiveSide, store: CheckpointStore) -> Trained:
        return _train_active(config, side, init, model_config, store, generator, reporter, device)

    artifact, result = run_stage(stage, train, reporter, device)
    if config.audit and price_defence:
        result["defence"] = defence_cost(config, result, reporter)
    return artifact, result


def _train_active(
    config: SplitConfig,
    side: ActiveSide,
    init: Artifact | None,
    model_config: ModelConfig,
    store: CheckpointStore,
    generator: torch.Generator,
    reporter: Reporter,
    device: torch.device,
) -> Trained:
    """The active side's split training: the split model, then one self-training round."""
    labels = side.table.labels
    assert labels is not None
    n_active, n_overlap = len(side.table.rows), len(side.rows_a)
    b_row = torch.full((n_active,), -1, dtype=torch.long)  # active row -> its overlap position, -1 if none
    b_row[side.rows_a] = torch.arange(n_overlap)
    usable = labels.clone()
    if config.aux_weight == 0:  # no local loss: only the labelled overlapped rows teach anything
        usable[b_row < 0] = float("nan")
    train_rows, val_rows = labelled_split(usable, holdout_mask(side.table.rows.ids, config.val_fraction))
    if int((b_row[train_rows] >= 0).sum()) < 2:
        raise UserError(
            f"{config.active}: fewer than 2 labelled rows overlap with the passive party's table; "
            f"train-split needs labels (column '{config.label_col}') on overlapped rows"
        )
    if len(val_rows) == 0 or int((b_row[val_rows] >= 0).sum()) == 0:
        reporter.warn("no labelled overlapped row left for validation; validating on training rows")
        val_rows = train_rows
    a_num, a_cat = side.table.rows.num.to(device), side.table.rows.cat.to(device)
    y, b_row = labels.to(device), b_row.to(device)
    rows_a = side.rows_a.to(device)
    link = side.link
    trains_passive = not (config.freeze_passive and init is not None)  # frozen: no gradient crosses
    if trains_passive and config.freeze_passive:
        reporter.warn(
            "no --init: the publisher's tower trains from scratch, so label gradients cross "
            "(start from pretrain-mpd to keep them on this side; see --audit)"
        )
    # what the federated part learns from: the labels, or with --label-epsilon their
    # randomised response on the overlapped rows (the local branch keeps the true ones)
    y_full = randomised_response(y, b_row >= 0, config.label_epsilon, config.seed)
    if config.audit or config.record_received is not None:
        link.recorder = GradientRecorder(n_overlap, link.width)

    model = ActiveSplit({"active": side.table.schema}, model_config).to(device)
    matcher = None
    if init is not None:  # local first: tower_a trains from scratch, as train-local (checked all the same)
        load_weights(
            init,
            model.tower_a if not config.local_first else Tower(side.table.schema, model_config),
            "tower_a",
        )
        if config.mpd_weight > 0:
            matcher = MatchingHead(model_config, mpd_settings(init)[0]).to(device)
            load_weights(init, matcher, "matcher")
    shift_bias(model.local_head, base_rate_logit(labels[train_rows]))  # start at the base rate
    scale = config.init_lr_scale if init is not None else 1.0
    resume_from = side.resume_from or resume_tag_in_process(config, store)
    local_result, probe = None, None
    all_train_rows = train_rows
    if config.local_first:
        if resume_from is None:  # a resumed run's checkpoint holds the local branch it trained
            branch = _LocalBranch(config, model, a_num, a_cat, y, train_rows, val_rows, link)
            local_result = branch.fit(generator, reporter)
        for p in [*model.tower_a.parameters(), *model.local_head.parameters()]:
            p.requires_grad_(False)
        train_rows = train_rows[b_row[train_rows] >= 0]  # only the full loss is left to learn
        if resume_from is None and model_config.wide:
            probe = _start_from_probe(model, a_num, a_cat, y_full, b_row, train_rows, link, generator)
        groups = [{"params": list(model.fed_head.parameters()), "lr": config.lr}]
    else:
        heads = [*model.local_head.parameters(), *model.fed_head.parameters()]
        groups = [
            {"params": list(model.tower_a.parameters()), "lr": config.lr * scale},
            {"params": heads, "lr": config.lr},
        ]
    trained = model if matcher is None else torch.nn.ModuleDict({"split": model, "matcher": matcher})
    if matcher is not None:
        groups.append({"params": list(matcher.parameters()), "lr": config.lr * scale})
    optimizer = FlatAdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    _, negatives, objective = mpd_settings(init) if init is not None else (0.0, 0, "infonce")
    if side.passive is not None and resume_from is not None:
        side.passive.resume(resume_from)
    if config.noise_multiplier > 0 and trains_passive:  # bound: every epoch's passes, both fits
        passes = -(-config.min_epoch_rows // max(len(train_rows), 1))
        rounds = 2 if config.self_train_weight > 0 else 1
        observations = config.epochs * passes * rounds
        link.calibrated = CalibratedNoise(
            config.clip_quantile, config.noise_multiplier, observations, config.seed
        )
    state = TrainingState(store, {"sampling": generator, "gradient_noise": link.generator}, resume_from)

    def logits(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Local logits for ``rows`` (B,), full logits for their overlapped ones (B_ov,), the mask."""
        partner = b_row[rows]
        overlapped = partner >= 0
        if bool(overlapped.all()):  # the common case: no masking needed
            h_b = link.embed(partner, model.training and trains_passive)
            local, full = model.with_embedding(a_num[rows], a_cat[rows], h_b)
            return local, full, overlapped
        h_b = link.embed(partner[overlapped], model.training and trains_passive)
        local, full = model.partial(a_num[rows], a_cat[rows], overlapped, h_b)
        return local, full, overlapped

    @torch.no_grad()
    def logits_in_slices(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:func:`logits` for many rows, a slice at a time: memory stays bounded."""
        parts = [logits(part) for part in rows.split(PREDICT_SLICE)]
        if not parts:
            return logits(rows)
        return tuple(torch.cat([p[k] for p in parts]) for k in range(3))  # type: ignore[return-value]

    def loss_of(rows: torch.Tensor) -> torch.Tensor:
        local, full, overlapped = logits(rows)
        target, noisy = y[rows], y_full[rows]
        full_target = noisy if len(full) == len(target) else noisy[overlapped]
        loss = F.binary_cross_entropy_with_logits(full, full_target) if len(full) else full.sum()
        if config.aux_weight > 0 and not config.local_first:  # a held local branch learns nothing
            loss = loss + config.aux_weight * F.binary_cross_entropy_with_logits(local, target)
        return loss

    def step_loss(index: torch.Tensor) -> torch.Tensor:
        loss = loss_of(train_rows[index].to(device))
        if matcher is not None:
            pairs = torch.randint(n_overlap, (config.batch_size,), generator=generator).to(device)
            a_rows = rows_a[pairs]
            h_a = model.tower_a(a_num[a_rows], a_cat[a_rows])
            scores = pair_scores(matcher, h_a, link.embed(pairs, True), negatives, generator)
            loss = loss + config.mpd_weight * mpd_loss(scores, objective)
        return loss

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        local, full, overlapped = logits(val_rows.to(device))
        local, full, target = local.cpu(), full.cpu(), labels[val_rows]
        full_target = target[overlapped.cpu()]  # the reported AUC: true labels, on this side only
        chosen_by = y_full[val_rows.to(device)].cpu()[overlapped.cpu()]  # what selection may use
        full_loss = F.binary_cross_entropy_with_logits(full, chosen_by).item()
        local_loss = F.binary_cross_entropy_with_logits(local, target).item()
        return {
            "val/loss": full_loss + config.aux_weight * local_loss,
            "val/auc": binary_metrics(full_target.numpy(), torch.sigmoid(full).numpy())[
                "auc"
            ],  # None: one class
            "val/local_auc": binary_metrics(target.numpy(), torch.sigmoid(local).numpy())["auc"],
        }

    overlapped_val = val_rows.to(device)[b_row[val_rows.to(device)] >= 0]
    held = too_few_to_select(y[overlapped_val].cpu(), "labelled overlapped validation rows")
    if held is not None and config.local_first:  # keep the cross-validated head; nothing to select with
        reporter.warn(
            f"{held}: too few to choose a federated fine-tune by; the federated head stays the "
            "cross-validated linear one (label more overlapped rows to fine-tune it)"
        )
        model.eval()
        result = FitResult(0, 0, evaluate())
    elif state.skip(0):
        with state.fitting():
            result = FitResult(**state.extra["fit0"])
    else:
        result = fit(
            trained,
            optimizer,
            step_loss,
            len(train_rows),
            evaluate,
            **loop_of(config),
            generator=generator,
            reporter=reporter,
            description="split training",
            peer=link,
            state=state,
        )
        state.extra["fit0"] = asdict(result)
    speed, self_train_rows = result.rows_per_s, 0
    if config.self_train_weight > 0 and not (held is not None and config.local_first):
        args = (
            config,
            model,
            logits,
            logits_in_slices,
            y_full,
            b_row,
            train_rows,
            val_rows,
            evaluate,
            generator,
            reporter,
        )
        result, self_train_rows = self_train_round(*args, link=link, state=state)
    with torch.no_grad():  # calibrate both branches' intercepts
        rows = (all_train_rows if config.local_first else train_rows).to(device)
        local, full, overlapped = logits_in_slices(rows)
        trained_local = config.aux_weight > 0 or config.local_first
        local_shift = intercept_shift(local, y[rows]) if trained_local else 0.0
        if trained_local:
            # Federated scores share one ranking with the local ones (rows the publisher
            # lacks), so the full logit's mean over every overlapped row, labelled or not,
            # is set to the calibrated local branch's there: a base rate measured on all
            # labelled rows, not on the few labelled overlapped ones.
            local_ov, full_ov, _ = logits_in_slices(torch.nonzero(b_row >= 0).squeeze(1))
            full_shift = intercept_shift(full_ov, torch.sigmoid(local_ov + local_shift))
        else:
            full_shift = intercept_shift(full, y[rows][overlapped])
    shift_bias(model.local_head, local_shift)
    shift_bias(model.fed_head, full_shift - local_shift)
    local_best = local_result.best if local_result is not None else {}
    undefined = [k for k in ("val/auc", "val/local_auc") if k in result.best and result.best[k] is None]
    if undefined:
        reporter.warn(f"the validation rows hold one class only: {', '.join(undefined)} undefined (null)")
    metrics = {
        "rows_overlapped": n_overlap,
        "rows_labelled_train": len(all_train_rows),
        "rows_labelled_train_overlapped": int((b_row[all_train_rows.to(device)] >= 0).sum()),
        "rows_labelled_val": len(val_rows),
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "best_epoch_local": local_result.best_epoch if local_result is not None else None,
        "probe_strength": probe.strength if probe is not None else None,
        "local_model_selection": None
        if local_result is None
        else ("hold-out" if "cv/loss" not in local_result.best else f"{FOLDS}-fold cross-validation"),
        "federated_fine_tune": held is None or not config.local_first,
        "passive_frozen": not trains_passive,
        "label_epsilon": config.label_epsilon or None,
        "gradient_noise_std": link.calibrated.noise_std if link.calibrated is not None else None,
        "val_auc": result.best.get("val/auc"),
        # with cross-validation the local branch trained on the validation rows too: no fair figure
        "val_local_auc": result.best.get("val/local_auc") if "cv/loss" not in local_best else None,
        "train_rows_per_s": round(speed, 1),
        "self_train_rows": self_train_rows,
    }
    summary: dict[str, Any] = {"init": "mpd" if init else "scratch"}
    if config.audit:
        metrics["label_leakage"] = leakage(link.recorder, y[rows_a])
    if config.record_received is not None:
        summary.update(_record_in_process(config, side, link))
    own = {name: getattr(model, name) for name in ("tower_a", "local_head", "fed_head")}
    return Trained(own, metrics, summary)


def _record_in_process(config: SplitConfig, side: ActiveSide, link: PassiveLink) -> dict[str, Any]:
    """``--record-received`` in one process: the link's record, keyed by the publisher's ids."""
    assert config.record_received is not None and link.recorder is not None and side.passive is not None
    positions = torch.arange(len(side.rows_a))
    keys = link.wire_keys[positions] if link.wire_keys is not None else positions
    at, _ = side.passive.positions_of(keys)
    meta = {"run_id": None, "command": COMMAND, "rows_overlapped": len(positions)}
    users = write_received(config.record_received, link.recorder, side.passive.ids_at(at), meta)
    return {"record_received": str(config.record_received), "rows_recorded": users}


def defences_in_effect(config: SplitConfig) -> list[str]:
    """The label-leakage defences this configuration runs, in words."""
    if config.freeze_passive and config.init is not None:  # nothing crosses: the rest never applies
        return ["frozen publisher tower"]
    found = []
    if config.label_epsilon > 0:
        found.append(f"randomised response, epsilon {config.label_epsilon:g}")
    if config.noise_multiplier > 0:
        found.append(f"calibrated gradient noise x{config.noise_multiplier:g}")
    if config.clip > 0:
        found.append(f"gradient clip {config.clip:g}")
    if config.gradient_noise > 0:
        found.append(f"gradient noise std {config.gradient_noise:g}")
    return found


def defence_cost(config: SplitConfig, result: dict[str, Any], reporter: Reporter) -> dict[str, Any]:
    """``--audit``'s price tag: the same run (data, seed, sizes) without the defences, its
    validation AUC and leak beside this run's. Costs a second training run."""
    found = defences_in_effect(config)
    if not found:
        return {"in_effect": "none"}
    reporter.log("audit: training the same configuration without the defence, to measure its cost")
    with tempfile.TemporaryDirectory(prefix="kvtool-audit-") as folder:
        undefended = replace(
            config,
            freeze_passive=False,
            label_epsilon=0.0,
            noise_multiplier=0.0,
            clip=0.0,
            gradient_noise=0.0,
            audit=True,
            record_received=None,
            resume=False,
            out=Path(folder) / "undefended.safetensors",
        )
        _, reference = train_split(undefended)
    ours, theirs = result.get("val_auc"), reference.get("val_auc")
    return {
        "in_effect": ", ".join(found),
        "val_auc_undefended": theirs,
        "val_auc_cost": None if ours is None or not theirs else 1.0 - ours / theirs,
        "leak_undefended": reference["label_leakage"]["accumulated"],
    }


class _LocalBranch:
    """The local-first phase: ``f_A`` and ``l_L`` alone on every labelled training row,
    early-stopped on the labelled validation rows' local loss. Nothing crosses to the
    publisher but one keep-alive message an epoch (its phase, already its next one), so
    its waits stay bounded by ``--timeout`` however long the phase takes."""

    def __init__(
        self,
        config: SplitConfig,
        model: ActiveSplit,
        a_num: torch.Tensor,
        a_cat: torch.Tensor,
        y: torch.Tensor,
        train_rows: torch.Tensor,
        val_rows: torch.Tensor,
        link: PassiveLink,
    ) -> None:
        self.config, self.model, self.link = config, model, link
        self.a_num, self.a_cat, self.y = a_num, a_cat, y
        self.train_rows, self.val_rows = train_rows, val_rows

    def fit(self, generator: torch.Generator, reporter: Reporter) -> FitResult:
        model, config, device = self.model, self.config, self.a_num.device
        branch = torch.nn.ModuleDict({"tower_a": model.tower_a, "local_head": model.local_head})
        optimizer = FlatAdamW(
            [{"params": list(branch.parameters())}], lr=config.lr, weight_decay=config.weight_decay
        )

        def rows_loss(rows: torch.Tensor) -> torch.Tensor:
            rows = rows.to(device)
            logit = model.local_logit(self.a_num[rows], self.a_cat[rows])
            return F.binary_cross_entropy_with_logits(logit, self.y[rows])

        @torch.no_grad()
        def scored(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            rows = rows.to(device)
            logit = torch.cat(
                [model.local_logit(self.a_num[r], self.a_cat[r]) for r in rows.split(PREDICT_SLICE)]
            ).cpu()
            self.link.phase(0)  # the keep-alive
            return logit, self.y[rows].cpu()

        def rows_val_loss(rows: torch.Tensor) -> float:
            logit, target = scored(rows)
            return F.binary_cross_entropy_with_logits(logit, target).item()

        def evaluate() -> dict[str, float | None]:
            logit, target = scored(self.val_rows)
            return {
                "val/loss": F.binary_cross_entropy_with_logits(logit, target).item(),
                "val/local_auc": binary_metrics(target.numpy(), torch.sigmoid(logit).numpy())["auc"],
            }

        held = too_few_to_select(self.y[self.val_rows.to(device)].cpu())
        if held is not None:
            reporter.warn(
                f"{held}: the local branch's epochs are chosen by {FOLDS}-fold cross-validation "
                "over every labelled row instead"
            )
            labelled = torch.unique(torch.cat([self.train_rows, self.val_rows]))
            return fit_cross_validated(
                branch,
                lambda: FlatAdamW(
                    [{"params": list(branch.parameters())}], lr=config.lr, weight_decay=config.weight_decay
                ),
                rows_loss,
                rows_val_loss,
                labelled,
                self.y[labelled.to(device)].cpu(),
                **loop_of(config),
                generator=generator,
            )

        def step_loss(index: torch.Tensor) -> torch.Tensor:
            return rows_loss(self.train_rows[index])

        return fit(
            branch,
            optimizer,
            step_loss,
            len(self.train_rows),
            evaluate,
            **loop_of(config),
            generator=generator,
            reporter=reporter,
            description="local branch",
        )


def randomised_response(labels: torch.Tensor, where: torch.Tensor, epsilon: float, seed: int) -> torch.Tensor:
    """``labels`` with each label at ``where`` kept with probability e^eps / (1 + e^eps),
    flipped otherwise: epsilon-label differential privacy for everything computed from
    them (Warner's randomised response). ``epsilon`` 0: unchanged. Seeded, so the same
    rows flip in every stage and on resume."""
    if epsilon <= 0:
        return labels
    generator = torch.Generator().manual_seed(seed + 7_919)
    flip = torch.rand(len(labels), generator=generator) < 1.0 / (1.0 + math.exp(epsilon))
    flip = flip.to(labels.device) & where & ~torch.isnan(labels)
    return torch.where(flip, 1.0 - labels, labels)


@torch.no_grad()
def _start_from_probe(
    model: ActiveSplit,
    a_num: torch.Tensor,
    a_cat: torch.Tensor,
    y: torch.Tensor,
    b_row: torch.Tensor,
    rows: torch.Tensor,
    link: PassiveLink,
    generator: torch.Generator,
) -> Probe | None:
    """Start the federated head as the cross-validated linear model of ``h_B`` on top of
    the local logit (:mod:`.probe`), if it beats the local logit out of fold: what the
    publisher's embedding adds, not a refit of the local branch on the overlap."""
    model.eval()
    parts = []
    for part in rows.split(PREDICT_SLICE):
        h_a = model.tower_a(a_num[part], a_cat[part])
        h_b = link.embed(b_row[part], False)
        parts.append((h_b.cpu(), model.local_head(h_a).cpu()))
    features, offset = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    probe = linear_probe(features, offset, y[rows].cpu(), generator)
    if probe is None or probe.cv_loss >= probe.offset_loss:
        return None
    weight = model.fed_head.linear.weight  # (1, d_A + d_B): the probe's weights go to h_B's part
    weight[0, weight.shape[1] - len(probe.weight) :] = probe.weight.to(weight.device)
    model.fed_head.net[-1].bias.fill_(probe.bias)
    return probe


def self_train_round(
    config: SplitConfig,
    model: ActiveSplit,
    logits: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    logits_in_slices: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    y: torch.Tensor,
    b_row: torch.Tensor,
    train_rows: torch.Tensor,
    val_rows: torch.Tensor,
    evaluate: Callable[[], dict[str, float]],
    generator: torch.Generator,
    reporter: Reporter,
    *,
    link: PassiveLink,
    state: TrainingState,
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
    if "soft" not in state.extra:  # a resumed round keeps the targets it started with
        with torch.no_grad():
            _, teacher, _ = logits_in_slices(overlapped)
        soft = torch.full((len(b_row),), float("nan"), device=y.device)  # active row -> teacher probability
        soft[overlapped] = torch.sigmoid(teacher)
        state.extra["soft"] = soft.cpu()
    with state.fitting():
        soft = state.extra["soft"].to(y.device)
        if soft.shape != (len(b_row),):
            raise ValueError(f"soft targets for {len(soft)} rows, not {len(b_row)}")
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

    optimizer = FlatAdamW(
        [{"params": list(model.fed_head.parameters())}],
        lr=config.lr * config.init_lr_scale,
        weight_decay=config.weight_decay,
    )
    try:
        result = fit(
            model,
            optimizer,
            step_loss,
            len(rows_all),
            evaluate,
            **loop_of(config),
            generator=generator,
            reporter=reporter,
            description="self-training",
            peer=link,
            state=state,
            phase=1,
        )
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return result, len(rows_all)
