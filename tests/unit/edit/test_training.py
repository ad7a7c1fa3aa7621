from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest
import torch

from kedit_vfl.edit.config import EditorConfig, TrainConfig
from kedit_vfl.edit.data.instructions import default_pools
from kedit_vfl.edit.data.sources import split_validation
from kedit_vfl.edit.editor.batches import Prompter, training_batches
from kedit_vfl.edit.editor.network import Editor
from kedit_vfl.edit.editor.training import _Trainer, meta_step, sample_records
from kedit_vfl.edit.models.base import load_base_model
from tests.unit.edit.tiny import records, save_tiny, tokenizer


def test_task_sampling_is_uniform_over_tasks() -> None:
    data = {"counterfact": records("counterfact", 6) * 50, "recent": records("recent", 2)}
    counts = Counter(r.task for r in sample_records(data, 2000, random.Random(0)))
    assert abs(counts["counterfact"] - counts["recent"]) < 200


def test_validation_split_is_seeded_and_not_the_tail() -> None:
    data = {"counterfact": records("counterfact", 6) + records("counterfact", 6)[::-1]}
    data["counterfact"] = [
        r.__class__(**{**r.__dict__, "prompt": f"{r.prompt} {i}"}) for i, r in enumerate(data["counterfact"])
    ]
    train, val = split_validation(data, 0.25, seed=0)
    again, val_again = split_validation(data, 0.25, seed=0)
    assert [r.prompt for r in val["counterfact"]] == [r.prompt for r in val_again["counterfact"]]
    assert len(val["counterfact"]) == 3 and len(train["counterfact"]) == 9
    assert [r.prompt for r in val["counterfact"]] != [r.prompt for r in data["counterfact"][-3:]]


@pytest.mark.parametrize("instructed_queries", [True, False])
def test_meta_training_lowers_the_loss_on_repeated_edits(tmp_path: Path, instructed_queries: bool) -> None:
    torch.manual_seed(0)
    base = load_base_model(str(save_tiny("gpt2", tmp_path / "gpt2")), torch.device("cpu"), n_blocks=2)
    config = TrainConfig(
        model=str(tmp_path),
        tasks=("counterfact",),
        holdout=None,
        batch_size=2,
        lr=1e-3,
        instructed_queries=instructed_queries,
    )
    editor = Editor(base.targets, EditorConfig(edit_lr=0.05)).train()
    optimizer = torch.optim.Adam(editor.parameters(), lr=1e-3)
    batch = records("counterfact", 2)
    prompter = Prompter(default_pools())
    losses = []
    for _ in range(40):
        optimizer.zero_grad()
        logs = meta_step(editor, base, batch, prompter, config, random.Random(0), [])
        optimizer.step()
        losses.append(logs["loss"])
        assert set(logs) >= {"loss", "loss/edit", "loss/loc", "edit/acc"}
    assert losses[-1] < losses[0] - 0.02
    assert float(editor.x_norms[0].count[0]) > 0  # running statistics were updated


def test_weight_average_is_the_decayed_mean_of_the_trajectory(tmp_path: Path) -> None:
    base = load_base_model(str(save_tiny("gpt2", tmp_path / "gpt2")), torch.device("cpu"), n_blocks=1)
    editor = Editor(base.targets, EditorConfig())
    start = {k: p.detach().clone() for k, p in editor.named_parameters()}
    config = TrainConfig(model=str(tmp_path), tasks=("counterfact",), holdout=None, ema=0.5)
    trainer = _Trainer(config, editor, None)
    for _ in range(3):  # stand-in optimizer steps: every weight goes up by 1
        with torch.no_grad():
            for p in editor.parameters():
                p.add_(1.0)
        trainer.update_average()
        trainer.step += 1
    # steps 1..3 weighted 0.25, 0.5, 1 (bias-corrected: the starting weights do not count)
    shift = (0.25 * 1 + 0.5 * 2 + 1 * 3) / 1.75
    with trainer.averaged_weights():
        for name, p in editor.named_parameters():
            torch.testing.assert_close(p, start[name] + shift)
    for name, p in editor.named_parameters():  # the trained weights are back
        torch.testing.assert_close(p, start[name] + 3)

    plain = _Trainer(
        TrainConfig(model=str(tmp_path), tasks=("counterfact",), holdout=None, ema=0), editor, None
    )
    plain.update_average()
    with plain.averaged_weights():  # off: the trained weights themselves
        for name, p in editor.named_parameters():
            torch.testing.assert_close(p, start[name] + 3)


@pytest.mark.parametrize("instructed_queries", [True, False])
def test_the_edit_loss_is_on_the_prompts_a_user_asks_unless_told(instructed_queries: bool) -> None:
    tok = tokenizer()
    record = records("counterfact", 1)[0]
    batches = training_batches(
        [record], Prompter(default_pools()), tok, 256, random.Random(0), True, (), instructed_queries
    )
    inner = tok.decode(batches.inner.input_ids[0])
    outer = [tok.decode(row) for row in batches.outer.input_ids]
    assert inner.startswith("Task: counterfact")  # the editor always sees the instruction
    assert len(outer) == 2  # the prompt and one rephrase
    assert all(text.startswith("Task: counterfact") == instructed_queries for text in outer)
    assert any(record.prompt in text for text in outer)
    assert batches.descriptions[0] in default_pools().pools["counterfact"]


def test_a_conditioned_editor_differentiates_the_plain_prompt_and_gets_the_instruction() -> None:
    tok = tokenizer()
    record = records("counterfact", 1)[0]
    batches = training_batches(
        [record], Prompter(default_pools()), tok, 256, random.Random(0), prefix_inner=False
    )
    assert tok.decode(batches.inner.input_ids[0]).startswith(record.prompt)
    assert batches.descriptions[0] in default_pools().pools["counterfact"]
    assert training_batches([record], Prompter(None), tok, 256, random.Random(0)).descriptions == [None]
