"""The embedded base model: pretraining, reproducibility, caching, and the shipped default."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kedit_vfl.edit.data import embedded
from kedit_vfl.edit.data.embedded import SHIPPED_DIR, WorldConfig, load_embedded_world
from kedit_vfl.edit.data.world import SPLITS, TASKS
from kedit_vfl.edit.models.pretrain import PretrainConfig, answer_accuracy, pretrain_on_facts
from kedit_vfl.errors import UserError

TINY = PretrainConfig(
    vocab_size=300,
    n_embd=32,
    n_layer=2,
    n_head=2,
    n_positions=32,
    block_size=16,
    batch_size=4,
    lr=5e-3,
    warmup_steps=5,
    max_epochs=2,
    eval_every=5,
)
NAMES = ["Ana", "Bo", "Cid", "Dee", "Eve", "Fay", "Gus", "Hal"]
FACTS = [(f"The color of {n} is", c) for n, c in zip(NAMES, ["red", "blue", "green"] * 3, strict=False)]


def test_pretraining_is_reproducible_and_saves_a_loadable_folder(tmp_path) -> None:
    m1, tok, _ = pretrain_on_facts(FACTS, ["Plain text."], TINY, out_dir=tmp_path / "m")
    m2, _, _ = pretrain_on_facts(FACTS, ["Plain text."], TINY)
    for (name, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert loaded.padding_side == "right" and loaded.pad_token_id != loaded.eos_token_id
    ids = loaded(["The color of Ana is red"], return_tensors="pt")["input_ids"]
    assert torch.allclose(model(ids).logits, m1(ids).logits, atol=1e-6)
    assert tok("Task: x\nInput: y")["input_ids"]  # byte-level BPE encodes any text


def test_pretraining_learns_the_facts() -> None:
    config = PretrainConfig(**{**TINY.__dict__, "max_epochs": 150, "target_accuracy": 1.0})
    model, tok, result = pretrain_on_facts(FACTS, (), config)
    assert result.accuracy >= 0.95
    assert answer_accuracy(model, tok, FACTS)[0] == result.accuracy


def test_word_level_tokenizer_keeps_answers_whole() -> None:
    config = PretrainConfig(**{**TINY.__dict__, "tokenizer": "word"})
    _, tok, _ = pretrain_on_facts(FACTS, (), config)
    assert tok.tokenize("The color of Ana is red") == ["The", "color", "of", "Ana", "is", "red"]


def test_a_fresh_world_is_built_once_then_loaded_from_the_cache(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("KVTOOL_CACHE", str(tmp_path / "cache"))
    config = WorldConfig(seed=5, countries=4, people=4, recent=2)
    recipe = PretrainConfig(**{**TINY.__dict__, "vocab_size": 600, "n_positions": 64, "block_size": 32})
    world = load_embedded_world(config, pretrain=recipe, min_accuracy=0.0)
    assert world.root.parent == tmp_path / "cache" / "edit"
    assert json.loads((world.root / "manifest.json").read_text())["config"]["seed"] == 5
    lines = world.records_file("test").read_text().splitlines()
    assert len(lines) == sum(len(world.records["test"][t]) for t in TASKS)

    def no_build(*args, **kwargs):
        raise AssertionError("rebuilt a cached world")

    monkeypatch.setattr(embedded, "_build", no_build)
    again = load_embedded_world(config, pretrain=recipe, min_accuracy=0.0)
    assert again.records == world.records


def test_the_shipped_default_world_loads_and_its_model_knows_its_facts() -> None:
    world = load_embedded_world()
    assert world.root == SHIPPED_DIR
    assert world.fact_accuracy >= 0.95
    assert all(world.records[s][t] for s in SPLITS for t in TASKS)
    model = AutoModelForCausalLM.from_pretrained(world.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(world.model_dir)
    facts = embedded.generate_world(world.config).pretraining_facts()[::3]  # the manifest covers all
    exact, _ = answer_accuracy(model, tokenizer, facts)
    assert exact >= 0.95


@pytest.mark.parametrize("split", ["nope"])
def test_records_file_rejects_unknown_split(split, tmp_path) -> None:
    world = embedded.EmbeddedWorld(WorldConfig(), tmp_path, {}, tmp_path, {})
    with pytest.raises(UserError, match="split"):
        world.records_file(split)


def test_facts_longer_than_a_block_keep_their_answer_and_overlong_ones_are_refused() -> None:
    long_facts = [
        (f"Long ago and far away in a land of {n} the color was", c)
        for n, c in [("Ana", "red"), ("Bo", "blue"), ("Cid", "green")]
    ]
    config = PretrainConfig(**{**TINY.__dict__, "max_epochs": 150, "target_accuracy": 1.0, "block_size": 8})
    _, tok, result = pretrain_on_facts(long_facts, (), config)
    assert len(tok(long_facts[0][0])["input_ids"]) > config.block_size
    assert result.accuracy == 1.0
    with pytest.raises(UserError, match="over the context"):
        pretrain_on_facts([("word " * 40, "end")], (), TINY)


def test_a_world_whose_model_does_not_learn_its_facts_is_refused(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("KVTOOL_CACHE", str(tmp_path / "cache"))
    recipe = PretrainConfig(**{**TINY.__dict__, "vocab_size": 600, "n_positions": 64, "block_size": 32})
    with pytest.raises(UserError, match="knows only"):
        load_embedded_world(WorldConfig(seed=6, countries=4, people=4, recent=2), pretrain=recipe)
    cache = tmp_path / "cache" / "edit"
    assert not cache.exists() or not list(cache.iterdir())  # nothing half-built is left behind
