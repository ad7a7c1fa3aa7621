from __future__ import annotations

import pytest
import torch

from kedit_vfl.edit.config import EditorConfig
from kedit_vfl.edit.editor.network import (
    Editor,
    RunningNorm,
    edit_gradients,
    edited_params,
    forward_with,
    rank_one_sum,
)
from kedit_vfl.edit.evaluation.metrics import nll_sum
from kedit_vfl.edit.models.base import EditTarget, fingerprint, resolve_targets
from kedit_vfl.edit.models.hooks import LayerGrads
from kedit_vfl.edit.models.tokens import encode_pairs
from tests.unit.edit.tiny import build, tokenizer


def _grads(targets: list[EditTarget], n: int = 5, seed: int = 0) -> dict[str, LayerGrads]:
    gen = torch.Generator().manual_seed(seed)
    return {
        t.module: LayerGrads(
            torch.randn(n, t.d_in, generator=gen),
            torch.randn(n, t.d_out, generator=gen),
            torch.zeros(n, dtype=torch.long),
        )
        for t in targets
    }


TARGETS = [EditTarget("a", 4, 6, False), EditTarget("b", 4, 6, False), EditTarget("c", 6, 4, True)]


def test_rank_one_sum_is_the_sum_of_outer_products() -> None:
    x, delta = torch.randn(7, 3), torch.randn(7, 5)
    expected = sum(torch.outer(delta[t], x[t]) for t in range(7))
    torch.testing.assert_close(rank_one_sum(x, delta), expected)


def test_identity_init_without_statistics_gives_the_raw_gradient_descent_step() -> None:
    editor = Editor(TARGETS, EditorConfig(edit_lr=0.01)).eval()
    grads = _grads(TARGETS)
    updates = editor(grads)
    for t in TARGETS:
        raw = grads[t.module].delta.T @ grads[t.module].x  # (d_out, d_in)
        torch.testing.assert_close(updates[t.param], -0.01 * (raw.T if t.transposed else raw))
    assert updates["c.weight"].shape == (6, 4)  # Conv1D layout (d_in, d_out)


def test_layers_of_one_shape_share_a_transform_with_their_own_film() -> None:
    editor = Editor(TARGETS, EditorConfig())
    assert sorted(editor.transforms) == ["4x6", "6x4"]
    assert editor.transforms["4x6"].film.scale.shape == (2, 10)
    assert editor.alpha.shape == (3,)


def test_batched_edits_sum_their_updates() -> None:
    editor = Editor(TARGETS, EditorConfig(rank=3)).eval()
    for p in editor.transforms.parameters():  # a non-identity transform
        torch.nn.init.normal_(p, std=0.3)
    a, b = _grads(TARGETS, 3, seed=1), _grads(TARGETS, 4, seed=2)
    both = {
        k: LayerGrads(
            torch.cat([a[k].x, b[k].x]), torch.cat([a[k].delta, b[k].delta]), torch.zeros(7, dtype=torch.long)
        )
        for k in a
    }
    ua, ub, uab = editor(a), editor(b), editor(both)
    for name in uab:
        torch.testing.assert_close(uab[name], ua[name] + ub[name], rtol=1e-4, atol=1e-5)


def test_running_norm_matches_batch_statistics_and_is_saved() -> None:
    norm = RunningNorm(3)
    data = torch.randn(100, 3) * torch.tensor([1.0, 5.0, 0.1]) + torch.tensor([2.0, -1.0, 0.0])
    for chunk in data.split(17):
        norm.update(chunk)
    torch.testing.assert_close(norm.mean, data.mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(norm.std, data.std(0), rtol=1e-4, atol=1e-5)
    standardised = norm(data)
    torch.testing.assert_close(standardised.mean(0), torch.zeros(3), atol=1e-4, rtol=0)
    assert set(norm.state_dict()) == {"count", "mean", "m2"}
    editor = Editor(TARGETS, EditorConfig()).train()
    editor(_grads(TARGETS))
    assert float(editor.state_dict()["x_norms.0.count"]) == 5.0


def test_editing_a_real_model_raises_the_target_probability_functionally() -> None:
    """One raw-gradient edit (identity editor) of GPT-2's Conv1D and LLaMA's Linear layers."""
    tok = tokenizer()
    for arch in ("gpt2", "llama"):
        model = build(arch, len(tok)).eval().requires_grad_(False)
        targets = resolve_targets(model, n_blocks=2)
        batch = encode_pairs(tok, ["The capital of Zorvia is"], ["Rome"], 64)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        editor = Editor(targets, EditorConfig(edit_lr=0.5)).eval()
        params = edited_params(model, editor(edit_gradients(model, targets, batch)))

        with torch.no_grad():
            edited = nll_sum(forward_with(model, params, batch.model_inputs()), batch)
            original = nll_sum(forward_with(model, None, batch.model_inputs()), batch)
        assert float(edited) < float(original) - 0.01
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # functional: untouched


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bfloat16_on_cuda_edits_like_float32_on_cpu() -> None:
    tok = tokenizer()
    cpu = build("gpt2", len(tok)).eval().requires_grad_(False)
    gpu = build("gpt2", len(tok)).to("cuda", torch.bfloat16).eval().requires_grad_(False)
    targets = resolve_targets(cpu, n_blocks=2)
    assert fingerprint(cpu, targets) == fingerprint(gpu, targets)
    batch = encode_pairs(tok, ["The capital of Zorvia is"], ["Rome"], 64)
    editor = Editor(targets, EditorConfig(edit_lr=0.05)).eval()
    updates = {}
    for model, device in ((cpu, "cpu"), (gpu, "cuda")):
        with torch.no_grad():
            updates[device] = editor.to(device)(
                edit_gradients(model, targets, batch.to(torch.device(device)))
            )
        params = edited_params(model, updates[device])
        assert params[targets[0].param].dtype == next(model.parameters()).dtype
    for name, update in updates["cpu"].items():
        torch.testing.assert_close(updates["cuda"][name].float().cpu(), update, rtol=0.1, atol=1e-3)
