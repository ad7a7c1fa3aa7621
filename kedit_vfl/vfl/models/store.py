"""VFL artifacts: what each kind holds, and rebuilding a model from one.

Every VFL artifact keeps, besides its weights, the feature schema (columns and their
training transform) and the network sizes in ``extra``, so a later stage rebuilds the
model exactly and refuses a table that does not fit it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kedit_vfl.artifacts import Artifact, config_to_dict, load_artifact, make_provenance, save_artifact
from kedit_vfl.errors import UserError
from kedit_vfl.metadata import typed
from kedit_vfl.vfl.config import OBJECTIVES
from kedit_vfl.vfl.data.schema import PartySchema, schemas_to_dict
from kedit_vfl.vfl.models.networks import (
    ActiveSplit,
    LocalModel,
    ModelConfig,
    SplitModel,
    load_prefixed,
    state_with_prefix,
)

MPD, SPLIT, LOCAL = "vfl.mpd", "vfl.split", "vfl.local"


def save_vfl(
    kind: str,
    modules: dict[str, nn.Module],
    config: Any,
    schemas: dict[str, PartySchema],
    model_config: ModelConfig,
    command: str,
    metrics: dict[str, Any],
    parents: tuple[Artifact, ...] = (),
    data: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
    party: str | None = None,
) -> Artifact:
    """Write one VFL artifact atomically to ``config.out``.

    ``party`` says whose weights it holds: ``both`` (the in-process simulation),
    ``active`` or ``passive`` (one side of a two-party run).
    """
    tensors = {}
    for prefix, module in modules.items():
        tensors.update(state_with_prefix(module, prefix))
    settings = config_to_dict(config)
    artifact = Artifact(
        kind=kind,
        tensors=tensors,
        config=settings,
        provenance=make_provenance(command, settings, parents=parents, data=data, seed=settings.get("seed")),
        extra={
            "party": party or ("both" if "passive" in schemas and "active" in schemas else "active"),
            "schema": schemas_to_dict(schemas),
            "model": model_config.to_dict(),
            "metrics": metrics,
            **(extra or {}),
        },
    )
    save_artifact(artifact, config.out)
    return artifact


PARTIES = ("both", "active", "passive")


def party_of(artifact: Artifact) -> str:
    """Whose weights the artifact holds (``both`` for artifacts older than two-party runs)."""
    holds = artifact.extra.get("party", "both")
    if holds not in PARTIES:
        raise UserError(f"{artifact.path}: artifact metadata is malformed (party {str(holds)[:20]!r})")
    return holds


def schemas_of(artifact: Artifact) -> dict[str, PartySchema]:
    """The feature schemas, every field's type and length checked against the others."""
    raw, where = artifact.extra.get("schema"), artifact.path
    if not isinstance(raw, dict) or not raw or not set(raw) <= {"active", "passive"}:
        raise UserError(f"{where}: artifact metadata is malformed (no feature schema per party)")
    schemas = {role: typed(PartySchema, value, str(where), f"schema.{role}") for role, value in raw.items()}
    for role, schema in schemas.items():
        if not len(schema.numeric) == len(schema.mean) == len(schema.std) or not (
            len(schema.categorical) == len(schema.vocab) == len(schema.hash_buckets)
        ):
            raise UserError(
                f"{where}: artifact metadata is malformed (schema.{role}: lists of unequal length)"
            )
        if any(b < 0 for b in schema.hash_buckets) or not all(
            math.isfinite(x) for x in schema.mean + schema.std
        ):
            raise UserError(f"{where}: artifact metadata is malformed (schema.{role}: values out of range)")
    party = party_of(artifact)
    needed = ("active", "passive") if party == "both" else (party,)
    if not set(needed) <= set(schemas):
        raise UserError(f"{where}: artifact metadata is malformed (no {' or '.join(needed)} feature schema)")
    return schemas


def model_config_of(artifact: Artifact) -> ModelConfig:
    """The network sizes that built the artifact's weights, type-checked."""
    raw = artifact.extra.get("model")
    if isinstance(raw, dict) and "wide" not in raw:  # made before the linear path existed
        raw = {**raw, "wide": False}
    return typed(ModelConfig, raw, str(artifact.path), "model")


