"""The one normalised edit record that every loader produces and every command consumes.

On disk it is a JSON Lines file, one object per line::

    {"task": "counterfact", "subject": "Eiffel Tower",
     "prompt": "The Eiffel Tower is located in", "target_new": "Rome",
     "ground_truth": "Paris",                       # null where unknown / not applicable
     "rephrase": ["Where is the Eiffel Tower? It is in"],
     "locality": [{"prompt": "The capital of Japan is", "answer": "Tokyo"}],
     "portability": [{"prompt": "The Eiffel Tower's country is", "answer": "Italy"}],
     "source": "knowedit"}
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from kedit_vfl.errors import UserError


@dataclass(frozen=True)
class PromptAnswer:
    prompt: str
    answer: str


@dataclass(frozen=True)
class EditRecord:
    task: str
    prompt: str
    target_new: str
    subject: str = ""
    ground_truth: str | None = None
    rephrase: tuple[str, ...] = ()
    locality: tuple[PromptAnswer, ...] = ()
    portability: tuple[PromptAnswer, ...] = ()
    source: str = "kvtool"
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["rephrase"] = list(self.rephrase)
        data["locality"] = [asdict(p) for p in self.locality]
        data["portability"] = [asdict(p) for p in self.portability]
        if not data["extra"]:
            del data["extra"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "record") -> EditRecord:
        """Build and validate a record; ``where`` names it in errors (``file.jsonl:12``)."""
        if not isinstance(data, dict):
            raise UserError(f"{where}: expected a JSON object, got {type(data).__name__}")
        for key in ("task", "prompt", "target_new"):
            value = data.get(key)
            if not isinstance(value, str) or not value.strip():
                raise UserError(f"{where}: missing or empty '{key}' (expected a non-empty string)")
        rephrase = data.get("rephrase") or []
        if isinstance(rephrase, str):
            rephrase = [rephrase]
        return cls(
            task=data["task"],
            prompt=data["prompt"],
            target_new=data["target_new"],
            subject=str(data.get("subject") or ""),
            ground_truth=data.get("ground_truth"),
            rephrase=tuple(str(r) for r in rephrase if str(r).strip()),
            locality=_pairs(data.get("locality"), where, "locality"),
            portability=_pairs(data.get("portability"), where, "portability"),
            source=str(data.get("source") or "kvtool"),
            extra=dict(data.get("extra") or {}),
        )


def _pairs(value: Any, where: str, name: str) -> tuple[PromptAnswer, ...]:
    pairs = []
    for i, item in enumerate(value or []):
        if not isinstance(item, dict) or not item.get("prompt") or not str(item.get("answer", "")).strip():
            raise UserError(f"{where}: {name}[{i}] needs a non-empty 'prompt' and 'answer'")
        pairs.append(PromptAnswer(str(item["prompt"]), str(item["answer"])))
    return tuple(pairs)
