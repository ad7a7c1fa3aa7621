from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from kedit_vfl.edit.models.base import fingerprint, load_base_model, resolve_targets
from kedit_vfl.errors import UserError
from tests.unit.edit.tiny import build, save_tiny


@pytest.mark.parametrize(
    ("arch", "expected", "transposed"),
    [
        ("gpt2", ["transformer.h.2.mlp.c_fc", "transformer.h.2.mlp.c_proj"], True),
        (
            "llama",
            ["model.layers.2.mlp.gate_proj", "model.layers.2.mlp.up_proj", "model.layers.2.mlp.down_proj"],
            False,
        ),
        ("gpt_neox", ["gpt_neox.layers.2.mlp.dense_h_to_4h", "gpt_neox.layers.2.mlp.dense_4h_to_h"], False),
        ("opt", ["model.decoder.layers.2.fc1", "model.decoder.layers.2.fc2"], False),
    ],
)
def test_default_targets_per_architecture(arch: str, expected: list[str], transposed: bool) -> None:
    model = build(arch, 400)
    targets = resolve_targets(model, n_blocks=2)
    names = [t.module for t in targets]
    assert names[-len(expected) :] == expected
    assert len(names) == 2 * len(expected)  # last two blocks
    assert all(t.transposed == transposed for t in targets)
    params = dict(model.named_parameters())
    for t in targets:  # Conv1D stores (d_in, d_out), Linear (d_out, d_in)
        shape = (t.d_in, t.d_out) if t.transposed else (t.d_out, t.d_in)
        assert tuple(params[t.param].shape) == shape


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Linear(8, 8)
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))


class _Unknown(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_Block() for _ in range(4))


def test_unknown_architecture_discovers_last_blocks_mlp_linears() -> None:
    names = [t.module for t in resolve_targets(_Unknown(), n_blocks=2)]
    assert names == ["blocks.2.mlp.0", "blocks.2.mlp.2", "blocks.3.mlp.0", "blocks.3.mlp.2"]


def test_layers_override_by_suffix_and_regex_and_error_repeats_targets() -> None:
    model = build("gpt2", 400)
    assert [t.module for t in resolve_targets(model, ["h.0.mlp.c_proj"])] == ["transformer.h.0.mlp.c_proj"]
    assert len(resolve_targets(model, [r"transformer\.h\.[01]\.mlp\.c_fc"])) == 2
    with pytest.raises(UserError, match="--layers nothing.here"):
        resolve_targets(model, ["nothing.here"])


def test_fingerprint_ignores_dtype_and_sees_weight_changes() -> None:
    model = build("gpt2", 400)
    targets = resolve_targets(model)
    fp = fingerprint(model, targets)
    assert fingerprint(build("gpt2", 400).to(torch.bfloat16), targets) == fp
    with torch.no_grad():
        dict(model.named_parameters())[targets[0].param].add_(0.5)
    assert fingerprint(model, targets) != fp


def test_load_base_model_from_folder_and_unknown_folder(tmp_path: Path) -> None:
    folder = save_tiny("llama", tmp_path / "llama")
    base = load_base_model(str(folder), torch.device("cpu"))
    assert base.max_length == 256 and not any(p.requires_grad for p in base.model.parameters())
    with pytest.raises(UserError, match="no such folder"):
        load_base_model(str(tmp_path / "missing"), torch.device("cpu"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        load_base_model(str(tmp_path / "empty"), torch.device("cpu"))
