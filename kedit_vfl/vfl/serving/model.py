"""The model a scoring server answers with, loaded once and swapped whole on reload.

A :class:`ServedModel` is immutable once built: a request takes the current one and
finishes with it, so a reload (a new file under ``--model``) never changes a model in
the middle of a request. It holds the local scorer (a ``vfl.local`` student, or a split
model's local branch when no student was distilled from it) and, for a split model, the
federated part, with the same fallback rules as ``kvtool vfl score --mode federated``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kedit_vfl.artifacts import Artifact, load_artifact
from kedit_vfl.errors import UserError
from kedit_vfl.vfl.config import ServeConfig, default_output
from kedit_vfl.vfl.data.schema import PartySchema
from kedit_vfl.vfl.models.networks import ServingLocal, ServingSplit
from kedit_vfl.vfl.models.store import (
    LOCAL,
    SPLIT,
    load_for_party,
    load_local,
    local_from,
    model_config_of,
    run_id_of,
    schemas_of,
    split_from,
)
from kedit_vfl.vfl.serving.score import fallback_path, untrained_local_branch


@dataclass(frozen=True)
class ServedModel:
    """One loaded version of the served model."""

    path: Path
    sha256: str
    kind: str  # vfl.local or vfl.split
    schema: PartySchema  # the advertiser's features, as requests must send them
    local: ServingLocal  # answers every row the publisher does not
    local_name: str  # which model that is, for /readyz
    split: ServingSplit | None  # the federated model (split models only)
    run_id: str | None  # the two-party run the model comes from: the publisher's model must share it
    sizes: dict[str, Any] | None  # the network sizes, which the publisher's tower must match

    @property
    def federated(self) -> bool:
        return self.split is not None


def model_path(config: ServeConfig) -> Path:
    """``--model``, or the previous command's default output (the split model with a publisher)."""
    if config.model is not None:
        return config.model
    return default_output("split.safetensors" if config.rendezvous else "local.safetensors")


def load_served(config: ServeConfig, device: torch.device) -> ServedModel:
    """Load ``--model`` (and its fallback); a split model needs a publisher (``--rendezvous``)."""
    path = model_path(config)
    artifact = load_artifact(path, (LOCAL, SPLIT))
    if artifact.kind == LOCAL:
        if config.fallback is not None:
            raise UserError(f"--fallback: {path} is a local model already; it answers every row itself")
        local = ServingLocal.of(local_from(artifact)).to(device).eval()
        schema = _active_schema(artifact)
        return ServedModel(path, artifact.sha256 or "", LOCAL, schema, local, "student", None, None, None)
    if config.rendezvous is None:
        raise UserError(
            f"--model {path}: a split model needs the publisher: give --rendezvous (where the publisher "
            "connects), or serve the distilled vfl.local model alone"
        )
    artifact = load_for_party(path, SPLIT, "active", "--model")
    split = ServingSplit(split_from(artifact)).to(device).eval()
    local, local_name = _fallback(config, artifact, split, device)
    return ServedModel(
        path, artifact.sha256 or "", SPLIT, _active_schema(artifact), local, local_name, split,
        run_id_of(artifact), model_config_of(artifact).to_dict(),
    )  # fmt: skip


def _active_schema(artifact: Artifact) -> PartySchema:
    return schemas_of(artifact)["active"]


def _fallback(
    config: ServeConfig, artifact: Artifact, split: ServingSplit, device: torch.device
) -> tuple[ServingLocal, str]:
    """The student for rows the publisher does not answer, as ``vfl score`` chooses it."""
    path = fallback_path(config.fallback, model_path(config), artifact.sha256)
    if path is None:
        untrained_local_branch(artifact, model_path(config), "give --fallback (a vfl.local model)")
        return split, "split local branch"
    student, student_artifact = load_local(path)
    if student_artifact.extra["schema"]["active"] != artifact.extra["schema"]["active"]:
        raise UserError(
            f"--fallback {path}: this model's feature schema differs from the split model's; "
            "use a student distilled from that split model"
        )
    return ServingLocal.of(student).to(device).eval(), f"student {path}"


def check_reload(current: ServedModel, new: ServedModel) -> None:
    """Refuse a reload the running server cannot take without dropping its publisher link."""
    if current.kind != new.kind:
        raise UserError(
            f"{new.path}: a {new.kind} model cannot replace the running {current.kind} model; restart"
        )
    if (current.run_id, current.sizes) != (new.run_id, new.sizes):
        raise UserError(
            f"{new.path}: this split model is from another two-party run or has other sizes than the one "
            "the publisher serves; restart both parties with the new pair"
        )
