"""The embedded benchmark: a synthetic world and a small GPT-2 pretrained on its facts.

``load_embedded_world`` returns the world's edit records (per split and task) and the
folder of its base model. The default world ships in ``data/edit/embedded/``; any
other seed or size is built on first use (a couple of minutes on 2 cores) and cached
under ``cache_dir()/edit/<hash of config and version>/``. A build is reproducible from
its seed: the same config gives the same records, and the same weights on the same
machine.

A world folder holds ``manifest.json`` (config, hash, fact accuracy, build time),
``model/`` (model + tokenizer, ``from_pretrained``-loadable) and ``records/<split>.jsonl``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from kedit_vfl.edit.data.instructions import default_pools, fill_placeholders
from kedit_vfl.edit.data.records import EditRecord
from kedit_vfl.edit.data.world import SPLITS, TASKS, World, WorldConfig, generate_world
from kedit_vfl.edit.models.pretrain import PretrainConfig, answer_accuracy, pretrain_on_facts, save_model
from kedit_vfl.errors import UserError
from kedit_vfl.paths import PROJECT_DATA, cache_dir
from kedit_vfl.progress import SILENT, Reporter

__all__ = [
    "TASKS",
    "SPLITS",
    "WorldConfig",
    "EmbeddedWorld",
    "load_embedded_world",
    "build_world",
    "world_hash",
]

# Bump when the generator, the base model recipe or the folder layout changes.
WORLD_VERSION = 1
MIN_FACT_ACCURACY = 0.95
PRETRAIN = PretrainConfig(target_accuracy=0.98)
SHIPPED_DIR = PROJECT_DATA / "edit" / "embedded"


@dataclass
class EmbeddedWorld:
    """A built world: its config, base model folder and records per split and task."""

    config: WorldConfig
    model_dir: Path
    records: dict[str, dict[str, list[EditRecord]]]
    root: Path
    manifest: dict

    def records_file(self, split: str) -> Path:
        """The split as normalised JSON Lines (all tasks)."""
        if split not in SPLITS:
            raise UserError(f"split '{split}': expected one of {', '.join(SPLITS)}")
        return self.root / "records" / f"{split}.jsonl"

    @property
    def fact_accuracy(self) -> float:
        return float(self.manifest["fact_accuracy"])


def world_hash(config: WorldConfig, pretrain: PretrainConfig = PRETRAIN) -> str:
    """Identifies a build: the world config, the pretraining recipe and ``WORLD_VERSION``."""
    payload = {
        "world": dataclasses.asdict(config),
        "pretrain": dataclasses.asdict(pretrain),
        "version": WORLD_VERSION,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def pretraining_texts() -> list[str]:
    """Plain-language texts beside the facts: the training instruction descriptions.

    A real LLM has read ordinary English before it is edited; this gives the small model
    the words of the instruction descriptions, with generic placeholder fillers (world
    topics would tie them to entities). Held-out descriptions are left out so that they
    stay unseen, and no text pairs an instruction with a fact.
    """
    return [fill_placeholders(d) for pool in default_pools().pools.values() for d in pool]


def load_embedded_world(
    config: WorldConfig = WorldConfig(),
    reporter: Reporter = SILENT,
    pretrain: PretrainConfig = PRETRAIN,
    min_accuracy: float = MIN_FACT_ACCURACY,
) -> EmbeddedWorld:
    """Build (or load from cache / shipped data) the world and its pretrained base model.

    A build whose model answers fewer than ``min_accuracy`` of its facts is refused
    (tests of the plumbing pass 0 with a tiny recipe).
    """
    key = world_hash(config, pretrain)
    for root in (SHIPPED_DIR, cache_dir() / "edit" / key):
        manifest = _read_manifest(root)
        if manifest is not None and manifest.get("hash") == key:
            return _load(root, config, manifest)
    root = cache_dir() / "edit" / key
    reporter.log(f"Building the embedded world (seed {config.seed}) into {root}")
    return build_world(config, root, reporter, pretrain, min_accuracy)


def _read_manifest(root: Path) -> dict | None:
    try:
        return json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _load(root: Path, config: WorldConfig, manifest: dict) -> EmbeddedWorld:
    records: dict[str, dict[str, list[EditRecord]]] = {s: {t: [] for t in TASKS} for s in SPLITS}
    for split in SPLITS:
        path = root / "records" / f"{split}.jsonl"
        with open(path, encoding="utf-8") as handle:
            for line_no, line in enumerate(handle, 1):
                record = EditRecord.from_dict(json.loads(line), where=f"{path}:{line_no}")
                records[split][record.task].append(record)
    return EmbeddedWorld(config, root / "model", records, root, manifest)


def write_records(world: World, folder: Path) -> None:
    """One JSON Lines file per split, tasks in ``TASKS`` order."""
    folder.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        with open(folder / f"{split}.jsonl", "w", encoding="utf-8") as handle:
            for task in TASKS:
                for record in world.records[split][task]:
                    handle.write(json.dumps(record.to_dict(), ensure_ascii=False) + "\n")


def build_world(
    config: WorldConfig,
    root: str | Path,
    reporter: Reporter = SILENT,
    pretrain: PretrainConfig = PRETRAIN,
    min_accuracy: float = MIN_FACT_ACCURACY,
) -> EmbeddedWorld:
    """Build a world folder at ``root`` (regenerates the shipped one with ``SHIPPED_DIR``)."""
    root = Path(root)
    _build(config, pretrain, root, reporter, min_accuracy)
    return _load(root, config, _read_manifest(root) or {})


def _build(
    config: WorldConfig, pretrain: PretrainConfig, root: Path, reporter: Reporter, min_accuracy: float
) -> None:
    """Generate, pretrain, verify, then move the finished folder into place (atomic)."""
    started = time.perf_counter()
    world = generate_world(config)
    facts = world.pretraining_facts()
    recipe = dataclasses.replace(pretrain, seed=config.seed)
    model, tokenizer, result = pretrain_on_facts(facts, pretraining_texts(), recipe, reporter=reporter)
    if result.accuracy < min_accuracy:
        raise UserError(
            f"--world-seed {config.seed}: the base model knows only {result.accuracy:.1%} of the world's "
            f"facts after {result.epochs} epochs (needs {min_accuracy:.0%}); use smaller --world-* sizes"
        )
    held_out_exact, held_out_tokens = answer_accuracy(model, tokenizer, world.held_out_facts())
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        save_model(model, tokenizer, tmp / "model")
        write_records(world, tmp / "records")
        manifest = {
            "hash": world_hash(config, pretrain),
            "version": WORLD_VERSION,
            "config": dataclasses.asdict(config),
            "pretrain": dataclasses.asdict(recipe),
            "fact_accuracy": result.accuracy,
            "fact_token_accuracy": result.token_accuracy,
            "held_out_phrasing_accuracy": held_out_exact,
            "held_out_phrasing_token_accuracy": held_out_tokens,
            "pretraining_facts": len(facts),
            "epochs": result.epochs,
            "steps": result.steps,
            "build_seconds": round(time.perf_counter() - started, 1),
            "records": {s: {t: len(world.records[s][t]) for t in TASKS} for s in SPLITS},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        if root.exists():  # an older or concurrent build: replace it only once this one is complete
            stale = root.with_name(f".{root.name}.stale")
            shutil.rmtree(stale, ignore_errors=True)
            os.replace(root, stale)
            shutil.rmtree(stale, ignore_errors=True)
        os.replace(tmp, root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
