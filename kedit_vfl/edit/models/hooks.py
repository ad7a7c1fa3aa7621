"""Capture each edited layer's input ``x`` and output gradient ``delta`` on target tokens.

The weight gradient of a linear layer is ``sum_t delta_t x_t^T``; the editor never
sees that matrix, only its factors. A forward hook records ``x`` and the layer output;
:meth:`Capture.backward` takes the gradient of the loss at those outputs directly
(``torch.autograd.grad``), so no weight gradient is ever computed. Everything is
detached: the editor gets no second-order terms through the base model.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kedit_vfl.edit.models.base import EditTarget


@dataclass
class LayerGrads:
    """Factors of one layer's weight gradient on the selected tokens."""

    x: torch.Tensor  # (N, d_in)
    delta: torch.Tensor  # (N, d_out)
    edit_index: torch.Tensor  # (N,) which edit of the batch each token belongs to


def concat_grads(parts: Sequence[Mapping[str, LayerGrads]], sizes: Sequence[int]) -> dict[str, LayerGrads]:
    """The factors of one batch of edits captured in chunks of ``sizes`` edits each."""
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    return {
        name: LayerGrads(
            x=torch.cat([p[name].x for p in parts]),
            delta=torch.cat([p[name].delta for p in parts]),
            edit_index=torch.cat([p[name].edit_index + o for p, o in zip(parts, offsets, strict=True)]),
        )
        for name in parts[0]
    }


@dataclass
class Capture:
    """Filled by :func:`capture`; call :meth:`backward` once with the loss and the token mask."""

    names: list[str]
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    grads: dict[str, LayerGrads] = field(default_factory=dict)

    def backward(self, loss: torch.Tensor, mask: torch.Tensor) -> dict[str, LayerGrads]:
        """Gradients at the layer outputs, kept on the ``mask`` (B, T) positions only."""
        missing = [n for n in self.names if n not in self.outputs]
        if missing:
            raise RuntimeError(f"edited layers never ran in the forward pass: {missing}")
        outs = [self.outputs[n] for n in self.names]
        deltas = torch.autograd.grad(loss, outs, allow_unused=True)
        edit_index = torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(mask)[mask]  # (N,)
        for name, delta, out in zip(self.names, deltas, outs, strict=False):
            delta = torch.zeros_like(out) if delta is None else delta
            x = self.inputs[name]
            # Some architectures (OPT) run their MLP on (B*T, d): select with the flattened mask.
            select = mask if x.dim() == 3 else mask.reshape(-1)
            # (B, T, d) or (B*T, d) -> (N, d): only the selected token positions
            self.grads[name] = LayerGrads(
                x=x[select].detach(), delta=delta[select].detach(), edit_index=edit_index
            )
        self.outputs.clear()
        self.inputs.clear()
        return self.grads


@contextmanager
def capture(model: nn.Module, targets: Sequence[EditTarget]) -> Iterator[Capture]:
    """Record inputs and (differentiable) outputs of the target modules; remove the hooks after."""
    result = Capture(names=[t.module for t in targets])
    handles = []

    def make_hook(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
            result.inputs[name] = args[0].detach()
            if not output.requires_grad:
                # The base model is frozen: make the output a leaf so gradients reach it.
                output = output.detach().requires_grad_(True)
            result.outputs[name] = output
            return output

        return hook

    modules = dict(model.named_modules())
    try:
        for name in result.names:
            handles.append(modules[name].register_forward_hook(make_hook(name)))
        yield result
    finally:
        for handle in handles:
            handle.remove()
