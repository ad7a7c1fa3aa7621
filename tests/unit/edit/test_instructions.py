"""Instruction pools: the shipped file, validation errors and placeholder filling."""

from __future__ import annotations

import json

import pytest

from kedit_vfl.edit.data.instructions import (
    InstructionPools,
    default_pools,
    fill_placeholders,
    format_instruction,
    load_pools,
)
from kedit_vfl.edit.data.records import EditRecord
from kedit_vfl.edit.data.world import TASKS
from kedit_vfl.errors import UserError


def test_default_pools_cover_every_task_with_a_held_out_description() -> None:
    pools = default_pools()
    assert set(pools.tasks) == set(TASKS)
    for task in TASKS:
        assert len(pools.pools[task]) + 1 >= 5
        assert pools.held_out[task] not in pools.pools[task]
    assert InstructionPools.from_dict(pools.to_dict()) == pools


def test_format_instruction_fills_placeholders_from_the_record() -> None:
    record = EditRecord(
        task="convsent",
        prompt="What do you think of Varo?",
        target_new="I hate it",
        subject="Varo",
        extra={"label": "negative"},
    )
    text = format_instruction("convsent", "Make it [LABEL] about [TOPIC].", record.prompt, record)
    assert (
        text == "Task: convsent\nDescription: Make it negative about Varo.\nInput: What do you think of Varo?"
    )
    # Without a record the placeholders are still filled, never left raw.
    assert "[" not in fill_placeholders("Make it [LABEL] about [TOPIC].")


def _write(tmp_path, data) -> str:
    path = tmp_path / "pools.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_load_pools_round_trips_a_valid_file(tmp_path) -> None:
    data = {"qa": {"train": [f"Answer it, way {i}." for i in range(4)], "held_out": "Answer it anew."}}
    assert load_pools(_write(tmp_path, data)).held_out == {"qa": "Answer it anew."}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"qa": {"train": ["a", "b", "c", "d", "e"]}}, "held-out"),
        ({"qa": {"train": ["a", "b", "c"], "held_out": "z"}}, "at least 5"),
        ({"qa": {"train": ["a", "b", "c", "d"], "held_out": "a"}}, "also in 'train'"),
        ({"qa": {"train": ["a", "b", "c", "[MOOD] d"], "held_out": "z"}}, "unknown placeholder"),
        ({"qa": ["a", "b"]}, "must map to"),
        ([], "expected a JSON object"),
    ],
)
def test_load_pools_rejects_bad_files(tmp_path, data, message) -> None:
    with pytest.raises(UserError, match=message):
        load_pools(_write(tmp_path, data))


def test_load_pools_names_unreadable_and_invalid_files(tmp_path) -> None:
    with pytest.raises(UserError, match="cannot read"):
        load_pools(tmp_path / "absent.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_pools(bad)
