from __future__ import annotations

import pytest
import torch

from kedit_vfl.edit.editor.network import edit_gradients, forward_with
from kedit_vfl.edit.evaluation.metrics import nll_sum
from kedit_vfl.edit.models.base import resolve_targets
from kedit_vfl.edit.models.hooks import capture
from kedit_vfl.edit.models.tokens import encode_pairs
from tests.unit.edit.tiny import build, tokenizer


def _setup(arch: str):
    tok = tokenizer()
    model = build(arch, len(tok)).eval().requires_grad_(False)
    batch = encode_pairs(
        tok, ["The capital of Zorvia is", "People in Mirland speak"], ["Rome Bel", "Zorvish"], 64
    )
    return model, batch, resolve_targets(model, n_blocks=2)


def test_capture_keeps_target_tokens_and_removes_its_hooks() -> None:
    model, batch, targets = _setup("gpt2")
    with capture(model, targets) as captured:
        loss = nll_sum(model(**batch.model_inputs()).logits, batch)
        grads = captured.backward(loss, batch.predict_mask)
    n_tokens = int(batch.predict_mask.sum())
    for target in targets:
        g = grads[target.module]
        assert g.x.shape == (n_tokens, target.d_in) and g.delta.shape == (n_tokens, target.d_out)
        assert not g.x.requires_grad and not g.delta.requires_grad
        assert g.edit_index.tolist() == batch.predict_mask.nonzero()[:, 0].tolist()
    modules = dict(model.named_modules())
    assert all(not modules[t.module]._forward_hooks for t in targets)


def test_sum_of_rank_one_factors_is_the_weight_gradient_on_the_selected_tokens() -> None:
    """With every position selected, sum_t delta_t x_t^T equals autograd's weight gradient."""
    for arch in ("gpt2", "llama"):
        model, batch, targets = _setup(arch)
        everything = batch.attention_mask.bool()
        with capture(model, targets) as captured:
            loss = nll_sum(model(**batch.model_inputs()).logits, batch)
            grads = captured.backward(loss, everything)
        params = dict(model.named_parameters())
        weights = [params[t.param].requires_grad_(True) for t in targets]
        reference = torch.autograd.grad(nll_sum(model(**batch.model_inputs()).logits, batch), weights)
        for target, ref in zip(targets, reference, strict=True):
            g = grads[target.module]
            full = g.delta.T @ g.x  # (d_out, d_in)
            full = full.T if target.transposed else full
            torch.testing.assert_close(full, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gpt_neox", "opt"])
def test_edit_gradients_with_the_lm_head_on_target_positions_only_match_the_full_pass(arch: str) -> None:
    """OPT runs its MLP on (B*T, d); logits_to_keep must not change the captured factors."""
    model, batch, targets = _setup(arch)
    fast = edit_gradients(model, targets, batch)
    with capture(model, targets) as captured:
        full = captured.backward(nll_sum(model(**batch.model_inputs()).logits, batch), batch.predict_mask)
    for name, grads in full.items():
        torch.testing.assert_close(fast[name].x, grads.x)
        torch.testing.assert_close(fast[name].delta, grads.delta, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gpt_neox"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_a_batch_reads_the_prompts_from_a_cache_and_gets_the_full_pass_factors(arch: str, side: str) -> None:
    """Several rows: the tokens before the first target run once without gradients (a KV
    cache), also on replaced weights; x and delta are those of the whole pass."""
    tok = tokenizer()
    tok.padding_side = side
    model = build(arch, len(tok)).eval().requires_grad_(False)
    targets = resolve_targets(model, n_blocks=2)
    prompts = ["The capital of Zorvia is", "People in Mirland speak", "Zorvia pays with the"]
    batch = encode_pairs(tok, prompts, ["Rome Bel", "Zorvish", "kron"], 64)
    assert int(batch.predict_mask.any(0).nonzero()[0]) > 0  # there is a prompt to cache
    generator = torch.Generator().manual_seed(0)
    weights = dict(model.named_parameters())
    params = {
        t.param: weights[t.param] + 0.01 * torch.randn(weights[t.param].shape, generator=generator)
        for t in targets
    }
    cached = edit_gradients(model, targets, batch, params)
    with capture(model, targets) as captured:
        logits = forward_with(model, params, batch.model_inputs())
        full = captured.backward(nll_sum(logits, batch), batch.predict_mask)
    for name, grads in full.items():
        torch.testing.assert_close(cached[name].x, grads.x)
        torch.testing.assert_close(cached[name].delta, grads.delta, rtol=1e-4, atol=1e-6)
        assert torch.equal(cached[name].edit_index, grads.edit_index)
    if side == "right":  # unpadded prompts: each row's factors are those of its edit alone
        for row, (prompt, answer) in enumerate(zip(prompts, ["Rome Bel", "Zorvish", "kron"], strict=True)):
            alone = edit_gradients(model, targets, encode_pairs(tok, [prompt], [answer], 64), params)
            for name, grads in alone.items():
                mine = cached[name].edit_index == row
                torch.testing.assert_close(cached[name].x[mine], grads.x, rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(cached[name].delta[mine], grads.delta, rtol=1e-4, atol=1e-6)
