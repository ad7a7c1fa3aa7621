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
from kedit_vfl.edit.editor.batches import Prompter
from kedit_vfl.edit.editor.conditioning import editor_batch
from kedit_vfl.edit.editor.network import Editor, edit_gradients
from kedit_vfl.edit.models.base import BaseModel
from kedit_vfl.edit.models.hooks import concat_grads

EDITS_PER_PASS = 32  # edits sharing one forward/backward pass (memory and speed only)


@torch.no_grad()
def compute_update(
    editor: Editor,
    base: BaseModel,
    records: Sequence[EditRecord],
    prompter: Prompter,
    params: Mapping[str, torch.Tensor] | None = None,
    chunk: int = EDITS_PER_PASS,
) -> dict[str, torch.Tensor]:
    """The editor's weight update for all ``records`` together, on the model with ``params``.

    Gradients are captured ``chunk`` edits per pass, then the editor combines every edit
    at once (``EditorConfig.aggregate``), so ``chunk`` never changes the result.
    """
    if not records:
        return {}
    parts, sizes, conditions = [], [], []
    for start in range(0, len(records), chunk):
        group = records[start : start + chunk]
        batch, condition = editor_batch(editor, base, group, prompter)
        parts.append(edit_gradients(base.model, base.targets, batch, params))
        sizes.append(len(group))
        conditions.append(condition)
    editor.eval()
    grads = parts[0] if len(parts) == 1 else concat_grads(parts, sizes)
    return editor(grads, conditions=torch.cat(conditions) if conditions[0] is not None else None)


class HypernetworkEdit(WeightMethod):
    """A trained :class:`Editor` applied with its prompter."""

    def __init__(
        self, name: str, editor: Editor, prompter: Prompter, queries: Prompter | None = None
    ) -> None:
        self.name, self.editor, self.prompter = name, editor, prompter
        self.queries = prompter if queries is None else queries

    def updates(
        self,
        base: BaseModel,
        records: Sequence[EditRecord],
        params: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        return compute_update(self.editor, base, records, self.prompter, params)
