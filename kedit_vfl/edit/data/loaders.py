"""Read public knowledge-editing datasets into normalised :class:`EditRecord` lists.

Formats, detected per file from its first record (and its name, for KnowEdit tasks):

- ``knowedit``: KnowEdit WikiData-CounterFact / Recent / ZsRE (``prompt``, ``target_new``,
  ``ground_truth`` possibly nested alias lists, ``rephrase``/``rephrase_prompt``,
  ``portability``/``locality`` as ``{kind: [{prompt, ground_truth}]}``);
- ``zsre``: ZsRE in the MEND/EasyEdit layout (``src``, ``alt``, ``rephrase``, ``loc``,
  ``loc_ans``, ``answers``, optional ``portability`` with ``New Question``/``New Answer``);
- ``rome``: CounterFact in the ROME layout (``requested_rewrite`` with a ``{}`` prompt);
- ``easyedit``: CounterFact in EasyEdit's flat training layout (``rephrase_prompt``,
  ``locality_prompt``, ``locality_ground_truth``);
- ``convsent``: ConvSent (``ent``, ``pos``, ``neg``);
- ``normalised``: the project's own JSON Lines (``task``, ``prompt``, ``target_new``, ...).

Files are JSON lists or JSON Lines, or Parquet/CSV of normalised records (read with
``datasets``). :func:`records_to_dataset` turns records into a ``datasets.Dataset`` for
shuffling and batching. Bad input is a one-line :class:`UserError` naming file and record.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kedit_vfl.edit.data.records import EditRecord, PromptAnswer
from kedit_vfl.errors import UserError

# The ConvSent question and rephrases (SERAC's sentiment templates).
CONVSENT_PROMPTS = ("What do you think of {}?", "What do you feel about {}?", "How do you view {}?")
SUFFIXES = (".json", ".jsonl", ".parquet", ".csv")


def load_records(paths: Sequence[str | Path], task: str | None = None) -> list[EditRecord]:
    """Records of every file (folders: their data files, sorted); ``task`` overrides the format's task."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if task is not None and not task.strip():
        raise UserError("task: expected a non-empty task name")
    records: list[EditRecord] = []
    for path in _expand(paths):
        records.extend(load_file(path, task))
    return records


def load_file(path: str | Path, task: str | None = None) -> list[EditRecord]:
    """One file's records, normalised; its format is detected from the first record."""
    path = Path(path)
    raw = _read(path)
    if not raw:
        raise UserError(f"{path}: no records in the file")
    fmt = detect_format(raw[0], path)
    default_task = _knowedit_task(path, raw[0]) if fmt == "knowedit" else _TASK_OF[fmt]
    convert = _CONVERTERS[fmt]
    out = []
    for i, item in enumerate(raw, 1):
        where = f"{path} record {i}"
        if not isinstance(item, dict):
            raise UserError(f"{where}: expected a JSON object, got {type(item).__name__}")
        record = convert(item, where, task or default_task, i)
        out.append(record)
    return out


def detect_format(first: Any, path: Path) -> str:
    """The format name for a file whose first record is ``first``."""
    if isinstance(first, dict):
        keys = set(first)
        if "requested_rewrite" in keys:
            return "rome"
        if {"src", "alt"} <= keys:
            return "zsre"
        if "ent" in keys and keys & {"pos", "neg"}:
            return "convsent"
        if "task" in keys and "prompt" in keys:
            return "normalised"
        if "locality_prompt" in keys:
            return "easyedit"
        if "prompt" in keys and "target_new" in keys:
            return "knowedit"
    shown = ", ".join(sorted(first)[:8]) if isinstance(first, dict) else type(first).__name__
    raise UserError(
        f"{path}: unknown record format (first record has: {shown}); expected KnowEdit, ZsRE (MEND), "
        "CounterFact (ROME or EasyEdit), ConvSent or normalised records"
    )


def records_to_dataset(records: Sequence[EditRecord]):
    """Records as a ``datasets.Dataset`` (one row per record, the normalised schema)."""
    from datasets import Dataset, Features, Value
    from datasets import Sequence as Seq

    pair = {"prompt": Value("string"), "answer": Value("string")}
    features = Features(
        {
            "task": Value("string"),
            "prompt": Value("string"),
            "target_new": Value("string"),
            "subject": Value("string"),
            "ground_truth": Value("string"),
            "rephrase": Seq(Value("string")),
            "locality": [pair],
            "portability": [pair],
            "source": Value("string"),
            "extra": Value("string"),  # JSON: its content varies by source
        }
    )
    rows = [{**r.to_dict(), "extra": json.dumps(r.extra)} for r in records]
    return Dataset.from_list(rows, features=features)


