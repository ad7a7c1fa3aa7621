"""A side memory of edits: the trained editor's updates, each applied only to the inputs
routed to it (the remedy of GRACE and WISE for long sequences and large batches).

Each edit is stored as its key (the unedited model's input to the first edited layer
at the last prompt token, standardised with the editor's own statistics and scaled to
unit length) and its update as low-rank factors (``-alpha delta~^T``, ``x~``), computed on
the unedited model. A scored row goes to the edit whose key is nearest in cosine, if
the similarity is at least the threshold, and is run with that edit's update alone;
every other row runs the base model. Edits therefore never add up: the hundredth edit
sees the model the first one saw, and an unrelated prompt sees the base model.

The threshold is chosen on records that are not scored (:func:`calibrate_threshold`:
a validation split): the loosest that routes few unrelated prompts to an edit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kedit_vfl.edit.data.records import EditRecord
from kedit_vfl.edit.editor.batches import Prompter, edit_batch
from kedit_vfl.edit.editor.conditioning import editor_batch
from kedit_vfl.edit.editor.network import Editor, edit_gradients, forward_with
from kedit_vfl.edit.models.base import BaseModel
from kedit_vfl.edit.models.tokens import TokenBatch, encode_pairs

DEFAULT_THRESHOLD = 0.95  # cosine; used only when the validation records cannot calibrate it


@dataclass
class MemoryEdits:
    """The side memory: one key and one factored update per edit."""

    keys: torch.Tensor | None = None  # (M, d), one row per edit
    factors: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=list)
    method: MemoryEdit | None = None

    @torch.no_grad()
    def logits(self, base: BaseModel, batch: TokenBatch) -> torch.Tensor:
        assert self.method is not None
        pre, keys = self.method.keys_and_logits(base, batch)
        if self.keys is None:
            return pre
        best, routed = self.method.route(keys, self.keys)
        out = pre.clone()
        inputs = batch.model_inputs()
        for edit in best[routed].unique().tolist():
            rows = torch.nonzero(routed & (best == edit)).squeeze(1)
            params = self.method.params_of(base, self.factors[edit])
            out[rows] = forward_with(base.model, params, {k: v[rows] for k, v in inputs.items()})
        return out


class MemoryEdit:
    """The editor's updates kept in a routed side memory (see the module docstring)."""

    def __init__(
        self, name: str, editor: Editor, prompter: Prompter, threshold: float, queries: Prompter | None = None
    ) -> None:
        self.name, self.editor, self.prompter, self.threshold = name, editor, prompter, threshold
        self.queries = prompter if queries is None else queries

    def start(self, base: BaseModel) -> MemoryEdits:
        return MemoryEdits(method=self)

    @torch.no_grad()
    def add(self, base: BaseModel, edited: MemoryEdits, records: Sequence[EditRecord]) -> MemoryEdits:
        batch, conditions = editor_batch(self.editor, base, records, self.prompter)
        # the batch the editor reads is the one the queries ask when both are instructed
        # alike, or both plain (a conditioned editor reads the plain prompt)
        asked_like_batch = self.queries is self.prompter if conditions is None else self.queries.pools is None
        if asked_like_batch:
            _, keys = self.keys_and_logits(base, batch)
        else:  # keys where the queries will be: the edit prompts as they are asked
            asked = edit_batch(records, self.queries, base.tokenizer, base.max_length).to(base.device)
            _, keys = self.keys_and_logits(base, asked)
        grads = edit_gradients(base.model, base.targets, batch)  # always the unedited model
        self.editor.eval()
        factors: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = [{} for _ in records]
        for i, target in enumerate(self.editor.targets):
            x_t, delta_t = self.editor.transformed(i, grads[target.module], conditions)
            owner = grads[target.module].edit_index
            for r in range(len(records)):
                mine = owner == r
                left = (-self.editor.alpha[i] * delta_t[mine]).T.contiguous()  # (d_out, T_r)
                factors[r][target.param] = (left, x_t[mine].contiguous())  # (T_r, d_in)
        stored = keys if edited.keys is None else torch.cat([edited.keys, keys])
        return MemoryEdits(stored, [*edited.factors, *factors], self)

    def keys_and_logits(self, base: BaseModel, batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The unedited model's logits, and each row's key (B, d), from one forward pass."""
        first = self.editor.targets[0]
        captured: dict[str, torch.Tensor] = {}
        module = dict(base.model.named_modules())[first.module]
        handle = module.register_forward_hook(lambda m, args, out: captured.__setitem__("x", args[0]))
        try:
            logits = forward_with(base.model, None, batch.model_inputs())
        finally:
            handle.remove()
        x = captured["x"]
        x = x if x.dim() == 3 else x.reshape(*batch.input_ids.shape, -1)  # OPT runs MLPs on (B*T, d)
        last_prompt = batch.predict_mask.float().argmax(1)  # the token that predicts the first target
        rows = torch.arange(len(last_prompt), device=last_prompt.device)
        keys = self.editor.x_norms[0](x[rows, last_prompt].float())
        return logits, F.normalize(keys, dim=-1)

    def route(self, keys: torch.Tensor, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's nearest edit (the latest among equals) and whether it is near enough."""
        similarity = keys @ memory.T  # (B, M)
        flipped = similarity.flip(1)
        best = memory.shape[0] - 1 - flipped.argmax(1)
        return best, flipped.max(1).values >= self.threshold

    def params_of(
        self, base: BaseModel, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        own = dict(base.model.named_parameters())
        out = {}
        for target in self.editor.targets:
            left, right = factors[target.param]
            update = left @ right  # (d_out, d_in)
            weight = own[target.param]
            out[target.param] = (weight.float() + (update.T if target.transposed else update)).to(
                weight.dtype
            )
        return out


@torch.no_grad()
def calibrate_threshold(
    editor: Editor,
    base: BaseModel,
    prompter: Prompter,
    records: Sequence[EditRecord],
    background: Sequence[EditRecord] = (),
    memory_edits: int = 0,
    unrelated: float = 0.05,
) -> dict[str, float | None]:
    """The loosest similarity threshold that routes at most the share ``unrelated`` of
    unrelated (locality) prompts to an edit, on ``records`` (never the scored ones), with
    the share of rephrasings it routes to their own edit and the unrelated share it routes.

    Locality is the constraint: a misrouted prompt gets an edit it never asked for. The
    balanced-accuracy cut used up to 0.2 routed a quarter of the embedded world's
    unrelated prompts once keyed on plain prompts, and a sequence of its 97 test edits
    then kept Locality 0.75 (docs/edit.md).

    The more edits a memory holds, the likelier an unrelated prompt finds one near it;
    so the memory calibrated against holds ``memory_edits`` keys: ``records``' own, then
    ``background`` records' (the training split) up to that size.
    """
    method = MemoryEdit("memory", editor, prompter, threshold=1.0)
    if not records:
        return {"threshold": DEFAULT_THRESHOLD, "rephrase_routed": None, "unrelated_routed": None}
    extra = list(background)[: max(0, memory_edits - len(records))]
    stored = [(prompter(r, r.prompt), r.target_new) for r in [*records, *extra]]
    keys = _keys(method, base, stored)
    # a locality prompt that is itself an edit in the memory is that edit's, not unrelated
    edited_prompts = {prompt for prompt, _ in stored}
    positives, negatives = [], []
    for i, record in enumerate(records):
        if record.rephrase:
            own = _keys(method, base, [(prompter(record, q), record.target_new) for q in record.rephrase])
            similarity = own @ keys.T
            # a rephrasing counts only when its own edit is the nearest one
            nearest = similarity.argmax(1) == i
            positives.extend(
                torch.where(nearest, similarity[:, i], torch.full_like(similarity[:, i], -1)).tolist()
            )
        unrelated_pairs = [(p.prompt, p.answer) for p in record.locality if p.prompt not in edited_prompts]
        if unrelated_pairs:
            other = _keys(method, base, unrelated_pairs)
            negatives.extend((other @ keys.T).max(1).values.tolist())
    if not positives or not negatives:  # nothing to tell apart: a strict default
        return {"threshold": DEFAULT_THRESHOLD, "rephrase_routed": None, "unrelated_routed": None}
    pos, neg = torch.tensor(positives), torch.tensor(negatives)
    threshold = loosest_threshold(neg, unrelated)
    return {
        "threshold": threshold,
        "rephrase_routed": float((pos >= threshold).float().mean()),
        "unrelated_routed": float((neg >= threshold).float().mean()),
        "memory_edits": len(keys),
    }


MAX_THRESHOLD = 0.9999  # an edit's own prompt (similarity 1 up to rounding) always routes


def loosest_threshold(unrelated_similarity: torch.Tensor, share: float) -> float:
    """The lowest threshold that at most ``share`` of these similarities reach: just above
    the one ranked ``floor(share * n)`` from the top (ties there are all excluded), and
    never above :data:`MAX_THRESHOLD`."""
    ordered = unrelated_similarity.sort(descending=True).values
    return min(float(ordered[int(share * len(ordered))]) + 1e-6, MAX_THRESHOLD)


def _keys(method: MemoryEdit, base: BaseModel, pairs: list[tuple[str, str]]) -> torch.Tensor:
    batch = encode_pairs(base.tokenizer, [p for p, _ in pairs], [t for _, t in pairs], base.max_length)
    return method.keys_and_logits(base, batch.to(base.device))[1]
