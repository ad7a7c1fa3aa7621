"""What every editing method provides to the shared evaluation protocol.

A method starts from the unedited model (:meth:`EditMethod.start`) and adds edits to
an :class:`Edited` state, all of a batch together or one after another; the protocol
scores any state through :meth:`Edited.logits`. Methods that change weights
(:class:`WeightMethod`) only compute updates: their state is the summed update, and a
batch's updates are all computed on the weights the state started from.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Protocol

import torch

from kedit_vfl.edit.data.records import EditRecord
from kedit_vfl.edit.editor.batches import Prompter
from kedit_vfl.edit.editor.network import edited_params, forward_with, merge_updates
from kedit_vfl.edit.models.base import BaseModel
from kedit_vfl.edit.models.tokens import TokenBatch


class Edited(Protocol):
    """The model after some edits, as the protocol scores it."""

    def logits(self, base: BaseModel, batch: TokenBatch) -> torch.Tensor:
        """(B, T, V) logits of the edited model on ``batch``."""
        ...


class EditMethod(Protocol):
    """An editing method: a name, how it writes prompts, and how it adds edits."""

    name: str
    prompter: Prompter  # the prompts it edits with (instructed or plain)
    queries: Prompter  # the prompts it is scored on: what is asked of the edited model

    def start(self, base: BaseModel) -> Edited: ...

    def add(self, base: BaseModel, edited: Edited, records: Sequence[EditRecord]) -> Edited:
        """``edited`` with ``records`` added, all together (one batch)."""
        ...


class WeightEdits:
    """A weight-editing method's state: the summed update of every edit so far."""

    def __init__(self, updates: Mapping[str, torch.Tensor] | None = None) -> None:
        self.updates = dict(updates or {})

    def params(self, base: BaseModel) -> dict[str, torch.Tensor] | None:
        return edited_params(base.model, self.updates) if self.updates else None

    @torch.no_grad()
    def logits(self, base: BaseModel, batch: TokenBatch) -> torch.Tensor:
        return forward_with(base.model, self.params(base), batch.model_inputs())


class WeightMethod(ABC):
    """Shared part of the methods that change weights: subclasses give :meth:`updates`."""

    name: str
    prompter: Prompter
    queries: Prompter

    @abstractmethod
    def updates(
        self,
        base: BaseModel,
        records: Sequence[EditRecord],
        params: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Weight updates (parameter name -> delta, in the weight's layout) that make the
        model with ``params`` (None: the base weights) state every record's new target."""

    def start(self, base: BaseModel) -> WeightEdits:
        return WeightEdits()

    def add(self, base: BaseModel, edited: Edited, records: Sequence[EditRecord]) -> WeightEdits:
        assert isinstance(edited, WeightEdits)
        update = self.updates(base, records, edited.params(base))
        return WeightEdits(merge_updates(edited.updates, update))
