"""The synthetic world: deterministic by seed, held-out phrasings unseen, disjoint splits."""

from __future__ import annotations

import pytest

from kedit_vfl.edit.data.records import EditRecord
from kedit_vfl.edit.data.world import SPLITS, TASKS, WorldConfig, generate_world
from kedit_vfl.errors import UserError

SMALL = WorldConfig(seed=3, countries=12, people=16, recent=8)


def _dump(world) -> list[dict]:
    return [r.to_dict() for s in SPLITS for t in TASKS for r in world.records[s][t]]


def test_same_seed_same_world_and_other_seed_other_world() -> None:
    a, b = generate_world(SMALL), generate_world(SMALL)
    assert _dump(a) == _dump(b)
    assert a.pretraining_facts() == b.pretraining_facts()
    c = generate_world(WorldConfig(seed=4, countries=12, people=16, recent=8))
    assert _dump(c) != _dump(a)


def test_every_split_has_every_task_and_records_validate() -> None:
    world = generate_world(SMALL)
    for split in SPLITS:
        for task in TASKS:
            records = world.records[split][task]
            assert records, (split, task)
            for record in records:
                assert record.task == task
                assert EditRecord.from_dict(record.to_dict()) == record
                assert record.rephrase and record.locality
                assert record.target_new != record.ground_truth


def test_held_out_phrasings_and_recent_entities_are_not_in_pretraining() -> None:
    world = generate_world(SMALL)
    pretrained = {prompt for prompt, _ in world.pretraining_facts()}
    corpus = " ".join(pretrained)
    for split in SPLITS:
        for task in TASKS:
            for record in world.records[split][task]:
                assert not set(record.rephrase) & pretrained, record
                if task == "recent":
                    assert record.subject not in corpus
                else:
                    assert record.prompt in pretrained  # the edit starts from a fact the model knows
    assert not {p for p, _ in world.held_out_facts()} & pretrained


def test_locality_probes_are_true_pretrained_facts() -> None:
    world = generate_world(SMALL)
    known = dict(world.pretraining_facts())
    for split in SPLITS:
        for task in TASKS:
            for record in world.records[split][task]:
                for probe in record.locality:
                    assert known[probe.prompt] == probe.answer


def test_splits_are_disjoint_by_subject() -> None:
    world = generate_world(SMALL)
    subjects = {s: {r.subject for t in TASKS for r in world.records[s][t]} for s in SPLITS}
    assert not subjects["train"] & subjects["validation"]
    assert not subjects["train"] & subjects["test"]
    assert not subjects["validation"] & subjects["test"]


def test_tasks_conflict_on_the_same_kind_of_prompt() -> None:
    # counterfact and recent share declarative phrasings; the instruction (or the subject) tells them apart.
    world = generate_world(SMALL)

    def shape(record):
        return record.prompt.replace(record.subject, "{}")

    counterfact = {shape(r) for r in world.records["train"]["counterfact"]}
    recent = {shape(r) for r in world.records["train"]["recent"]}
    assert counterfact & recent


def test_sizes_are_validated() -> None:
    with pytest.raises(UserError, match="--world-countries"):
        WorldConfig(countries=1)
