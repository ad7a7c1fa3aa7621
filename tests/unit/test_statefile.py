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
from kedit_vfl.vfl.stages.checkpoint import CheckpointStore


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


def test_numpy_random_states_and_bytes_round_trip_without_pickle(tmp_path: Path) -> None:
    legacy = np.random.RandomState(5)
    generator = np.random.default_rng(7)
    state = {"legacy": legacy.get_state(), "pcg": generator.bit_generator.state, "raw": b"\x00\xffkv"}
    save_state(tmp_path / "n.safetensors", state, atomic_write)
    back = load_state(tmp_path / "n.safetensors")
    assert back["raw"] == b"\x00\xffkv"
    again = np.random.RandomState()
    again.set_state(back["legacy"])
    other = np.random.default_rng()
    other.bit_generator.state = back["pcg"]
    assert again.random() == legacy.random() and other.random() == generator.random()


@pytest.mark.parametrize(
    ("structure", "expected"),
    [
        ('{"x": {"__tensor__": []}}', "does not hold"),
        ('{"x": {"__tuple__": 3}}', "malformed tuple"),
        ('{"x": {"__items__": [[[1], 2]]}}', "key that cannot be one"),
        ('{"x": {"__items__": [[1]]}}', "malformed mapping"),
        ('{"x": {"__float__": "1e999"}}', "malformed number"),
        ('{"x": {"__bytes__": "zz"}}', "malformed bytes"),
        ('{"x": {"__tensor__": "t0", "y": 1}}', "malformed tensor"),
        ("[" * 100 + "]" * 100, "nested too deeply"),
    ],
)
def test_crafted_structures_are_refused_in_one_line(tmp_path: Path, structure: str, expected: str) -> None:
    path = tmp_path / "c.safetensors"
    metadata = {"format": "kvtool-state/1", "structure": structure}
    save_file({"t0": torch.zeros(1)}, str(path), metadata=metadata)
    with pytest.raises(StateFileError, match=expected):
        load_state(path)


def test_truncated_or_foreign_files_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.safetensors"
    save_state(path, {"w": torch.ones(64)}, atomic_write)
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(StateFileError, match="unreadable"):
        load_state(path)
    path.write_bytes(b"not a safetensors file at all")
    with pytest.raises(StateFileError, match="unreadable"):
        load_state(path)


def test_a_checkpoint_that_does_not_fit_the_run_is_a_user_error(tmp_path: Path) -> None:
    from kedit_vfl.vfl.stages.checkpoint import TrainingState

    store = CheckpointStore(tmp_path / "c")
    store.save((0, 1), {"objects": {"model": {"weight": torch.zeros(5)}}, "torch_rng": torch.get_rng_state(),
                        "generators": {}, "extra": {}, "loop": {"epoch": 1}})  # fmt: skip
    state = TrainingState(store, {}, resume_from=(0, 1))
    state.register("model", torch.nn.Linear(3, 2))
    with pytest.raises(UserError, match="does not fit this run .*start again without --resume"):
        state.resume(0)
    store.save((0, 2), {"extra": {}, "loop": {"epoch": 1}, "objects": {}, "torch_rng": torch.get_rng_state(),
                        "generators": {}})  # fmt: skip
    with pytest.raises(UserError, match="other fields than this run keeps"):
        TrainingState(store, {}, resume_from=(0, 2)).resume(0, like={"epoch": 0, "best_value": 1.0})
    store.save((0, 3), {"loop": {}})
    with pytest.raises(UserError, match="does not fit this run"):
        TrainingState(store, {}, resume_from=(0, 3))
    with pytest.raises(UserError, match="does not fit this run"):
        store.restore((0, 3), lambda s: s["tower"])


def test_what_a_stage_reads_from_the_resumed_extra_is_checked_too(tmp_path: Path) -> None:
    from kedit_vfl.vfl.stages.checkpoint import TrainingState
    from kedit_vfl.vfl.stages.train import FitResult

    store = CheckpointStore(tmp_path / "c")
    store.save((1, 1), {"extra": {"fit0": {"bogus": 1}}, "loop": {}})
    state = TrainingState(store, {}, resume_from=(1, 1))
    with pytest.raises(UserError, match="epoch0001.safetensors: this checkpoint does not fit this run"):
        with state.fitting():
            FitResult(**state.extra["fit0"])
    with TrainingState(None, {}).fitting():  # nothing resumed: errors are not the file's
        pass