def true_facts(records: Sequence[EditRecord]) -> list[tuple[str, str]]:
    """What a base model should know before these edits: ``(prompt, answer)`` pairs, deduplicated.

    The edit prompt and its rephrases with the ground truth (where known) and every
    locality probe. Portability answers follow from the edit, so they are left out.
    """
    facts: dict[tuple[str, str], None] = {}
    for record in records:
        if record.ground_truth:
            for prompt in (record.prompt, *record.rephrase):
                facts[(prompt, record.ground_truth)] = None
        for probe in record.locality:
            facts[(probe.prompt, probe.answer)] = None
    return list(facts)


def _expand(paths: Sequence[str | Path]) -> list[Path]:
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix in SUFFIXES and p.is_file())
            if not found:
                raise UserError(f"{path}: no data files ({', '.join(SUFFIXES)}) in this folder")
            files.extend(found)
        elif not path.exists():
            raise UserError(f"{path}: no such file")
        else:
            files.append(path)
    return files


def _read(path: Path) -> list[Any]:
    """The file's records: a JSON list, JSON Lines, or a Parquet/CSV table."""
    if path.suffix in (".parquet", ".csv"):
        return _read_table(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read the file ({getattr(exc, 'strerror', None) or exc})") from exc
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from exc
        return data
    records = []
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{line_no}: not valid JSON Lines ({exc.msg})") from exc
    return records


def _read_table(path: Path) -> list[dict]:
    from datasets import Dataset

    try:
        table = Dataset.from_parquet(str(path)) if path.suffix == ".parquet" else Dataset.from_csv(str(path))
    except Exception as exc:  # datasets/pyarrow raise many types for a corrupt file
        raise UserError(f"{path}: cannot read the table ({type(exc).__name__}: {exc})") from exc
    return table.to_list()


def _text(value: Any) -> str | None:
    """The first string of a possibly nested alias list (``[["USSR", "Soviet Union"]]``)."""
    while isinstance(value, (list, tuple)):
        if not value:
            return None
        value = value[0]
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _required(item: dict, key: str, where: str) -> str:
    """A non-empty string field (or the first of a list), else a UserError naming the field."""
    raw = item.get(key)
    if raw is None or (isinstance(raw, (list, dict)) and not raw):
        raise UserError(f"{where}: missing '{key}'")
    text = _text(raw)
    if text is None:
        raise UserError(f"{where}: empty '{key}' (expected a non-empty string)")
    return text


def _strings(value: Any) -> tuple[str, ...]:
    values = value if isinstance(value, list) else [value]
    return tuple(t for t in (_text(v) for v in values) if t)


def _grouped_pairs(value: Any) -> tuple[tuple[PromptAnswer, ...], list[str]]:
    """``{kind: [{prompt, ground_truth}]}`` -> pairs and kinds; entries without an answer are skipped."""
    pairs, kinds = [], []
    for kind, items in (value or {}).items() if isinstance(value, dict) else ():
        for entry in items or []:
            if not isinstance(entry, dict):
                continue
            prompt, answer = _text(entry.get("prompt")), _text(entry.get("ground_truth", entry.get("answer")))
            if prompt and answer:
                pairs.append(PromptAnswer(prompt, answer))
                kinds.append(kind)
    return tuple(pairs), kinds


def _knowedit_task(path: Path, first: dict) -> str:
    """KnowEdit files do not say their task: the file name does, else the record's shape."""
    name = path.name.lower()
    for hint, task in (
        ("recent", "recent"),
        ("zsre", "zsre"),
        ("counterfact", "counterfact"),
        ("_cf", "counterfact"),
    ):
        if hint in name:
            return task
    if "rephrase_prompt" in first or "cond" in first or str(first.get("prompt", "")).rstrip().endswith("?"):
        return "zsre"
    return "counterfact" if first.get("ground_truth") else "recent"


def _from_knowedit(item: dict, where: str, task: str, index: int) -> EditRecord:
    locality, locality_kinds = _grouped_pairs(item.get("locality"))
    portability, portability_kinds = _grouped_pairs(item.get("portability"))
    extra: dict[str, Any] = {"locality_kinds": locality_kinds, "portability_kinds": portability_kinds}
    aliases = item.get("ground_truth")
    if isinstance(aliases, list) and len(_flatten(aliases)) > 1:
        extra["ground_truth_aliases"] = _flatten(aliases)
    return EditRecord(
        task=task,
        prompt=_required(item, "prompt", where),
        target_new=_required(item, "target_new", where),
        subject=_text(item.get("subject")) or "",
        ground_truth=_text(item.get("ground_truth")),
        rephrase=_strings(item.get("rephrase", item.get("rephrase_prompt"))),
        locality=locality,
        portability=portability,
        source="knowedit",
        extra=extra,
    )


def _flatten(value: Any) -> list[str]:
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _flatten(v)]
    text = _text(value)
    return [text] if text else []


