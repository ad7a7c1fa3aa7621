from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kedit_vfl.edit.config import EditorConfig
from kedit_vfl.edit.editor.network import (
    Editor,
    RunningNorm,
    edit_gradients,
    edited_params,
    forward_with,
    joint_values,
    rank_one_sum,
)
from kedit_vfl.edit.evaluation.metrics import nll_sum
from kedit_vfl.edit.models.base import EditTarget, fingerprint, resolve_targets
from kedit_vfl.edit.models.hooks import LayerGrads
from kedit_vfl.edit.models.tokens import encode_pairs
from kedit_vfl.errors import UserError
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
    editor = Editor(TARGETS, EditorConfig(rank=3, aggregate="sum")).eval()
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


def _two_edits(targets: list[EditTarget]) -> dict[str, LayerGrads]:
    a, b = _grads(targets, 3, seed=1), _grads(targets, 4, seed=2)
    return {
        k: LayerGrads(
            torch.cat([a[k].x, b[k].x]),
            torch.cat([a[k].delta, b[k].delta]),
            torch.tensor([0, 0, 0, 1, 1, 1, 1]),
        )
        for k in a
    }


def test_joint_values_leave_a_single_edit_as_it_is() -> None:
    keys, values = torch.randn(5, 8), torch.randn(5, 3)
    assert torch.equal(joint_values(keys, values, torch.zeros(5, dtype=torch.long), 0.1), values)
    one = _grads(TARGETS, 5)
    summed = Editor(TARGETS, EditorConfig(aggregate="sum")).eval()(one)
    joint = Editor(TARGETS, EditorConfig(aggregate="joint")).eval()(one)
    for name in summed:
        torch.testing.assert_close(joint[name], summed[name])


def test_joint_values_give_each_edit_its_own_effect_on_the_batch_keys() -> None:
    """``G U = G_e V`` as the ridge goes to zero: on every key of the batch, the joint update
    does what that key's own edit alone does, where the sum adds the other edit's effect."""
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(6, 32, generator=gen, dtype=torch.float64)
    keys[3:] += 2.0 * keys[:3]  # the second edit's keys lean on the first's: sums interfere
    values = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    owner = torch.tensor([0, 0, 0, 1, 1, 1])
    gram = keys @ keys.T
    alone = (gram * (owner[:, None] == owner[None, :])) @ values  # each edit applied alone
    joint = gram @ joint_values(keys, values, owner, 1e-6)
    torch.testing.assert_close(joint, alone, rtol=1e-3, atol=1e-3)
    assert (gram @ values - alone).abs().max() > 1.0  # the summed update is far from it


def test_joint_editor_differs_from_the_sum_only_across_edits() -> None:
    both = _two_edits(TARGETS)
    summed = Editor(TARGETS, EditorConfig(aggregate="sum")).eval()(both)
    joint = Editor(TARGETS, EditorConfig(aggregate="joint")).eval()(both)
    assert all(not torch.allclose(joint[k], summed[k]) for k in summed)
    with pytest.raises(UserError, match="--aggregate"):
        EditorConfig(aggregate="mean")


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


def test_joint_values_over_the_token_cap_solve_whole_edits_in_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    import kedit_vfl.edit.editor.network as network

    gen = torch.Generator().manual_seed(3)
    keys, values = torch.randn(9, 16, generator=gen), torch.randn(9, 2, generator=gen)
    owner = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 3])
    monkeypatch.setattr(network, "JOINT_MAX_TOKENS", 5)
    grouped = joint_values(keys, values, owner, 0.1)
    first, second = torch.arange(5), torch.arange(5, 9)  # edits 0-1 (5 rows), then 2-3 (4 rows)
    torch.testing.assert_close(grouped[first], joint_values(keys[first], values[first], owner[first], 0.1))
    torch.testing.assert_close(
        grouped[second], joint_values(keys[second], values[second], owner[second], 0.1)
    )


