"""Instruction pools: task descriptions that prefix every edit input.

Each task has a pool of training descriptions and one held-out description, kept out of
editor training to measure generalisation to unseen instructions. Pools are data (a
JSON file, replaceable with ``--instructions``) and are stored inside the editor
artifact so that ``apply``/``evaluate`` reproduce them. The file layout::

    {"counterfact": {"train": ["Replace the stated fact ...", ...],
                     "held_out": "Swap the existing fact ..."},
     ...}

Placeholders ``[LABEL]`` (the requested sentiment) and ``[TOPIC]`` (the record's subject)
are always filled, in training and at test time alike (the reference leaves them raw at
test time).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from kedit_vfl.edit.data.records import EditRecord
from kedit_vfl.errors import UserError

TEMPLATE = "Task: {task}\nDescription: {description}\nInput: {prompt}"
MIN_DESCRIPTIONS = 5
PLACEHOLDERS = ("[LABEL]", "[TOPIC]")
# What fills a placeholder when the record does not say (e.g. a request without a label).
_FALLBACK = {"[LABEL]": "different", "[TOPIC]": "the topic"}
_PLACEHOLDER = re.compile(r"\[[A-Z_]+\]")


@dataclass(frozen=True)
class InstructionPools:
    """Training descriptions per task, and the one held-out description per task."""

    pools: dict[str, list[str]]
    held_out: dict[str, str]

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.pools)

    def to_dict(self) -> dict[str, Any]:
        return {
            task: {"train": list(self.pools[task]), "held_out": self.held_out[task]} for task in self.pools
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "instructions") -> InstructionPools:
        """Validate the layout; ``where`` names the source in errors."""
        if not isinstance(data, dict) or not data:
            raise UserError(f"{where}: expected a JSON object mapping each task to its descriptions")
        pools: dict[str, list[str]] = {}
        held_out: dict[str, str] = {}
        for task, entry in data.items():
            if not isinstance(entry, dict):
                raise UserError(f"{where}: task '{task}' must map to {{'train': [...], 'held_out': '...'}}")
            train = entry.get("train")
            if not isinstance(train, list) or not all(isinstance(d, str) and d.strip() for d in train):
                raise UserError(f"{where}: task '{task}' needs 'train', a list of non-empty descriptions")
            held = entry.get("held_out")
            if not isinstance(held, str) or not held.strip():
                raise UserError(f"{where}: task '{task}' lacks its held-out description ('held_out')")
            if held in train:
                raise UserError(f"{where}: task '{task}': the held-out description is also in 'train'")
            if len(train) + 1 < MIN_DESCRIPTIONS:
                raise UserError(
                    f"{where}: task '{task}' has {len(train) + 1} descriptions, "
                    f"at least {MIN_DESCRIPTIONS} are needed (one of them held out)"
                )
            for description in [*train, held]:
                unknown = set(_PLACEHOLDER.findall(description)) - set(PLACEHOLDERS)
                if unknown:
                    raise UserError(
                        f"{where}: task '{task}': unknown placeholder {sorted(unknown)[0]} "
                        f"(supported: {', '.join(PLACEHOLDERS)})"
                    )
            pools[task] = list(train)
            held_out[task] = held
        return cls(pools=pools, held_out=held_out)


def default_pools() -> InstructionPools:
    """The pools shipped with the package (``instructions.json``)."""
    text = resources.files("kedit_vfl.edit.data").joinpath("instructions.json").read_text(encoding="utf-8")
    return InstructionPools.from_dict(json.loads(text), where="instructions.json")


def load_pools(path: str | Path) -> InstructionPools:
    """Read a user's instruction file; every problem is a one-line :class:`UserError`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"{path}: cannot read the instruction file ({exc.strerror})") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from exc
    return InstructionPools.from_dict(data, where=str(path))


def fill_placeholders(description: str, record: EditRecord | None = None) -> str:
    """Replace ``[LABEL]``/``[TOPIC]`` from the record (its ``extra['label']`` and subject)."""
    values = dict(_FALLBACK)
    if record is not None:
        if record.extra.get("label"):
            values["[LABEL]"] = str(record.extra["label"])
        if record.subject:
            values["[TOPIC]"] = record.subject
    for placeholder, value in values.items():
        description = description.replace(placeholder, value)
    return description


def format_instruction(task: str, description: str, prompt: str, record: EditRecord | None = None) -> str:
    """The instructed input: ``Task: {task}\\nDescription: {description}\\nInput: {prompt}``."""
    return TEMPLATE.format(task=task, description=fill_placeholders(description, record), prompt=prompt)
