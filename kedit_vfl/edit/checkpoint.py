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
from kedit_vfl.edit.editor import Editor
from kedit_vfl.edit.instructions import InstructionPools
from kedit_vfl.edit.models import ALL_WEIGHTS, EDITED_LAYERS, BaseModel, EditTarget
from kedit_vfl.edit.sources import EMBEDDED, open_base, world_options_of
from kedit_vfl.errors import UserError
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
    try:
        targets = [EditTarget.from_dict(t) for t in artifact.extra["targets"]]
        editor = Editor(targets, EditorConfig.from_dict(artifact.extra["editor"]))
        editor.load_state_dict(artifact.tensors)
    except (KeyError, TypeError, RuntimeError) as exc:
        raise UserError(f"{where}: the editor artifact is incomplete ({type(exc).__name__}: {exc})") from exc
    return editor


def load_editor(path: str | Path) -> LoadedEditor:
    """Load an ``edit.editor`` artifact (kind and checksum checked)."""
    artifact = load_artifact(path, EDITOR_KIND)
    editor = editor_from_artifact(artifact, str(path))
    pools_data = artifact.extra.get("instructions")
    pools = InstructionPools.from_dict(pools_data, where=f"{path} instructions") if pools_data else None
    return LoadedEditor(editor, pools, dict(artifact.extra.get("base", {})), artifact)


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
