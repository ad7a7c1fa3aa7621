"""The MEND-style editor: gradient factors in, weight updates out.

For each edited weight ``W`` (a :class:`EditTarget`) the editor receives the factors
``x`` (layer input) and ``delta`` (gradient at the layer output) on the target tokens,
standardises them with running statistics, passes ``concat(x, delta)`` through a
low-rank residual MLP shared by all layers of the same shape (with a per-layer FiLM
scale and shift), splits the result back into ``x~`` and ``delta~`` and returns

    dW = -alpha_l * sum_t delta~_t x~_t^T      (one matmul, never per-token matrices)

``delta`` is the gradient of the editing loss, so the minus makes the identity-initialised
editor a plain gradient-descent step of size alpha_l (the spec's ``W + alpha_l * ...``
with ``delta`` read as the descent direction). Edits batched together contribute more
tokens: summed as they are (``aggregate="sum"``, MEND), or with their ``delta~`` solved
jointly so each edit acts on the batch's keys as it would alone (``"joint"``, the default
since 0.3; :func:`joint_values`).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from kedit_vfl.edit.config import EditorConfig
from kedit_vfl.edit.evaluation.metrics import nll_at, nll_sum
from kedit_vfl.edit.models.base import EditTarget
from kedit_vfl.edit.models.hooks import LayerGrads, capture
from kedit_vfl.edit.models.tokens import TokenBatch


class RunningNorm(nn.Module):
    """Standardise features with a running mean and variance (batched Welford), kept as buffers."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("count", torch.zeros(1, dtype=torch.float64))  # 1-D: artifacts hash bytes
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("m2", torch.zeros(dim))

    @torch.no_grad()
    def update(self, values: torch.Tensor) -> None:
        """Fold a (N, dim) batch into the running statistics."""
        n = values.shape[0]
        if n == 0:
            return
        batch_mean = values.mean(0)
        batch_m2 = ((values - batch_mean) ** 2).sum(0)
        count = float(self.count)
        total = count + n
        diff = batch_mean - self.mean
        self.mean += diff * (n / total)
        self.m2 += batch_m2 + diff**2 * (count * n / total)
        self.count.fill_(total)

    @property
    def std(self) -> torch.Tensor:
        return (self.m2 / max(float(self.count) - 1, 1.0)).sqrt()

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        if float(self.count) < 2:  # no statistics yet: pass through (identity)
            return values
        return (values - self.mean) / (self.std + self.eps)