def test_an_editor_saved_before_joint_aggregation_keeps_summing() -> None:
    from kedit_vfl.artifacts import Artifact
    from kedit_vfl.edit.editor.store import EDITOR_KIND, editor_from_artifact

    editor = Editor(TARGETS, EditorConfig())
    dropped = ("aggregate", "ridge", "instruction_input", "condition_dim")
    config = {k: v for k, v in vars(editor.config).items() if k not in dropped}
    extra = {"targets": [t.to_dict() for t in TARGETS], "editor": {**config, "layers": []}}
    old = editor_from_artifact(Artifact(EDITOR_KIND, editor.state_dict(), {}, extra=extra), "old.safetensors")
    assert old.config.aggregate == "sum" and old.config.instruction_input == "prefix"
    extra["editor"]["aggregate"] = "joint"
    new = editor_from_artifact(Artifact(EDITOR_KIND, editor.state_dict(), {}, extra=extra), "new.safetensors")
    assert new.config.aggregate == "joint"


def test_a_batch_captured_in_chunks_gets_the_update_of_one_pass(tmp_path: Path) -> None:
    """apply's --batch-size bounds the forward pass; the joint update sees every edit."""
    from kedit_vfl.edit.algs.hypernetwork import compute_update
    from kedit_vfl.edit.editor.batches import Prompter
    from kedit_vfl.edit.models.base import load_base_model
    from tests.unit.edit.tiny import records, save_tiny

    base = load_base_model(str(save_tiny("gpt2", tmp_path / "gpt2")), torch.device("cpu"), n_blocks=2)
    torch.manual_seed(0)
    editor = Editor(base.targets, EditorConfig(rank=4, edit_lr=0.05)).eval()
    for p in editor.transforms.parameters():
        torch.nn.init.normal_(p, std=0.1)
    edits = records("counterfact", 5)
    whole = compute_update(editor, base, edits, Prompter(None), chunk=32)
    chunked = compute_update(editor, base, edits, Prompter(None), chunk=2)
    summed = Editor(base.targets, editor.config.__class__(rank=4, edit_lr=0.05, aggregate="sum"))
    summed.load_state_dict(editor.state_dict())
    plain = compute_update(summed.eval(), base, edits, Prompter(None))
    assert compute_update(editor, base, [], Prompter(None)) == {}  # nothing to edit: no update
    for name in whole:
        torch.testing.assert_close(chunked[name], whole[name], rtol=1e-4, atol=1e-6)
        assert not torch.allclose(plain[name], whole[name], rtol=1e-3, atol=1e-6)


def test_the_memory_threshold_routes_at_most_the_allowed_share_of_unrelated_prompts() -> None:
    from kedit_vfl.edit.algs.memory import loosest_threshold

    similarity = torch.linspace(0.0, 0.99, 100)[
        torch.randperm(100, generator=torch.Generator().manual_seed(0))
    ]
    for share in (0.0, 0.05, 0.2):
        threshold = loosest_threshold(similarity, share)
        routed = float((similarity >= threshold).float().mean())
        assert routed == pytest.approx(share)  # no ties: exactly the share
        assert float((similarity >= threshold - 0.011).float().mean()) > share  # and the loosest such


def test_joint_values_of_all_zero_keys_are_the_values() -> None:
    values = torch.randn(4, 3)
    out = joint_values(torch.zeros(4, 5), values, torch.tensor([0, 0, 1, 1]), 1.0)
    torch.testing.assert_close(out, values)


def test_the_memory_threshold_lets_an_edits_own_prompt_route() -> None:
    from kedit_vfl.edit.algs.memory import MAX_THRESHOLD, loosest_threshold

    # most "unrelated" prompts identical to a stored one: the threshold still stays below 1
    assert loosest_threshold(torch.tensor([1.0] * 10 + [0.5] * 2), 0.05) == MAX_THRESHOLD
