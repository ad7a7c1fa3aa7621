"""Pretrain a small GPT-2 from scratch until it knows a list of facts.

Used for the embedded world's base model and for the real-records benchmark's base
model (pretrained on the true facts of the public samples). Generic: it takes
``(prompt, answer)`` facts and optional plain texts, trains a tokenizer on them with the
``tokenizers`` library, and trains a GPT-2 built from :class:`transformers.GPT2Config`.

Training packs whole segments (``prompt answer\\n`` for facts, ``text\\n`` for texts)
into blocks that start at a segment boundary, in a fresh random order every epoch. So a
fact is learnt both at position 0 and after unrelated context, which is what an edit
prompt behind an instruction prefix looks like. The loss covers the answer tokens of
facts (the prompts are random entity names, not worth predicting) and every token of the
plain texts. Tokenizers pad on the right; a fact's text is ``prompt + " " + answer``.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from kedit_vfl.errors import UserError
from kedit_vfl.progress import SILENT, Reporter

PAD, EOS, UNK = "<|pad|>", "<|endoftext|>", "<|unk|>"
SEPARATOR = "\n"


@dataclass(frozen=True)
class PretrainConfig:
    """Tokenizer, model and training settings (the defaults suit ~2,000 short facts)."""

    tokenizer: str = "bpe"  # "bpe" (byte-level BPE, any text) or "word" (word-level)
    vocab_size: int = 1536
    n_embd: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_positions: int = 128
    block_size: int = 64  # packed training sequence length
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 50
    max_epochs: int = 400
    target_accuracy: float = 0.99  # stop once this share of facts is answered exactly
    eval_every: int = 5  # epochs
    seed: int = 0
    # Intra-op threads while pretraining. A model this small gains nothing from more, and
    # on a busy machine extra threads spin and wait: 1 thread ran 2.4x faster than 2 here.
    threads: int = 1

    def __post_init__(self) -> None:
        if self.tokenizer not in ("bpe", "word"):
            raise UserError(f"tokenizer '{self.tokenizer}': expected 'bpe' or 'word'")
        if self.block_size > self.n_positions:
            raise UserError(f"block_size {self.block_size} exceeds n_positions {self.n_positions}")


@dataclass(frozen=True)
class PretrainResult:
    accuracy: float  # share of facts whose answer tokens are all top-1 (alone, at position 0)
    token_accuracy: float  # share of answer tokens that are top-1
    epochs: int
    steps: int
    seconds: float


def fact_text(prompt: str, answer: str) -> str:
    """How a fact is written: the answer after one space."""
    return f"{prompt} {answer}"


def train_tokenizer(
    texts: Sequence[str], kind: str = "bpe", vocab_size: int = 1536
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE (or word-level) tokenizer on ``texts``; pad on the right."""
    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOS, PAD],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    else:
        tok = Tokenizer(models.WordLevel(unk_token=UNK))
        # Split on spaces but keep "\n" as a token: the instruction template relies on it.
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split("\n", behavior="isolated"), pre_tokenizers.WhitespaceSplit()]
        )
        trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD, UNK])
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD)
    if kind == "word":
        fast.unk_token = UNK
    fast.padding_side = "right"
    return fast


def build_model(tokenizer: PreTrainedTokenizerFast, config: PretrainConfig) -> GPT2LMHeadModel:
    """A small GPT-2 without dropout (we want memorisation) sized for ``tokenizer``."""
    gpt = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=config.n_positions,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = GPT2LMHeadModel(gpt)
    model.loss_type = "ForCausalLM"  # transformers cannot infer it from the class name and warns
    return model


def _encode(
    tokenizer: PreTrainedTokenizerFast, texts: list[str], starts: list[int]
) -> list[tuple[list, list]]:
    """Token ids and a 0/1 label mask per text: 1 for tokens that end past ``starts[i]``."""
    if not texts:
        return []
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for ids, offsets, start in zip(enc["input_ids"], enc["offset_mapping"], starts, strict=True):
        out.append((ids, [1 if end > start else 0 for _, end in offsets]))
    return out


