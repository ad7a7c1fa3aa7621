"""Loaders: every public sample format, auto-detected, and clear errors on bad input."""

from __future__ import annotations

import json

import pytest

from kedit_vfl.edit.data.loaders import detect_format, load_records, records_to_dataset, true_facts
from kedit_vfl.edit.data.records import EditRecord
from kedit_vfl.errors import UserError

# file, records, task, source, (share with rephrase, share with locality, share with portability) at least
SAMPLES = [
    ("knowedit_wiki_counterfact_train.sample.json", 500, "counterfact", "knowedit", (0.0, 0.99, 0.99)),
    ("knowedit_wiki_recent_train.sample.json", 570, "recent", "knowedit", (0.0, 0.7, 0.1)),
    ("knowedit_zsre_test.sample.json", 500, "zsre", "knowedit", (1.0, 1.0, 1.0)),
    ("zsre_mend_eval_portability_gpt4.sample.json", 500, "zsre", "zsre", (1.0, 1.0, 1.0)),
    ("counterfact_portability_gpt4.sample.json", 500, "counterfact", "rome", (1.0, 1.0, 1.0)),
    ("counterfact_easyedit_val.sample.json", 500, "counterfact", "easyedit", (1.0, 1.0, 0.0)),
    ("convsent_blender_test.sample.json", 500, "convsent", "convsent", (1.0, 0.0, 0.0)),
]


@pytest.mark.parametrize(("name", "count", "task", "source", "shares"), SAMPLES)
def test_real_samples_load_with_their_task(shared_dir, name, count, task, source, shares) -> None:
    records = load_records([shared_dir / "data" / "edit" / name])
    assert len(records) == count
    assert {r.task for r in records} == {task} and {r.source for r in records} == {source}
    for record in records:
        assert record.prompt.strip() and record.target_new.strip()
        assert all(p.prompt and p.answer for p in record.locality + record.portability)
    for share, field in zip(shares, ("rephrase", "locality", "portability"), strict=True):
        assert sum(bool(getattr(r, field)) for r in records) >= share * count, field


def test_each_layout_maps_its_fields(shared_dir) -> None:
    data = shared_dir / "data" / "edit"
    rome = load_records([data / "counterfact_portability_gpt4.sample.json"])[0]
    assert rome.prompt == "Spike Hughes originates from" and rome.target_new == "Philadelphia"
    assert rome.ground_truth == "London" and rome.locality[0].answer == "London"
    assert rome.rephrase[1].endswith("Spike Hughes was born in")
    zsre = load_records([data / "zsre_mend_eval_portability_gpt4.sample.json"])[0]
    assert (zsre.prompt, zsre.target_new, zsre.ground_truth) == (
        "When was the inception of IAAF Combined Events Challenge?",
        "2006",
        "1998",
    )
    assert zsre.locality[0].answer == "The String" and zsre.portability[0].answer == "Athletics"
    recent = load_records([data / "knowedit_wiki_recent_train.sample.json"])[0]
    # Nested alias lists become their first alias.
    assert recent.locality[1].answer == "Soviet Union" and recent.ground_truth is None
    convsent = load_records([data / "convsent_blender_test.sample.json"])
    assert convsent[0].prompt == "What do you think of Estero?"
    assert convsent[0].extra["label"] == "positive" and convsent[1].extra["label"] == "negative"
    assert convsent[0].target_new == "I really like his style."


def test_task_override_and_normalised_round_trip(tmp_path, shared_dir) -> None:
    source = shared_dir / "data" / "edit" / "knowedit_zsre_test.sample.json"
    records = load_records([source], task="qa")[:5]
    assert {r.task for r in records} == {"qa"}
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in records))
    assert load_records([path]) == records
    assert load_records(tmp_path) == records  # a folder reads its data files
    dataset = records_to_dataset(records)
    assert dataset.num_rows == 5
    dataset.to_parquet(str(tmp_path / "records.parquet"))
    assert load_records([tmp_path / "records.parquet"]) == records


def _file(tmp_path, records, name="data.json"):
    path = tmp_path / name
    path.write_text(json.dumps(records))
    return path


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ([{"src": "Q?", "alt": "A"}, {"src": "Q?", "alt": ""}], r"record 2: empty 'alt'"),
        (
            [{"src": "Q?", "alt": "A"}, {"src": "", "alt": "B"}],
            r"record 2: missing 'src'|record 2: empty 'src'",
        ),
        ([{"prompt": "P", "target_new": "   "}], r"record 1: empty 'target_new'"),
        ([{"prompt": "P", "target_new": []}], r"record 1: missing 'target_new'"),
        (
            [{"requested_rewrite": {"prompt": "{} is", "subject": "X", "target_new": {"str": ""}}}],
            "target_new.str",
        ),
        ([{"task": "zsre", "prompt": "P"}], r"record 1: missing or empty 'target_new'"),
        ([{"question": "Q", "answer": "A"}], "unknown record format"),
        ([["not", "an", "object"]], "unknown record format"),
        ([], "no records"),
    ],
)
def test_bad_records_name_the_file_and_record(tmp_path, records, message) -> None:
    path = _file(tmp_path, records)
    with pytest.raises(UserError, match=message) as info:
        load_records([path])
    assert str(path) in str(info.value)


def test_unreadable_and_malformed_files(tmp_path) -> None:
    with pytest.raises(UserError, match="no such file"):
        load_records([tmp_path / "absent.json"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task": "zsre", "prompt": "P", "target_new": "T"}\n{oops\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: not valid JSON Lines"):
        load_records([bad])
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(UserError, match="cannot read"):
        load_records([binary])
    with pytest.raises(UserError, match="no data files"):
        load_records([tmp_path / "empty_dir"] if (tmp_path / "empty_dir").mkdir() is None else [])


def test_knowedit_task_falls_back_to_the_record_shape(tmp_path) -> None:
    recent = _file(tmp_path, [{"prompt": "The job of X is", "target_new": "cook"}], "a.json")
    counterfact = _file(tmp_path, [{"prompt": "P", "target_new": "T", "ground_truth": "G"}], "b.json")
    question = _file(tmp_path, [{"prompt": "Who is X?", "target_new": "T", "ground_truth": ["G"]}], "c.json")
    assert [load_records([p])[0].task for p in (recent, counterfact, question)] == [
        "recent",
        "counterfact",
        "zsre",
    ]
    assert detect_format({"ent": "X", "pos": []}, tmp_path) == "convsent"
    assert isinstance(load_records(recent)[0], EditRecord)


def test_true_facts_are_what_the_model_knows_before_the_edit(shared_dir) -> None:
    records = load_records([shared_dir / "data" / "edit" / "counterfact_portability_gpt4.sample.json"])[:3]
    facts = true_facts(records)
    assert ("Spike Hughes originates from", "London") in facts
    assert ("Max Mosley originates from", "London") in facts  # a locality probe
    assert not any((r.prompt, r.target_new) in facts for r in records)
    assert len(facts) == len(set(facts))
