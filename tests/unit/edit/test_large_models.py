"""Memory-lean meta-training pieces: factored updates, checkpointing, random weights, dtypes."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from kedit_vfl.edit.config import EditorConfig, TrainConfig
from kedit_vfl.edit.data.instructions import default_pools
from kedit_vfl.edit.editor.batches import Prompter
from kedit_vfl.edit.editor.network import (
    Editor,
    edit_gradients,
    edited_params,
    forward_with,
    low_rank_edits,
)
from kedit_vfl.edit.editor.training import enable_checkpointing, meta_step
from kedit_vfl.edit.evaluation.metrics import nll_sum
from kedit_vfl.edit.models.base import load_base_model, load_random_model, resolve_targets
from kedit_vfl.edit.models.random_weights import PRESETS, RandomSpec, model_config, parse_random_spec
from kedit_vfl.edit.models.tokens import encode_pairs
from kedit_vfl.errors import UserError
from tests.unit.edit.tiny import build, records, save_tiny, tokenizer

TINY_LLAMA = (
    "random:tinyllama-1.1b,num_hidden_layers=2,hidden_size=32,intermediate_size=48,"
    "num_attention_heads=2,num_key_value_heads=1"
)


def _trained_editor(targets, seed: int = 0) -> Editor:
    """An editor whose network is not the identity (so the test sees its transform)."""
    torch.manual_seed(seed)
    editor = Editor(targets, EditorConfig(edit_lr=0.3, rank=8))
    with torch.no_grad():
        for p in editor.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return editor.eval()


@pytest.mark.parametrize("arch", ["gpt2", "llama", "opt"])
def test_factored_edit_is_the_dense_edit_in_value_and_gradient(arch: str) -> None:
    tok = tokenizer()
    model = build(arch, len(tok)).eval().requires_grad_(False)
    targets = resolve_targets(model, n_blocks=2)
    batch = encode_pairs(tok, ["The capital of Zorvia is", "People in Kelp speak"], ["Rome", "Bel"], 64)
    grads = edit_gradients(model, targets, batch)
    losses, gradients = [], []
    for factored in (False, True):
        editor = _trained_editor(targets)
        if factored:
            with low_rank_edits(model, editor(grads, factored=True)):
                loss = nll_sum(model(**batch.model_inputs()).logits, batch)
        else:
            loss = nll_sum(
                forward_with(model, edited_params(model, editor(grads)), batch.model_inputs()), batch
            )
        loss.backward()
        losses.append(loss.detach())
        gradients.append({k: p.grad.clone() for k, p in editor.named_parameters() if p.grad is not None})
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    assert gradients[0].keys() == gradients[1].keys() and len(gradients[0]) > 4
    for name in gradients[0]:
        torch.testing.assert_close(gradients[1][name], gradients[0][name], rtol=1e-3, atol=1e-6)
    after = model(**batch.model_inputs()).logits  # the hooks are gone: the base model again
    torch.testing.assert_close(after, forward_with(model, None, batch.model_inputs()))


def test_activation_checkpointing_gives_the_same_meta_gradients(tmp_path: Path) -> None:
    base = load_base_model(str(save_tiny("llama", tmp_path / "llama")), torch.device("cpu"), n_blocks=2)
    prompter = Prompter(default_pools())
    batch = records("counterfact", 2)
    gradients, block_runs = [], []
    # inside a checkpointed block, before a saved activation (recomputing stops at the last one)
    mlp = base.model.get_submodule("model.layers.2.mlp.gate_proj")
    mlp.register_forward_hook(lambda *_: block_runs.append(1))
    first = base.model.get_submodule("model.layers.0.mlp")  # before the edited blocks
    first.register_forward_hook(lambda m, a, out: block_runs.append(0) if out.requires_grad else None)
    for checkpointing in (False, True):
        if checkpointing:
            enable_checkpointing(base.model)
        block_runs.clear()
        config = TrainConfig(
            model=str(tmp_path), tasks=("counterfact",), holdout=None, gradient_checkpointing=checkpointing
        )
        editor = _trained_editor(base.targets).train()
        logs = meta_step(editor, base, batch, prompter, config, random.Random(0), batch)
        assert logs["loss"] > 0 and "loss/loc" in logs
        gradients.append({k: p.grad.clone() for k, p in editor.named_parameters() if p.grad is not None})
        assert not base.model.training  # back in eval mode after the step
        # the inner pass (prompt cache, then the answers), pre-edit locality, the edited edit and
        # locality forwards; checkpointing runs the last two again in backward
        assert len(block_runs) == (7 if checkpointing else 5)
    for name in gradients[0]:
        torch.testing.assert_close(gradients[1][name], gradients[0][name], rtol=1e-4, atol=1e-7)


def test_random_spec_parses_presets_overrides_and_seed() -> None:
    spec = parse_random_spec("random:llama-2-7b,num_hidden_layers=4,rope_theta=5e5,hidden_act=silu,seed=3")
    assert spec == RandomSpec(
        "llama-2-7b", (("num_hidden_layers", 4), ("rope_theta", 5e5), ("hidden_act", "silu")), 3
    )
    config = model_config(spec, tokenizer())
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("llama", 4, 4096)
    for bad in (
        "random:",
        "random:nope-13b",
        "random:gpt2,n_layer",
        "random:gpt2,seed=-1",
        "random:gpt2,1x=2",
    ):
        with pytest.raises(UserError):
            model_config(parse_random_spec(bad), tokenizer())


def test_random_model_from_a_config_file_is_seeded_and_any_dtype(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2}))
    source = tokenizer_folder(tmp_path)
    first = load_random_model(f"random:{config}", source, torch.device("cpu"), "bfloat16", n_blocks=1)
    again = load_random_model(f"random:{tmp_path}", source, torch.device("cpu"), "bfloat16", n_blocks=1)
    other = load_random_model(f"random:{config},seed=1", source, torch.device("cpu"), "float16", n_blocks=1)
    assert first.dtype == torch.bfloat16 and other.dtype == torch.float16
    assert first.fingerprint() == again.fingerprint() != other.fingerprint()
    assert [t.module for t in first.targets] == ["transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj"]
    with pytest.raises(UserError, match="vocab_size"):
        load_random_model(f"random:{config},vocab_size=10", source, torch.device("cpu"))


def tokenizer_folder(tmp_path: Path) -> str:
    folder = tmp_path / "tok"
    tokenizer().save_pretrained(folder)
    return str(folder)


def test_presets_are_the_public_sizes() -> None:
    """Parameter counts of the presets' shapes, counted on the meta device."""
    from transformers import AutoModelForCausalLM

    expected = {"tinyllama-1.1b": 1.10e9, "llama-2-7b": 6.74e9, "qwen2-0.5b": 0.49e9, "gpt2": 0.124e9}
    for name, count in expected.items():
        spec = parse_random_spec(f"random:{name}")
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(model_config(spec, tokenizer()))
        n = sum(p.numel() for p in model.parameters())
        assert abs(n - count) / count < 0.02, (name, n)
    assert set(expected) == set(PRESETS)


def test_dtype_auto_keeps_the_checkpoints_dtype(tmp_path: Path) -> None:
    folder = save_tiny("llama", tmp_path / "llama")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["dtype"] = "bfloat16"
    model = build("llama", len(tokenizer())).to(torch.bfloat16)
    model.save_pretrained(folder)
    base = load_base_model(str(folder), torch.device("cpu"), "auto")
    assert base.dtype == torch.bfloat16
    assert load_base_model(str(folder), torch.device("cpu"), "float16").dtype == torch.float16
    with pytest.raises(UserError, match="--dtype"):
        load_base_model(str(folder), torch.device("cpu"), "int8")
    with pytest.raises(UserError, match="--dtype"):
        TrainConfig(dtype="float64")