def mpd_settings(artifact: Artifact) -> tuple[float, int, str]:
    """The temperature, negatives and objective a ``vfl.mpd`` artifact's head was trained with."""
    config = artifact.config
    temperature = config.get("mpd_temperature", 0.2)
    negatives, objective = config.get("negatives", 16), config.get("objective", "infonce")
    if (
        not isinstance(temperature, int | float)
        or isinstance(temperature, bool)
        or not 0 < temperature < math.inf
        or not isinstance(negatives, int)
        or isinstance(negatives, bool)
        or negatives < 0
        or objective not in OBJECTIVES
    ):
        raise UserError(f"{artifact.path}: artifact metadata is malformed (config: matching head settings)")
    return float(temperature), negatives, objective


def protection_clip(artifact: Artifact) -> float:
    """The embedding clip a split model was trained with (0: none)."""
    protection = artifact.extra.get("protection", {})
    clip = protection.get("clip", 0.0) if isinstance(protection, dict) else None
    if not isinstance(clip, int | float) or isinstance(clip, bool) or not 0 <= clip < math.inf:
        raise UserError(f"{artifact.path}: artifact metadata is malformed (protection.clip)")
    return float(clip)


def load_weights(artifact: Artifact, module: nn.Module, prefix: str) -> None:
    """Load ``prefix.*`` of the artifact into ``module``; a mismatch names the file."""
    try:
        load_prefixed(module, artifact.tensors, prefix)
    except UserError as exc:
        raise UserError(f"{artifact.path}: {exc}") from exc


def _load_weights(artifact: Artifact, model: nn.Module, prefixes: tuple[str, ...]) -> None:
    for prefix in prefixes:
        load_weights(artifact, getattr(model, prefix), prefix)


def split_from(artifact: Artifact) -> ActiveSplit:
    """The split model a ``vfl.split`` artifact holds, in eval mode: with the passive
    tower (a :class:`SplitModel`) when the artifact has it, else the active part."""
    schemas, config = schemas_of(artifact), model_config_of(artifact)
    both = "passive" in schemas
    with torch.random.fork_rng(devices=[]):  # loading draws no random numbers a run depends on
        model = SplitModel(schemas, config) if both else ActiveSplit(schemas, config)
    _load_weights(artifact, model, ("tower_a", "local_head", "fed_head", *(("tower_b",) if both else ())))
    return model.eval()


def load_for_party(path: Path, kinds: str | tuple[str, ...], party: str, option: str) -> Artifact:
    """Load an artifact and check it belongs to this process's party."""
    artifact = load_artifact(path, kinds)
    holds = party_of(artifact)
    if holds == party:
        return artifact
    if holds == "both":
        raise UserError(
            f"{option} {path}: an in-process artifact (both parties' weights in one file); "
            "a two-party run starts from the artifacts each party wrote in an earlier two-party run"
        )
    if party == "both":
        raise UserError(
            f"{option} {path}: holds only the {holds} party's part of a two-party run; "
            f"use it with --party {holds} (and the other party's file on the other side)"
        )
    raise UserError(f"{option} {path}: belongs to the {holds} party, but this process is the {party} party")


def two_party_extra(side: Any) -> dict[str, Any]:
    """What an artifact of a two-party run records about the pairing: the run id both
    parties' artifacts share, and the other party's artifact checksum."""
    if side.session is None:
        return {}
    peer = getattr(side.link.endpoint, "result", {}) or {}
    return {"run_id": side.run_id, "peer_sha256": peer.get("sha256")}


def run_id_of(artifact: Artifact | None) -> str | None:
    return artifact.extra.get("run_id") if artifact is not None else None


def local_from(artifact: Artifact) -> LocalModel:
    """The student a ``vfl.local`` artifact holds, in eval mode."""
    with torch.random.fork_rng(devices=[]):
        model = LocalModel(schemas_of(artifact)["active"], model_config_of(artifact))
    _load_weights(artifact, model, ("tower_a", "local_head"))
    return model.eval()


def load_split(path: Path) -> tuple[ActiveSplit, Artifact]:
    artifact = load_artifact(path, SPLIT)
    return split_from(artifact), artifact


def load_local(path: Path) -> tuple[LocalModel, Artifact]:
    artifact = load_artifact(path, LOCAL)
    return local_from(artifact), artifact
