"""VFL artifacts: what each kind holds, and rebuilding a model from one.

Every VFL artifact keeps, besides its weights, the feature schema (columns and their
training transform) and the network sizes in ``extra``, so a later stage rebuilds the
model exactly and refuses a table that does not fit it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from kedit_vfl.artifacts import Artifact, config_to_dict, load_artifact, make_provenance, save_artifact
from kedit_vfl.vfl.data import PartySchema, schemas_from_dict, schemas_to_dict
from kedit_vfl.vfl.model import LocalModel, ModelConfig, SplitModel, load_prefixed, state_with_prefix

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
) -> Artifact:
    """Write one VFL artifact atomically to ``config.out``."""
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
            "party": "both" if "passive" in schemas else "active",
            "schema": schemas_to_dict(schemas),
            "model": model_config.to_dict(),
            "metrics": metrics,
            **(extra or {}),
        },
    )
    save_artifact(artifact, config.out)
    return artifact


def schemas_of(artifact: Artifact) -> dict[str, PartySchema]:
    return schemas_from_dict(artifact.extra["schema"])


def model_config_of(artifact: Artifact) -> ModelConfig:
    return ModelConfig(**artifact.extra["model"])


def split_from(artifact: Artifact) -> SplitModel:
    """The split model a ``vfl.split`` artifact holds, in eval mode."""
    model = SplitModel(schemas_of(artifact), model_config_of(artifact))
    for prefix in ("tower_a", "tower_b", "local_head", "fed_head"):
        load_prefixed(getattr(model, prefix), artifact.tensors, prefix)
    return model.eval()


def local_from(artifact: Artifact) -> LocalModel:
    """The student a ``vfl.local`` artifact holds, in eval mode."""
    model = LocalModel(schemas_of(artifact)["active"], model_config_of(artifact))
    for prefix in ("tower_a", "local_head"):
        load_prefixed(getattr(model, prefix), artifact.tensors, prefix)
    return model.eval()


def load_split(path: Path) -> tuple[SplitModel, Artifact]:
    artifact = load_artifact(path, SPLIT)
    return split_from(artifact), artifact


def load_local(path: Path) -> tuple[LocalModel, Artifact]:
    artifact = load_artifact(path, LOCAL)
    return local_from(artifact), artifact
