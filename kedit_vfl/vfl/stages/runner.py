"""One runner for the VFL training stages (``pretrain-mpd``, ``train-split``).

A stage is what it trains: its own networks and loss, given to :func:`run_stage` as a
function of the active side. Everything around that is written once here, for both
parties and every deployment (one process, or two): reading this party's table with
the schema of the artifact the stage starts from, the link to the passive party (in
process or over the wire), resuming from checkpoints, telling the passive party the run
is over, writing each party's artifact, clearing the checkpoints and reporting traffic.
The epochs, validation, early stopping and checkpoints themselves are
:func:`kedit_vfl.vfl.stages.train.fit`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kedit_vfl.artifacts import Artifact, data_fingerprint
from kedit_vfl.progress import Reporter
from kedit_vfl.vfl.channel.party import PassiveParty, PassiveTraining
from kedit_vfl.vfl.channel.protocol import Session
from kedit_vfl.vfl.channel.session import ActiveSide, open_active, passive_tower, serve_passive
from kedit_vfl.vfl.config import ModelConfig, Protection
from kedit_vfl.vfl.data.loading import PartyTable, load_party
from kedit_vfl.vfl.data.schema import PartySchema
from kedit_vfl.vfl.models.store import run_id_of, save_vfl, schemas_of, two_party_extra
from kedit_vfl.vfl.stages.checkpoint import CheckpointStore, checkpoint_dir


@dataclass(frozen=True)
class Stage:
    """A training stage as both parties see it."""

    command: str  # "pretrain-mpd"
    kind: str  # the artifact kind it writes
    config: Any  # the stage's config (a TrainOptions)
    model_config: ModelConfig
    training: PassiveTraining  # how the passive party trains its tower, per phase
    protection: Protection = Protection()
    parent: Artifact | None = None  # the artifact the stage starts from (--init)
    extra: dict[str, Any] = field(default_factory=dict)  # stored in both parties' artifacts
    require_labels: bool = False

    def schemas(self) -> dict[str, PartySchema]:
        return schemas_of(self.parent) if self.parent is not None else {}

    @property
    def parents(self) -> tuple[Artifact, ...]:
        return (self.parent,) if self.parent is not None else ()


@dataclass
class Trained:
    """What the active side's training returns: its own networks and the metrics."""

    modules: dict[str, nn.Module]
    metrics: dict[str, Any]
    summary: dict[str, Any] = field(default_factory=dict)  # result fields shown before the metrics


TrainActive = Callable[[ActiveSide, CheckpointStore], Trained]


def run_stage(
    stage: Stage, train: TrainActive, reporter: Reporter, device: torch.device
) -> tuple[Artifact | None, dict[str, Any]]:
    """Run this party's side of ``stage``; the active side trains with ``train``."""
    config = stage.config
    if config.party == "passive":
        return None, _serve_passive(stage, reporter, device)
    table = load_active(config, stage.schemas().get("active"), stage.require_labels, reporter)
    store = CheckpointStore(checkpoint_dir(config.out))
    side = open_active(
        config,
        stage.command,
        table,
        model_config=stage.model_config,
        passive_schema=stage.schemas().get("passive"),
        passive_init=stage.parent,
        partner=run_id_of(stage.parent),
        protection=stage.protection,
        training=stage.training,
        store=store,
        device=device,
    )
    try:
        trained = train(side, store)
        side.link.finish()
        modules, schemas, paths = side.artifact_parts(trained.modules, config.active, config.passive)
        artifact = save_vfl(
            stage.kind,
            modules,
            config,
            schemas,
            stage.model_config,
            f"vfl {stage.command}",
            trained.metrics,
            parents=stage.parents,
            data=data_fingerprint(paths),
            party=config.party,
            extra={**stage.extra, **two_party_extra(side)},
        )
        side.clear_checkpoints(store)
        result = {"out": str(config.out), "kind": stage.kind, "party": config.party}
        return artifact, {**result, **trained.summary, **trained.metrics, "traffic": side.traffic()}
    finally:
        side.close()


def load_active(
    config: Any, schema: PartySchema | None, require_labels: bool, reporter: Reporter
) -> PartyTable:
    """The active party's table for a stage: the given schema (from the stage's parent
    artifact), or one fitted on the table with the command's column options."""
    return load_party(
        config.active,
        "active",
        config.id_col,
        config.label_col,
        config.features_active,
        config.categorical,
        schema=schema,
        require_labels=require_labels,
        warn=reporter.warn,
    )


def _serve_passive(stage: Stage, reporter: Reporter, device: torch.device) -> dict[str, Any]:
    """The passive party of a training stage: serve, train its tower, write its artifact."""
    config = stage.config
    table = load_party(
        config.passive,
        "passive",
        config.id_col,
        config.label_col,
        config.features_passive,
        config.categorical,
        schema=stage.schemas().get("passive"),
        warn=reporter.warn,
    )
    tower = passive_tower(table.schema, stage.model_config, config.seed, stage.parent)

    def save(party: PassiveParty, session: Session) -> dict[str, Any]:
        artifact = save_vfl(
            stage.kind,
            {"tower_b": party.tower},
            config,
            {"passive": table.schema},
            stage.model_config,
            f"vfl {stage.command}",
            {"rows_overlapped": len(party.overlap_rows), "rows_embedded": party.rows_embedded},
            parents=stage.parents,
            data=data_fingerprint([config.passive]),
            party="passive",
            extra={**stage.extra, "run_id": session.run_id},
        )
        return {"out": str(config.out), "kind": stage.kind, "sha256": artifact.sha256}

    return serve_passive(
        config,
        stage.command,
        table,
        tower,
        model_config=stage.model_config,
        partner=run_id_of(stage.parent),
        protection=stage.protection,
        training=stage.training,
        resumable=True,
        save=save,
        reporter=reporter,
        device=device,
        record=getattr(config, "record_received", None),
    )