def encode_facts(
    tokenizer: PreTrainedTokenizerFast, facts: Sequence[tuple[str, str]]
) -> list[tuple[list, list]]:
    """Tokenise ``prompt + " " + answer`` together; the mask marks the answer tokens."""
    texts = [fact_text(p, a) for p, a in facts]
    return _encode(tokenizer, texts, [len(p) + 1 for p, _ in facts])


def _fitting(encoded: list, facts: Sequence[tuple[str, str]], limit: int) -> list:
    """``encoded`` unchanged, or a UserError naming the first fact longer than the context."""
    for (ids, _), (prompt, answer) in zip(encoded, facts, strict=True):
        if len(ids) > limit:
            raise UserError(
                f"fact '{fact_text(prompt, answer)}' is {len(ids)} tokens, over the context of {limit}"
            )
    return encoded


def _segments(tokenizer: PreTrainedTokenizerFast, facts, texts) -> list[tuple[list, list]]:
    """Training segments, each followed by the separator (labelled: it ends the answer)."""
    sep = tokenizer(SEPARATOR, add_special_tokens=False)["input_ids"]
    segments = [(ids + sep, mask + [1] * len(sep)) for ids, mask in encode_facts(tokenizer, facts)]
    segments += [
        (ids + sep, [1] * (len(ids) + len(sep)))
        for ids, _ in _encode(tokenizer, list(texts), [0] * len(texts))
    ]
    return segments


def _pack(segments, order: list[int], block: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedily pack whole segments, in ``order``, into blocks; returns ids and labels (-100 = ignored).

    Segments longer than a block (only plain texts can be) are cut to it.
    """
    rows_ids, rows_mask, ids, mask = [], [], [], []
    for i in order:
        seg_ids, seg_mask = segments[i]
        if ids and len(ids) + len(seg_ids) > block:
            rows_ids.append(ids)
            rows_mask.append(mask)
            ids, mask = [], []
        ids, mask = ids + seg_ids[:block], mask + seg_mask[:block]
    rows_ids.append(ids)
    rows_mask.append(mask)
    input_ids = torch.full((len(rows_ids), block), pad_id, dtype=torch.long)
    labels = torch.full((len(rows_ids), block), -100, dtype=torch.long)
    for r, (row, row_mask) in enumerate(zip(rows_ids, rows_mask, strict=True)):
        input_ids[r, : len(row)] = torch.tensor(row)
        labels[r, : len(row)] = torch.where(torch.tensor(row_mask) > 0, torch.tensor(row), -100)
    return input_ids, labels


def _batch(encoded: list[tuple[list, list]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask and answer mask for a list of encoded facts."""
    width = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(encoded), width), dtype=torch.long)
    answer = torch.zeros((len(encoded), width), dtype=torch.bool)
    for r, (row, mask) in enumerate(encoded):
        ids[r, : len(row)] = torch.tensor(row)
        attention[r, : len(row)] = 1
        answer[r, : len(row)] = torch.tensor(mask, dtype=torch.bool)
    return ids, attention, answer


@torch.no_grad()
def answer_accuracy(
    model: GPT2LMHeadModel,
    tokenizer: PreTrainedTokenizerFast,
    facts: Sequence[tuple[str, str]],
    batch_size: int = 256,
) -> tuple[float, float]:
    """(share of facts fully right, share of answer tokens right), top-1, teacher-forced."""
    if not facts:
        return 0.0, 0.0
    model.eval()
    encoded = _fitting(encode_facts(tokenizer, facts), facts, model.config.n_positions)
    device = next(model.parameters()).device
    exact, right, total = 0, 0, 0
    for start in range(0, len(encoded), batch_size):
        ids, attention, answer = (
            t.to(device) for t in _batch(encoded[start : start + batch_size], tokenizer.pad_token_id)
        )
        logits = model(input_ids=ids, attention_mask=attention).logits  # (B, T, V)
        hit = logits[:, :-1].argmax(-1) == ids[:, 1:]  # (B, T-1): prediction of token t+1
        target = answer[:, 1:]
        right += int((hit & target).sum())
        total += int(target.sum())
        exact += int(((hit | ~target).all(dim=1)).sum())
    return exact / len(facts), right / max(total, 1)


