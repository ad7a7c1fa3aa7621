"""The ``edit.editor`` artifact and the resumable training checkpoint.

The editor artifact holds the editor only (never the base model): its tensors, the
training config, and in ``extra`` what ``apply``/``evaluate`` need to reproduce it: the
base model's source and fingerprint, the edited layers, and the instruction pools.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kedit_vfl.artifacts import Artifact, load_artifact
from kedit_vfl.edit.config import EditorConfig
from kedit_vfl.edit.data.instructions import InstructionPools
from kedit_vfl.edit.data.sources import EMBEDDED, open_base, world_options_of
from kedit_vfl.edit.editor.network import Editor
from kedit_vfl.edit.models.base import ALL_WEIGHTS, EDITED_LAYERS, BaseModel, EditTarget
from kedit_vfl.errors import UserError
from kedit_vfl.metadata import typed
from kedit_vfl.progress import SILENT, Reporter
from kedit_vfl.seeding import resolve_device

EDITOR_KIND = "edit.editor"
CHECKPOINT_KIND = "edit.checkpoint"


@dataclass
class LoadedEditor:
    editor: Editor
    pools: InstructionPools | None  # None: trained without instructions
    base: dict[str, Any]  # model, world, fingerprint, dtype
    artifact: Artifact


def editor_extra(
    editor: Editor, base: BaseModel, pools: InstructionPools | None, base_info: dict[str, Any], **more: Any
) -> dict[str, Any]:
    return {
        "base": {
            **base_info,
            "fingerprint": base.fingerprint(ALL_WEIGHTS),
            "fingerprint_scope": ALL_WEIGHTS,
            "model_type": base.model.config.model_type,
        },
        "editor": {**vars(editor.config), "layers": list(editor.config.layers)},
        "targets": [t.to_dict() for t in editor.targets],
        "instructions": pools.to_dict() if pools is not None else None,
        **more,
    }


def editor_from_artifact(artifact: Artifact, where: str) -> Editor:
    """The editor an artifact holds, its config and targets type-checked first."""
    raw_targets = artifact.extra.get("targets")
    if not isinstance(raw_targets, list) or not raw_targets:
        raise UserError(f"{where}: the editor artifact is incomplete (no edited layers listed)")
    targets = [typed(EditTarget, t, where, f"targets[{i}]") for i, t in enumerate(raw_targets)]
    raw = artifact.extra.get("editor")
    if isinstance(raw, dict):  # saved before 0.3: a batch's updates summed, instructions prefixed
        raw = {"aggregate": "sum", "instruction_input": "prefix", **raw}
    editor = Editor(targets, typed(EditorConfig, raw, where, "editor"))
    try:
        editor.load_state_dict(artifact.tensors)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:200]  # torch lists every mismatch over several lines
        raise UserError(f"{where}: the editor's weights do not fit its config ({detail})") from exc
    return editor


def _base_info(artifact: Artifact, where: str) -> dict[str, Any]:
    """What the artifact says about its base model, each field's type checked."""
    base = artifact.extra.get("base", {})
    expected = {"model": str, "fingerprint": str, "fingerprint_scope": str, "dtype": str, "world": dict}
    if not isinstance(base, dict) or any(
        key in base and not isinstance(base[key], kind) for key, kind in expected.items()
    ):
        raise UserError(f"{where}: artifact metadata is malformed ('base' does not describe a base model)")
    world = base.get("world") or {}
    sizes = world.get("sizes") or {}
    if not (isinstance(world.get("seed", 0), int) and isinstance(sizes, dict)) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in sizes.values()
    ):
        raise UserError(
            f"{where}: artifact metadata is malformed ('base.world' is not a world's seed and sizes)"
        )
    return dict(base)


def load_editor(path: str | Path) -> LoadedEditor:
    """Load an ``edit.editor`` artifact (kind, checksum and metadata types checked)."""
    artifact = load_artifact(path, EDITOR_KIND)
    editor = editor_from_artifact(artifact, str(path))
    pools_data = artifact.extra.get("instructions")
    pools = InstructionPools.from_dict(pools_data, where=f"{path} instructions") if pools_data else None
    return LoadedEditor(editor, pools, _base_info(artifact, str(path)), artifact)


def check_fingerprint(loaded: LoadedEditor, base: BaseModel, editor_path: str | Path) -> None:
    """Refuse to use an editor with a base model other than the one it was trained for: the
    fingerprint is computed from the weights actually loaded, wherever they came from."""
    expected = loaded.base.get("fingerprint")
    if not isinstance(expected, str) or not expected:
        raise UserError(f"{editor_path}: the editor artifact records no base model fingerprint")
    actual = base.fingerprint(str(loaded.base.get("fingerprint_scope", EDITED_LAYERS)))
    if expected != actual:
        raise UserError(
            f"{editor_path}: this editor was trained for another base model "
            f"({loaded.base.get('model', '?')}, fingerprint {str(expected)[:12]}), "
            f"not {base.source} (fingerprint {actual[:12]})"
        )
    names = [t.module for t in loaded.editor.targets]
    if names != [t.module for t in base.targets]:
        raise UserError(f"{editor_path}: the editor edits {names}, which {base.source} does not match")


def open_editor_base(
    loaded: LoadedEditor,
    model: str | None,
    device: str,
    dtype: str,
    editor_path: str,
    reporter: Reporter = SILENT,
) -> BaseModel:
    """The base model for an editor (its own by default), refused if its fingerprint differs."""
    name = model or loaded.base.get("model") or EMBEDDED
    world = world_options_of(loaded.base)
    base, _ = open_base(name, world, resolve_device(device), dtype, loaded.editor.config, reporter)
    check_fingerprint(loaded, base, editor_path)
    loaded.editor.to(base.device).eval()
    return base