class FiLM(nn.Module):
    """Per-layer scale and shift, so layers sharing one transform can still differ."""

    def __init__(self, n_layers: int, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(n_layers, dim))
        self.shift = nn.Parameter(torch.zeros(n_layers, dim))

    def forward(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        return h * self.scale[layer] + self.shift[layer]


class LowRankResidual(nn.Module):
    """``h + up(relu(down(h)))`` with ``up`` zero-initialised: the identity at init."""

    def __init__(self, dim: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, rank)
        self.up = nn.Linear(rank, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(torch.relu(self.down(h)))


class GradientTransform(nn.Module):
    """The network shared by all edited layers of one shape: FiLM, then residual blocks.

    With ``condition_dim``, each token's features are also scaled and shifted by a rank
    ``condition_rank`` linear map of its edit's instruction embedding (its second factor
    zero-initialised: no effect at first; low rank: a full map would add 2 x hidden x
    (d_in + d_out) parameters, a quarter of a billion on a 7B model).
    """

    def __init__(
        self, dim: int, n_layers: int, rank: int, depth: int, condition_dim: int = 0, condition_rank: int = 64
    ) -> None:
        super().__init__()
        self.film = FiLM(n_layers, dim)
        self.blocks = nn.ModuleList(LowRankResidual(dim, rank) for _ in range(depth))
        self.condition = None
        if condition_dim:
            inner = min(condition_rank, condition_dim)
            self.condition = nn.Sequential(nn.Linear(condition_dim, inner), nn.Linear(inner, 2 * dim))
            nn.init.zeros_(self.condition[1].weight)
            nn.init.zeros_(self.condition[1].bias)

    def forward(self, h: torch.Tensor, layer: int, condition: torch.Tensor | None = None) -> torch.Tensor:
        h = self.film(h, layer)
        if self.condition is not None and condition is not None:
            scale, shift = self.condition(condition).chunk(2, dim=-1)
            h = h * (1 + scale) + shift
        for block in self.blocks:
            h = block(h)
        return h


JOINT_MAX_TOKENS = 4096  # one solve's size; larger batches are solved in groups of whole edits


def joint_values(
    keys: torch.Tensor, values: torch.Tensor, edit_index: torch.Tensor, ridge: float
) -> torch.Tensor:
    """The values ``U`` that make ``U^T K`` act on the batch's keys as each edit alone would.

    Summed, an edit's update also moves every other edit's tokens by ``v_t (k_t . k_s)``,
    and edits with similar keys pile up. Solved jointly, ``U = (G + lam I)^-1 (G_e + lam I) V``
    with ``G = K K^T`` and ``G_e`` its blocks within one edit: ``G U`` is each token's own
    edit's effect, about as if that edit were applied alone (after MALMEN's least squares,
    here in the editor's key space). One edit gives ``U = V`` exactly, so a single edit is
    the same as summing. ``lam`` is ``ridge`` times the mean squared key length (scale-free).
    Batches over :data:`JOINT_MAX_TOKENS` tokens are solved in groups of whole edits (an
    ``N x N`` solve per group), the groups' updates summed.
    """
    if keys.shape[0] < 2 or bool((edit_index == edit_index[0]).all()):
        return values
    if keys.shape[0] > JOINT_MAX_TOKENS:
        out = torch.empty_like(values)
        for rows in _edit_groups(edit_index, JOINT_MAX_TOKENS):
            out[rows] = joint_values(keys[rows], values[rows], edit_index[rows], ridge)
        return out
    k, v = keys.double(), values.double()
    gram = k @ k.T  # (N, N)
    lam = ridge * gram.diagonal().mean().clamp_min(1e-12)  # all-zero keys: U = V
    eye = torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    own = gram * (edit_index[:, None] == edit_index[None, :])
    return torch.linalg.solve(gram + lam * eye, (own + lam * eye) @ v).to(values.dtype)


def _edit_groups(edit_index: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Row indices in groups of whole edits, each at most ``size`` rows (or one edit)."""
    order = torch.argsort(edit_index, stable=True)
    _, counts = torch.unique_consecutive(edit_index[order], return_counts=True)
    groups, start, count = [], 0, 0
    for n in counts.tolist():
        if count and count + n > size:
            groups.append(order[start : start + count])
            start, count = start + count, 0
        count += n
    groups.append(order[start : start + count])
    return groups


def rank_one_sum(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``sum_t delta_t x_t^T`` as one matmul: (N, d_out), (N, d_in) -> (d_out, d_in)."""
    return delta.transpose(0, 1) @ x


class Editor(nn.Module):
    """Maps captured gradient factors of every edited layer to weight updates."""

    def __init__(self, targets: Sequence[EditTarget], config: EditorConfig) -> None:
        super().__init__()
        self.targets = list(targets)
        self.config = config
        groups: dict[str, list[int]] = {}
        for i, target in enumerate(self.targets):
            groups.setdefault(target.shape_key, []).append(i)
        self.slot = {i: members.index(i) for members in groups.values() for i in members}
        self.transforms = nn.ModuleDict(
            {
                key: GradientTransform(
                    dim := self.targets[m[0]].d_in + self.targets[m[0]].d_out,
                    n_layers=len(m),
                    rank=min(config.rank, dim),
                    depth=config.depth,
                    condition_dim=config.condition_dim,
                    condition_rank=config.condition_rank,
                )
                for key, m in groups.items()
            }
        )
        self.x_norms = nn.ModuleList(RunningNorm(t.d_in) for t in self.targets)
        self.delta_norms = nn.ModuleList(RunningNorm(t.d_out) for t in self.targets)
        self.alpha = nn.Parameter(torch.full((len(self.targets),), float(config.edit_lr)))

    def forward(
        self,
        grads: Mapping[str, LayerGrads],
        factored: bool = False,
        conditions: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor] | dict[str, LowRankUpdate]:
        """Weight updates keyed by parameter name, in each weight's own layout; or, with
        ``factored``, keyed by module name as :class:`LowRankUpdate` factors (meta-training:
        no ``d_out x d_in`` matrix is ever built, see :func:`low_rank_edits`).
        ``conditions``: one instruction embedding per edit (``instruction_input="condition"``)."""
        factors = {}
        for i, target in enumerate(self.targets):
            x_t, delta_t = self.transformed(i, grads[target.module], conditions)
            if self.config.aggregate == "joint":
                delta_t = joint_values(x_t, delta_t, grads[target.module].edit_index, self.config.ridge)
            factors[target.module] = LowRankUpdate(-self.alpha[i], x_t, delta_t)
        if factored:
            return factors
        updates = {}
        for target in self.targets:
            update = factors[target.module].dense()  # (d_out, d_in): a descent step
            updates[target.param] = update.transpose(0, 1) if target.transposed else update
        return updates

    def transformed(
        self, i: int, grads: LayerGrads, conditions: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Target ``i``'s factors after the network: ``x~`` (N, d_in), ``delta~`` (N, d_out)."""
        target = self.targets[i]
        x, delta = grads.x.float(), grads.delta.float()
        if self.training:
            self.x_norms[i].update(x)
            self.delta_norms[i].update(delta)
        h = torch.cat([self.x_norms[i](x), self.delta_norms[i](delta)], dim=-1)  # (N, d_in + d_out)
        rows = conditions[grads.edit_index].float() if conditions is not None else None
        h = self.transforms[target.shape_key](h, self.slot[i], rows)
        x_t, delta_t = h.split([target.d_in, target.d_out], dim=-1)
        return x_t, delta_t


@dataclass
class LowRankUpdate:
    """``scale * delta~^T x~``: one layer's update as the editor makes it, kept factored."""

    scale: torch.Tensor  # () the layer's -alpha
    x: torch.Tensor  # (N, d_in)
    delta: torch.Tensor  # (N, d_out)

    def dense(self) -> torch.Tensor:
        """(d_out, d_in), one matmul."""
        return self.scale * rank_one_sum(self.x, self.delta)

    def effect(self, inputs: torch.Tensor) -> torch.Tensor:
        """``inputs @ dense().T`` through the factors: (..., d_in) -> (..., d_out) in float32."""
        return self.scale * ((inputs.float() @ self.x.transpose(0, 1)) @ self.delta)


@contextmanager
def low_rank_edits(model: nn.Module, updates: Mapping[str, LowRankUpdate]) -> Iterator[None]:
    """Inside the block, each edited module's output gains its update's effect on its input.

    The same function as ``W + dW`` (up to float rounding), but its memory grows with the
    edited tokens, not with ``d_out x d_in``: on a 7B model the dense path holds, per
    edited weight, ``dW`` and ``W + dW`` for backward (hundreds of MB each). The weights
    are untouched, so activation checkpointing recomputes the same function as long as
    backward runs inside the block.
    """
    modules = dict(model.named_modules())

    def make_hook(update: LowRankUpdate) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
            return output + update.effect(args[0]).to(output.dtype)

        return hook

    handles = [modules[name].register_forward_hook(make_hook(u)) for name, u in updates.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def edited_params(model: nn.Module, updates: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``W + dW`` for every updated weight, in the weight's dtype (differentiable in dW)."""
    params = dict(model.named_parameters())
    return {name: (params[name].float() + dw).to(params[name].dtype) for name, dw in updates.items()}


def merge_updates(*updates: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sum several update dicts (sequential edits compose additively on the base weights)."""
    merged: dict[str, torch.Tensor] = {}
    for update in updates:
        for name, dw in update.items():
            merged[name] = merged[name] + dw if name in merged else dw
    return merged


def forward_with(
    model: nn.Module, params: Mapping[str, torch.Tensor] | None, inputs: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    """Logits of the model with some weights replaced (functional: the model is untouched)."""
    if not params:
        return model(**inputs).logits
    return functional_call(model, dict(params), args=(), kwargs=dict(inputs), strict=False).logits


@torch.no_grad()
def apply_updates_(model: nn.Module, updates: Mapping[str, torch.Tensor]) -> None:
    """Add the updates to the model's weights in place (for saving an edited model)."""
    params = dict(model.named_parameters())
    for name, dw in updates.items():
        params[name].copy_((params[name].float() + dw.to(params[name].device)).to(params[name].dtype))


def edit_gradients(
    model: nn.Module,
    targets: Sequence[EditTarget],
    batch: TokenBatch,
    params: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, LayerGrads]:
    """Factors ``x``, ``delta`` of the editing loss's weight gradients, on target-predicting tokens.

    In a batch of several edits, the tokens before the first target-predicting position
    run once without gradients and reach the rest as a key/value cache: causal attention
    keeps the later positions' gradients from flowing into them, so backward covers the
    answer region only (the same ``x`` and ``delta``; a batch of 32 on the embedded
    model about a third faster). A single edit runs whole: there the second call costs
    more than the shorter backward saves.
    """
    detached = {k: v.detach() for k, v in params.items()} if params else None
    if not _accepts_logits_to_keep(model):
        with torch.enable_grad(), capture(model, targets) as captured:
            loss = nll_sum(forward_with(model, detached, batch.model_inputs()), batch)
            return captured.backward(loss, batch.predict_mask)
    # The LM head only where some row predicts a target token (the same loss, less work).
    keep = batch.predict_mask.any(0).nonzero().flatten()  # (K,)
    cache_argument = _cache_argument(model)
    start = int(keep[0]) if len(keep) and batch.input_ids.shape[0] > 1 and cache_argument else 0
    inputs = {
        "input_ids": batch.input_ids[:, start:],
        "attention_mask": batch.attention_mask,
        "logits_to_keep": keep - start,
    }
    if start:
        inputs[cache_argument] = _prompt_cache(model, detached, batch, start)
    with torch.enable_grad(), capture(model, targets) as captured:
        logits = forward_with(model, detached, inputs)  # (B, K, V)
        loss = nll_at(logits, batch.labels[:, keep + 1])
        return captured.backward(loss, batch.predict_mask[:, start:])


@torch.no_grad()
def _prompt_cache(
    model: nn.Module, params: Mapping[str, torch.Tensor] | None, batch: TokenBatch, start: int
) -> Any:
    """The key/value cache of every row's first ``start`` tokens."""
    inputs = {
        "input_ids": batch.input_ids[:, :start],
        "attention_mask": batch.attention_mask[:, :start],
        "use_cache": True,
    }
    if params:
        out = functional_call(model, dict(params), args=(), kwargs=inputs, strict=False)
    else:
        out = model(**inputs)
    cache = getattr(out, "cache", None)  # transformers >= 5 names it ``cache``
    return cache if cache is not None else out.past_key_values


def _cache_argument(model: nn.Module) -> str | None:
    """The keyword a model's forward takes a key/value cache by, if any."""
    parameters = _forward_parameters(type(model))
    return next((name for name in ("cache", "past_key_values") if name in parameters), None)


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    return "logits_to_keep" in _forward_parameters(type(model))


@functools.cache
def _forward_parameters(model_class: type) -> frozenset[str]:
    return frozenset(inspect.signature(model_class.forward).parameters)
