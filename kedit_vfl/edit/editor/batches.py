"""Turn edit records into token batches keyed by role, with the task instruction applied.

Roles (as in MEND): ``edit_inner`` (instructed prompt + new target: the gradient the
editor sees), ``edit_outer`` (the prompt and a rephrase, as a user asks them, or
instructed with ``instructed_queries``: what the edit must achieve) and ``loc`` (locality
prompts + answers, never instructed: what must not change).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kedit_vfl.edit.data.instructions import InstructionPools, format_instruction
from kedit_vfl.edit.data.records import EditRecord
from kedit_vfl.edit.models.tokens import TokenBatch, encode_pairs
from kedit_vfl.errors import UserError


@dataclass(frozen=True)
class Prompter:
    """Prefixes prompts with a task instruction (or not, for the no-instruction baseline).

    Training draws a description at random from the task's pool (the held-out one
    excluded); evaluation takes ``index`` or, with ``unseen``, the held-out description.
    """

    pools: InstructionPools | None
    index: int = 0
    unseen: bool = False

    def description(self, task: str, rng: random.Random | None = None) -> str | None:
        if self.pools is None:
            return None
        if self.unseen:
            if task not in self.pools.held_out:
                raise UserError(f"--unseen-instruction: the editor's instructions hold none out for '{task}'")
            return self.pools.held_out[task]
        pool = self.pools.pools.get(task)
        if not pool:
            raise UserError(
                f"task '{task}': the editor's instruction pools have no description for it "
                f"(they cover {', '.join(sorted(self.pools.pools))})"
            )
        if rng is not None:
            return rng.choice(pool)
        if self.index >= len(pool):
            raise UserError(f"--instruction-index {self.index}: task '{task}' has {len(pool)} descriptions")
        return pool[self.index]

    def __call__(self, record: EditRecord, prompt: str, rng: random.Random | None = None) -> str:
        description = self.description(record.task, rng)
        if description is None:
            return prompt
        return format_instruction(record.task, description, prompt, record)


def _encode(tokenizer: Any, pairs: list[tuple[str, str]], max_length: int, where: str) -> TokenBatch | None:
    if not pairs:
        return None
    return encode_pairs(tokenizer, [p for p, _ in pairs], [t for _, t in pairs], max_length, where)


def where_of(record: EditRecord) -> str:
    return str(record.extra.get("where") or f"{record.task} record {record.prompt[:40]!r}")


@dataclass
class MetaBatches:
    """One meta-training step's batches by role, and each edit's instruction (None: none)."""

    inner: TokenBatch
    outer: TokenBatch
    loc: TokenBatch | None
    descriptions: list[str | None]


def training_batches(
    records: Sequence[EditRecord],
    prompter: Prompter,
    tokenizer: Any,
    max_length: int,
    rng: random.Random,
    use_rephrase: bool = True,
    loc_pool: Sequence[EditRecord] = (),
    instructed_queries: bool = True,
    prefix_inner: bool = True,
) -> MetaBatches:
    """One meta-training step's batches; one rephrase and one locality pair per record.
    ``prefix_inner``: the instruction prefixes the edit input (off for an editor that is
    conditioned on the instruction instead)."""
    inner, outer, loc, descriptions = [], [], [], []
    for record in records:
        # one description per record, shared by its inner and outer prompts
        seed = rng.random()
        descriptions.append(prompter.description(record.task, random.Random(seed)))
        edits_with = prompter if prefix_inner else Prompter(None)
        inner.append((edits_with(record, record.prompt, random.Random(seed)), record.target_new))
        asked = prompter if instructed_queries else Prompter(None)
        outer.append((asked(record, record.prompt, random.Random(seed)), record.target_new))
        if use_rephrase and record.rephrase:
            rephrase = rng.choice(record.rephrase)
            outer.append((asked(record, rephrase, random.Random(seed)), record.target_new))
        source = record if record.locality else (rng.choice(loc_pool) if loc_pool else None)
        if source is not None and source.locality:
            pair = rng.choice(source.locality)
            loc.append((pair.prompt, pair.answer))
    where = where_of(records[0])
    inner_batch = _encode(tokenizer, inner, max_length, where)
    outer_batch = _encode(tokenizer, outer, max_length, where)
    assert inner_batch is not None and outer_batch is not None  # records is never empty
    return MetaBatches(inner_batch, outer_batch, _encode(tokenizer, loc, max_length, where), descriptions)


@dataclass
class Probe:
    """Every prompt one record is scored on, in one batch, and which rows are which."""

    batch: TokenBatch
    rows: dict[str, slice]  # reliability / generalization / locality / portability


def edit_batch(
    records: Sequence[EditRecord], prompter: Prompter, tokenizer: Any, max_length: int
) -> TokenBatch:
    """The gradient-capture batch: instructed prompt + new target for each record."""
    pairs = [(prompter(r, r.prompt), r.target_new) for r in records]
    return encode_pairs(
        tokenizer, [p for p, _ in pairs], [t for _, t in pairs], max_length, where_of(records[0])
    )


def probe(record: EditRecord, prompter: Prompter, tokenizer: Any, max_length: int) -> Probe:
    """The scoring batch of one record: edit prompt, rephrases, locality and portability."""
    groups = {
        "reliability": [(prompter(record, record.prompt), record.target_new)],
        "generalization": [(prompter(record, r), record.target_new) for r in record.rephrase],
        "locality": [(p.prompt, p.answer) for p in record.locality],
        "portability": [(prompter(record, p.prompt), p.answer) for p in record.portability],
    }
    pairs, rows, start = [], {}, 0
    for name, group in groups.items():
        rows[name] = slice(start, start + len(group))
        pairs.extend(group)
        start += len(group)
    batch = encode_pairs(
        tokenizer, [p for p, _ in pairs], [t for _, t in pairs], max_length, where_of(record)
    )
    return Probe(batch, rows)