def _from_zsre(item: dict, where: str, task: str, index: int) -> EditRecord:
    locality = ()
    if _text(item.get("loc")) and _text(item.get("loc_ans")):
        locality = (PromptAnswer(_text(item["loc"]), _text(item["loc_ans"])),)
    portability = ()
    port = item.get("portability")
    if isinstance(port, dict) and _text(port.get("New Question")) and _text(port.get("New Answer")):
        portability = (PromptAnswer(_text(port["New Question"]), _text(port["New Answer"])),)
    return EditRecord(
        task=task,
        prompt=_required(item, "src", where),
        target_new=_required(item, "alt", where),
        subject=_text(item.get("subject")) or "",
        ground_truth=_text(item.get("answers")),
        rephrase=_strings(item.get("rephrase")),
        locality=locality,
        portability=portability,
        source="zsre",
    )


def _from_rome(item: dict, where: str, task: str, index: int) -> EditRecord:
    rewrite = item.get("requested_rewrite")
    if not isinstance(rewrite, dict):
        raise UserError(f"{where}: 'requested_rewrite' must be an object")
    subject = _required(rewrite, "subject", where)
    template = _required(rewrite, "prompt", where)
    if "{}" not in template:
        raise UserError(f"{where}: requested_rewrite.prompt needs a '{{}}' where the subject goes")
    target_new = rewrite.get("target_new")
    target_true = rewrite.get("target_true")
    new = _required(
        {"target_new.str": target_new.get("str") if isinstance(target_new, dict) else target_new},
        "target_new.str",
        where,
    )
    true = _text(target_true.get("str")) if isinstance(target_true, dict) else _text(target_true)
    portability = ()
    port = item.get("portability")
    if isinstance(port, dict) and _text(port.get("New Question")) and _text(port.get("New Answer")):
        portability = (PromptAnswer(_text(port["New Question"]), _text(port["New Answer"])),)
    # ROME's neighbourhood prompts share the relation and the true object of the edited fact.
    locality = (
        tuple(PromptAnswer(p, true) for p in _strings(item.get("neighborhood_prompts"))) if true else ()
    )
    return EditRecord(
        task=task,
        prompt=template.replace("{}", subject),
        target_new=new,
        subject=subject,
        ground_truth=true,
        rephrase=_strings(item.get("paraphrase_prompts")),
        locality=locality,
        portability=portability,
        source="rome",
        extra={"case_id": item.get("case_id")} if item.get("case_id") is not None else {},
    )


def _from_easyedit(item: dict, where: str, task: str, index: int) -> EditRecord:
    locality = ()
    if _text(item.get("locality_prompt")) and _text(item.get("locality_ground_truth")):
        locality = (PromptAnswer(_text(item["locality_prompt"]), _text(item["locality_ground_truth"])),)
    return EditRecord(
        task=task,
        prompt=_required(item, "prompt", where),
        target_new=_required(item, "target_new", where),
        subject=_text(item.get("subject")) or "",
        ground_truth=_text(item.get("ground_truth")),
        rephrase=_strings(item.get("rephrase_prompt", item.get("rephrase"))),
        locality=locality,
        source="easyedit",
        extra={"case_id": item.get("case_id")} if item.get("case_id") is not None else {},
    )


def _from_convsent(item: dict, where: str, task: str, index: int) -> EditRecord:
    """One edit per topic: odd records (1-based) ask for the positive side, even ones the negative.

    The target is that side's first response, as SERAC lists them; the others stay in
    ``extra['responses']`` for users who want several targets per topic.
    """
    topic = _required(item, "ent", where)
    label = "positive" if index % 2 == 1 else "negative"
    side = "pos" if label == "positive" else "neg"
    responses = _strings(item.get(side))
    if not responses:
        raise UserError(f"{where}: missing '{side}' (expected a list of {label} responses)")
    return EditRecord(
        task=task,
        prompt=CONVSENT_PROMPTS[0].format(topic),
        target_new=responses[0],
        subject=topic,
        rephrase=tuple(p.format(topic) for p in CONVSENT_PROMPTS[1:]),
        source="convsent",
        extra={"label": label, "responses": list(responses[1:])},
    )


def _from_normalised(item: dict, where: str, task: str | None, index: int) -> EditRecord:
    data = dict(item)
    if task is not None:
        data["task"] = task
    if isinstance(data.get("extra"), str):  # tables store it as JSON (see records_to_dataset)
        try:
            data["extra"] = json.loads(data["extra"] or "{}")
        except json.JSONDecodeError as exc:
            raise UserError(f"{where}: 'extra' is not valid JSON ({exc.msg})") from exc
    return EditRecord.from_dict(data, where=where)


_CONVERTERS: dict[str, Callable[[dict, str, Any, int], EditRecord]] = {
    "knowedit": _from_knowedit,
    "zsre": _from_zsre,
    "rome": _from_rome,
    "easyedit": _from_easyedit,
    "convsent": _from_convsent,
    "normalised": _from_normalised,
}
_TASK_OF: dict[str, Any] = {
    "zsre": "zsre",
    "rome": "counterfact",
    "easyedit": "counterfact",
    "convsent": "convsent",
    "normalised": None,  # each record names its own task
}
