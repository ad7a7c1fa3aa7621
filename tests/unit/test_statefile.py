"""Training state without pickle: round trips, and what a damaged or planted file gets."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from kedit_vfl.artifacts import atomic_write
from kedit_vfl.errors import UserError
from kedit_vfl.statefile import StateFileError, load_state, save_state
from kedit_vfl.vfl.checkpoint import CheckpointStore


def test_nested_state_round_trips(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(4, 3)).sum().backward()
    optimizer.step()
    generator = torch.Generator().manual_seed(3)
    state = {
        "objects": {"model": model.state_dict(), "optimizer": optimizer.state_dict()},
        "generator": generator.get_state(),
        "loop": {"epoch": 4, "best": np.float64(0.75), "tag": (1, 2), "history": [0.5, float("inf")],
                 "done": False, "note": None},
    }  # fmt: skip
    save_state(tmp_path / "s.safetensors", state, atomic_write)
    back = load_state(tmp_path / "s.safetensors")
    assert back["loop"] == {"epoch": 4, "best": 0.75, "tag": (1, 2), "history": [0.5, float("inf")],
                            "done": False, "note": None}  # fmt: skip
    assert torch.equal(back["generator"], generator.get_state())
    other = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=0.1)
    other.load_state_dict(back["objects"]["optimizer"])  # int keys and param groups survive
    assert other.state_dict()["state"][0]["step"] == optimizer.state_dict()["state"][0]["step"]
    for name, tensor in model.state_dict().items():
        assert torch.equal(back["objects"]["model"][name], tensor)


def test_a_planted_pickle_is_refused_without_running(tmp_path: Path) -> None:
    class Boom:
        def __reduce__(self):  # noqa: ANN204 - what a malicious pickle does
            return (Path.write_text, (tmp_path / "ran", "code ran"))

    store = CheckpointStore(tmp_path / "c")
    store.directory.mkdir()
    (store.directory / "phase0-epoch0001.safetensors").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(UserError, match="cannot read this checkpoint"):
        store.load((0, 1))
    assert not (tmp_path / "ran").exists()


def test_other_safetensors_files_are_not_state_files(tmp_path: Path) -> None:
    save_file({"w": torch.zeros(2)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(StateFileError, match="not a kvtool state file"):
        load_state(tmp_path / "w.safetensors")
    save_file({}, str(tmp_path / "bad.safetensors"), metadata={"format": "kvtool-state/1", "structure": "{"})
    with pytest.raises(StateFileError, match="not valid JSON"):
        load_state(tmp_path / "bad.safetensors")
    structure = '{"x": {"__tensor__": "t9"}}'
    save_file(
        {}, str(tmp_path / "t.safetensors"), metadata={"format": "kvtool-state/1", "structure": structure}
    )
    with pytest.raises(StateFileError, match="does not hold"):
        load_state(tmp_path / "t.safetensors")
