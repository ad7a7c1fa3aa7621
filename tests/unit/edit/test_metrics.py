from __future__ import annotations

import torch

from kedit_vfl.edit.evaluation.metrics import kl_on_answers, nll_mean, token_accuracy, unchanged_top1
from kedit_vfl.edit.models.tokens import TokenBatch


def _batch() -> TokenBatch:
    ids = torch.tensor([[5, 6, 7, 8], [5, 6, 9, 1]])
    labels = torch.tensor([[-100, -100, 7, 8], [-100, -100, 9, -100]])
    return TokenBatch(ids, torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]), labels)


def _logits(predictions: list[list[int]], vocab: int = 10) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(predictions), vocab).float() * 5


def test_token_accuracy_counts_target_tokens_only() -> None:
    batch = _batch()
    # position t predicts token t+1: row 0 gets 7 right and 8 wrong; row 1 gets 9 right
    logits = _logits([[0, 7, 3, 0], [0, 9, 0, 0]])
    assert token_accuracy(logits, batch).tolist() == [0.5, 1.0]


def test_unchanged_top1_and_kl() -> None:
    batch = _batch()
    pre = _logits([[0, 7, 8, 0], [0, 9, 0, 0]])
    post = _logits([[2, 7, 3, 2], [4, 9, 4, 4]])  # non-answer positions changed freely
    assert unchanged_top1(pre, post, batch).tolist() == [0.5, 1.0]
    assert float(kl_on_answers(pre, pre, batch)) == 0.0
    assert float(kl_on_answers(pre, post, batch)) > 0.0


def test_nll_mean_is_per_target_token() -> None:
    batch = _batch()
    uniform = torch.zeros(2, 4, 10)
    assert torch.isclose(nll_mean(uniform, batch), torch.log(torch.tensor(10.0)))
