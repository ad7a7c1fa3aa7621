"""InstructEdit and MEND: a trained editor turns the edit's gradient into an update.

InstructEdit is the editor trained and applied with task instructions; MEND (Mitchell et
al., 2022) is the same editor trained with ``--no-instructions`` and applied to plain
prompts, so the two differ only in the instruction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from kedit_vfl.edit.algs.base import WeightMethod
from kedit_vfl.edit.data.records import EditRecord
from kedit_vfl.edit.editor.batches import Prompter, edit_batch
from kedit_vfl.edit.editor.network import Editor, edit_gradients
from kedit_vfl.edit.models.base import BaseModel


class HypernetworkEdit(WeightMethod):
    """A trained :class:`Editor` applied with its prompter."""

    def __init__(
        self, name: str, editor: Editor, prompter: Prompter, queries: Prompter | None = None
    ) -> None:
        self.name, self.editor, self.prompter = name, editor, prompter
        self.queries = prompter if queries is None else queries

    @torch.no_grad()
    def updates(
        self,
        base: BaseModel,
        records: Sequence[EditRecord],
        params: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        batch = edit_batch(records, self.prompter, base.tokenizer, base.max_length).to(base.device)
        self.editor.eval()
        return self.editor(edit_gradients(base.model, base.targets, batch, params))