def pretrain(
    model: GPT2LMHeadModel,
    tokenizer: PreTrainedTokenizerFast,
    facts: Sequence[tuple[str, str]],
    texts: Sequence[str] = (),
    config: PretrainConfig = PretrainConfig(),
    reporter: Reporter = SILENT,
) -> PretrainResult:
    """Train until ``config.target_accuracy`` of the facts are answered exactly, or ``max_epochs``."""
    previous_threads = torch.get_num_threads()
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    try:
        return _pretrain(model, tokenizer, facts, texts, config, reporter)
    finally:
        torch.set_num_threads(previous_threads)


def _pretrain(model, tokenizer, facts, texts, config: PretrainConfig, reporter: Reporter) -> PretrainResult:
    started = time.perf_counter()
    rng = random.Random(config.seed)
    torch.manual_seed(config.seed)
    _fitting(encode_facts(tokenizer, facts), facts, model.config.n_positions)
    segments = _segments(tokenizer, facts, texts)
    # A block holds at least the longest fact (long real-world prompts), never more than the context.
    longest_fact = max(len(ids) for ids, mask in segments[: len(facts)])
    block = min(max(config.block_size, longest_fact), model.config.n_positions)
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0, betas=(0.9, 0.98))
    steps_per_epoch = math.ceil(sum(len(s[0]) for s in segments) / block / config.batch_size)
    total_steps = steps_per_epoch * config.max_epochs

    def lr_at(step: int) -> float:  # linear warmup, then cosine decay to 10% over max_epochs
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, step / total_steps)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    step, epoch, accuracy, token_accuracy = 0, 0, 0.0, 0.0
    with reporter.task("Pretraining the base model", total=config.max_epochs) as task:
        for epoch in range(1, config.max_epochs + 1):
            model.train()
            order = list(range(len(segments)))
            rng.shuffle(order)
            input_ids, labels = _pack(segments, order, block, tokenizer.pad_token_id)
            attention = (input_ids != tokenizer.pad_token_id).long()
            loss_sum = 0.0
            batches = torch.randperm(len(input_ids)).split(config.batch_size)
            for rows in batches:
                out = model(
                    input_ids=input_ids[rows].to(device),
                    attention_mask=attention[rows].to(device),
                    labels=labels[rows].to(device),
                )
                optimizer.zero_grad(set_to_none=True)
                out.loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                step += 1
                loss_sum += float(out.loss.detach())
            metrics = {"loss": loss_sum / len(batches)}
            if epoch % config.eval_every == 0 or epoch == config.max_epochs:
                accuracy, token_accuracy = answer_accuracy(model, tokenizer, facts)
                metrics["fact_acc"] = accuracy
            task.advance(1, **metrics)
            if accuracy >= config.target_accuracy:
                break
    model.eval()
    return PretrainResult(accuracy, token_accuracy, epoch, step, time.perf_counter() - started)


def pretrain_on_facts(
    facts: Sequence[tuple[str, str]],
    texts: Sequence[str] = (),
    config: PretrainConfig = PretrainConfig(),
    out_dir: str | Path | None = None,
    reporter: Reporter = SILENT,
) -> tuple[GPT2LMHeadModel, PreTrainedTokenizerFast, PretrainResult]:
    """Tokenizer + GPT-2 trained from scratch on ``facts`` (and ``texts``); saved if ``out_dir``."""
    if not facts:
        raise UserError("pretraining needs at least one (prompt, answer) fact")
    torch.manual_seed(config.seed)
    corpus = [fact_text(p, a) for p, a in facts] + list(texts)
    tokenizer = train_tokenizer(corpus, config.tokenizer, config.vocab_size)
    model = build_model(tokenizer, config)
    result = pretrain(model, tokenizer, facts, texts, config, reporter)
    if out_dir is not None:
        save_model(model, tokenizer, out_dir)
    return model, tokenizer, result


def save_model(model: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerFast, out_dir: str | Path) -> Path:
    """A Hugging Face folder (safetensors) that ``from_pretrained`` loads directly."""
    out_dir = Path(out_dir)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # library code never prints; the caller's Reporter shows progress
    try:
        model.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return out_dir
