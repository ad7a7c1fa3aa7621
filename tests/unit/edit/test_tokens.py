from __future__ import annotations

import pytest

from kedit_vfl.edit.models.tokens import encode_pairs, join
from kedit_vfl.errors import UserError
from tests.unit.edit.tiny import tokenizer


def test_target_tokens_are_marked_after_tokenising_together() -> None:
    tok = tokenizer()
    batch = encode_pairs(
        tok, ["The capital of Zorvia is", "What is the capital of Mirland?"], ["Rome", " Tosk"], 64
    )
    for row, (prompt, target) in enumerate(
        [("The capital of Zorvia is", "Rome"), ("What is the capital of Mirland?", " Tosk")]
    ):
        ids = tok(join(prompt, target))["input_ids"]
        assert batch.input_ids[row, : len(ids)].tolist() == ids
        labelled = [i for i, label in enumerate(batch.labels[row].tolist()) if label != -100]
        assert tok.decode([ids[i] for i in labelled]).strip() == target.strip()
        assert labelled == list(range(labelled[0], len(ids)))  # the target is the tail
        # the predict mask is the label mask shifted one position left
        assert batch.predict_mask[row].nonzero().flatten().tolist() == [i - 1 for i in labelled]
    assert batch.attention_mask.sum(1).tolist() == [
        len(tok(join(p, t))["input_ids"])
        for p, t in [("The capital of Zorvia is", "Rome"), ("What is the capital of Mirland?", " Tosk")]
    ]


def test_empty_target_and_too_long_prompt_are_user_errors() -> None:
    tok = tokenizer()
    with pytest.raises(UserError, match="empty target"):
        encode_pairs(tok, ["The capital of Zorvia is"], ["  "], 64, where="edits.jsonl:3")
    with pytest.raises(UserError, match="edits.jsonl:4: .*longer than the model's context"):
        encode_pairs(tok, ["The capital of Zorvia is " * 20], ["Rome"], 32, where="edits.jsonl:4")
