"""FT-L and FT-M: fine-tune one MLP weight on the edits themselves (EasyEdit's baselines).

The weight change is a leaf of its own (the base model is never touched), optimised
with Adam through a functional call of the model, so the same code edits a model
already carrying earlier edits (sequential protocol) and returns an update that the
shared protocol sums like any other method's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from kedit_vfl.edit.algs.base import WeightMethod
from kedit_vfl.edit.config import FTConfig
from kedit_vfl.edit.data.records import EditRecord
from kedit_vfl.edit.editor.batches import Prompter, edit_batch
from kedit_vfl.edit.editor.network import forward_with
from kedit_vfl.edit.models.base import BaseModel
from kedit_vfl.edit.models.tokens import TokenBatch, target_logprobs
from kedit_vfl.errors import UserError


def target_new_loss(logits: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
    """FT-M: each edit's mean NLL over its target tokens (teacher-forced), averaged."""
    logp, mask = target_logprobs(logits, batch)
    return (-logp.sum(1) / mask.sum(1).clamp(min=1)).mean()


def prompt_last_loss(logits: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
    """FT-L: the last prompt token's distribution scored on every target token, averaged."""
    mask = batch.predict_mask  # (B, T): positions predicting a target token
    first = mask.float().argmax(1)  # the last prompt token predicts the first target token
    rows = torch.arange(len(first), device=first.device)
    logp = torch.log_softmax(logits[rows, first].float(), dim=-1)  # (B, V)
    labels = batch.labels[:, 1:]
    picked = logp.gather(1, labels.clamp(min=0)) * (labels != -100)  # (B, T-1)
    return (-picked.sum(1) / (labels != -100).sum(1).clamp(min=1)).mean()


LOSSES = {"target_new": target_new_loss, "prompt_last": prompt_last_loss}


class FineTune(WeightMethod):
    """FT-L or FT-M on the chosen weights (see :class:`FTConfig`)."""

    def __init__(self, name: str, config: FTConfig) -> None:
        self.name, self.config = name, config
        self.prompter = self.queries = Prompter(None)  # fine-tuning knows no instructions

    def weights(self, base: BaseModel) -> list[str]:
        """Parameter names tuned: ``config.layers``, or the last edited MLP output weight."""
        if not self.config.layers:
            return [base.targets[-1].param]
        names = dict(base.model.named_parameters())
        chosen = [
            f"{layer}.weight" if not layer.endswith(".weight") else layer for layer in self.config.layers
        ]
        missing = [c for c in chosen if c not in names]
        if missing:
            raise UserError(f"{self.name} layers: {', '.join(missing)} not in {base.source}")
        return chosen

    def updates(
        self,
        base: BaseModel,
        records: Sequence[EditRecord],
        params: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        config, loss_of = self.config, LOSSES[self.config.objective]
        batch = edit_batch(records, self.prompter, base.tokenizer, base.max_length).to(base.device)
        own = dict(base.model.named_parameters())
        fixed = {k: v.detach() for k, v in (params or {}).items()}
        names = self.weights(base)
        start = {n: fixed.get(n, own[n]).detach().float() for n in names}
        deltas = {n: torch.zeros_like(w, requires_grad=True) for n, w in start.items()}
        optimizer = torch.optim.Adam(list(deltas.values()), lr=config.lr)
        with torch.enable_grad():
            for _ in range(config.steps):
                tuned = {n: (start[n] + deltas[n]).to(own[n].dtype) for n in names}
                loss = loss_of(forward_with(base.model, {**fixed, **tuned}, batch.model_inputs()), batch)
                if loss.item() < config.stop_loss:
                    break
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if config.norm_constraint > 0:
                    with torch.no_grad():
                        for delta in deltas.values():
                            delta.clamp_(-config.norm_constraint, config.norm_constraint)
        return {n: d.detach() for n, d in deltas.items()}
