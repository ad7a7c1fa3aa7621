"""What every editing method provides to the shared evaluation protocol."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import torch

from kedit_vfl.edit.data.records import EditRecord
from kedit_vfl.edit.editor.batches import Prompter
from kedit_vfl.edit.models.base import BaseModel


class EditMethod(Protocol):
    """An editing method: a name, how it writes prompts, and the updates of a batch."""

    name: str
    prompter: Prompter  # the prompts it edits and is scored on (instructed or plain)

    def updates(
        self,
        base: BaseModel,
        records: Sequence[EditRecord],
        params: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Weight updates (parameter name -> delta, in the weight's layout) that make the
        model with ``params`` (None: the base weights) state every record's new target."""
        ...
