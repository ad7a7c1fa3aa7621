"""``kvtool vfl audit``: what the publisher could learn from the gradients it received.

The publisher runs the attacks of :mod:`kedit_vfl.vfl.privacy.leakage` on its own
record (``train-split --record-received``). It has no labels, so by itself it sees:

- how many gradients reached it, per user;
- how concentrated they are along one direction, against the same figure for noise
  of the same shape (label-driven gradients of binary labels lie along one direction,
  one sign per class; defended ones look like the noise);
- the attacker's guess per user (``--scores``): the users it would call the rare class.

Given labels (``--labels``: for instance the advertiser's, in a joint review, or a
test set), it also scores the attacks: the attacker's best AUC, as ``train-split --audit``
reports it in one process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import torch

from kedit_vfl.artifacts import atomic_write
from kedit_vfl.errors import UserError
from kedit_vfl.vfl.config import AuditConfig
from kedit_vfl.vfl.data.read import open_table
from kedit_vfl.vfl.privacy.leakage import (
    attack_auc,
    attack_scores,
    concentration,
    noise_concentration,
)
from kedit_vfl.vfl.privacy.received import read_received


def audit(config: AuditConfig) -> dict[str, Any]:
    """The summary of what the record shows; with ``config.scores``, the per-user scores too."""
    received = read_received(config.record)
    n, width = received.first.shape
    result: dict[str, Any] = {
        "record": str(config.record),
        "run_id": received.meta.get("run_id"),
        "rows_received": n,
        "gradients_received": int(received.gradients.sum()),
        "gradients_per_row": float(received.gradients.double().mean()) if n else None,
    }
    if n == 0:
        result["verdict"] = "no gradient reached the publisher: nothing about the labels crossed"
        return result
    share, noise = concentration(received.total), noise_concentration(n, width, config.seed)
    scores = attack_scores(received.first, received.total)
    guessed = scores["direction_total"] > 0
    result.update(
        {
            "concentration": share,
            "concentration_of_noise": noise,
            "rows_guessed_rare_class": int(guessed.sum()),
        }
    )
    if config.labels is not None:
        result.update(_scored(config, received.ids, scores))
    result["verdict"] = _verdict(result)
    if config.scores is not None:
        _write_scores(config.scores, received.ids, received.gradients, scores)
        result["scores"] = str(config.scores)
    return result


def _scored(config: AuditConfig, ids: list[str], scores: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The attacks' best AUCs against the given labels, on the users found in both."""
    assert config.labels is not None
    source = open_table(config.labels, "labels")
    for column in (config.id_col, config.label_col):
        source.require_column(column, "--id-col" if column == config.id_col else "--label-col")
    table = source.read_all([config.id_col, config.label_col])
    labels = table.column(config.label_col)
    if not (pa.types.is_integer(labels.type) or pa.types.is_floating(labels.type)):
        raise UserError(f"{config.labels}: column '{config.label_col}' is not numeric (0/1 labels)")
    table = table.filter(pc.is_valid(labels))
    known = dict(
        zip(
            table.column(config.id_col).cast(pa.string()).to_pylist(),
            table.column(config.label_col).cast(pa.float64()).to_pylist(),
            strict=True,
        )
    )
    values = set(known.values())
    if not values <= {0.0, 1.0}:
        raise UserError(f"{config.labels}: column '{config.label_col}' holds values other than 0 and 1")
    where = [i for i, key in enumerate(ids) if key in known]
    if not where:
        raise UserError(f"{config.labels}: none of the record's users has a label here (check --id-col)")
    y = torch.tensor([known[ids[i]] for i in where])
    picked = {name: s[torch.tensor(where)] for name, s in scores.items()}
    aucs = {name: attack_auc(s, y) for name, s in picked.items()}
    accumulated = [a for a in (aucs["norm_total"], aucs["direction_total"]) if a is not None]
    return {
        "rows_labelled": len(where),
        "attack_auc": {
            "norm": aucs["norm_first"],
            "direction": aucs["direction_first"],
            "accumulated": max(accumulated) if accumulated else None,
        },
    }


def _verdict(result: dict[str, Any]) -> str:
    attack = result.get("attack_auc")
    if attack is not None and attack["accumulated"] is not None:
        best = attack["accumulated"]
        if best >= 0.9:
            return f"the gradients give the labels away (attack AUC {best:.3f})"
        if best > 0.6:
            return f"the gradients reveal part of the labels (attack AUC {best:.3f})"
        return f"the gradients reveal little of the labels (attack AUC {best:.3f}; 0.5 = nothing)"
    share, noise = result["concentration"], result["concentration_of_noise"]
    if share > max(0.5, 2 * noise):
        return (
            f"the gradients lie along one direction ({share:.2f} of their energy; noise: {noise:.2f}): "
            "they likely split the users by label; score them with --labels to know"
        )
    return (
        f"the gradients look like noise ({share:.2f} of their energy along one direction; noise: {noise:.2f})"
    )


def _write_scores(
    path: Path, ids: list[str], gradients: torch.Tensor, scores: dict[str, torch.Tensor]
) -> None:
    columns = {"id": pa.array(ids, pa.string()), "gradients": pa.array(gradients.numpy(), pa.int64())}
    for name, values in scores.items():
        columns[name] = pa.array(values.double().numpy().astype(np.float64))
    columns["guessed_rare_class"] = pa.array((scores["direction_total"] > 0).numpy())
    table = pa.table(columns)
    atomic_write(path, lambda tmp: pacsv.write_csv(table, tmp))
