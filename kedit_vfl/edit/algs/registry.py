"""Building the method a ``--method`` name asks for, from the editor and the options."""

from __future__ import annotations

import json
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from kedit_vfl.edit.algs.base import EditMethod
from kedit_vfl.edit.algs.finetune import FineTune
from kedit_vfl.edit.algs.hypernetwork import HypernetworkEdit
from kedit_vfl.edit.algs.memory import MemoryEdit
from kedit_vfl.edit.config import FT_PRESETS, METHOD_NAMES, FTConfig
from kedit_vfl.edit.editor.batches import Prompter
from kedit_vfl.edit.editor.store import LoadedEditor
from kedit_vfl.errors import UserError


def build_method(
    name: str,
    loaded: LoadedEditor,
    prompter: Prompter,
    plain: LoadedEditor | None = None,
    hparams: str | None = None,
    queries: Prompter | None = None,
) -> EditMethod:
    """``name`` (one of :data:`METHOD_NAMES`) ready to edit the editor's base model.

    ``prompter``: the instructed editor's prompts (evaluate's instruction options);
    ``queries``: the prompts an instructed method is scored on (None: ``prompter``);
    ``plain``: an editor trained with ``--no-instructions`` for MEND, when ``loaded`` has
    instructions; ``hparams``: a JSON file of :class:`FTConfig` fields for FT-L/FT-M.
    """
    if name == "instructedit":
        if loaded.pools is None:
            raise UserError(
                "--method instructedit: this editor was trained with --no-instructions (it is MEND); "
                "use --method mend, or an editor trained with instructions"
            )
        return HypernetworkEdit(name, loaded.editor, prompter, queries)
    if name == "memory":
        threshold = (loaded.artifact.extra.get("memory") or {}).get("threshold")
        if not isinstance(threshold, int | float) or isinstance(threshold, bool):
            raise UserError(
                "--method memory: this editor records no routing threshold (trained before the side "
                "memory existed); train it again with kvtool edit train-editor"
            )
        return MemoryEdit(name, loaded.editor, prompter, float(threshold), queries)
    if name == "mend":
        editor = plain if plain is not None else loaded
        if editor.pools is not None:
            raise UserError(
                "--method mend: MEND is the editor trained without instructions; pass --mend-editor with "
                "one (kvtool edit train-editor --no-instructions --out runs/edit/plain.safetensors)"
            )
        return HypernetworkEdit(name, editor.editor, Prompter(None))
    if name in FT_PRESETS:
        return FineTune(name, ft_config(FT_PRESETS[name], hparams))
    raise UserError(f"--method {name}: expected one of {', '.join(METHOD_NAMES)}")


def ft_config(preset: FTConfig, path: str | None) -> FTConfig:
    """The preset, with the fields a JSON object in ``path`` sets (unknown keys refused)."""
    if path is None:
        return preset
    try:
        given: Any = json.loads(Path(path).read_text())
    except OSError as exc:
        raise UserError(f"--hparams {path}: cannot read it ({exc.strerror})") from exc
    except json.JSONDecodeError as exc:
        raise UserError(f"--hparams {path}: not JSON ({exc.msg}, line {exc.lineno})") from exc
    if not isinstance(given, dict):
        raise UserError(f"--hparams {path}: expected a JSON object of FT settings")
    known = {f.name: f.type for f in fields(FTConfig)}
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise UserError(f"--hparams {path}: unknown setting {', '.join(unknown)} (known: {', '.join(known)})")
    if "layers" in given:
        if not isinstance(given["layers"], list) or not all(isinstance(x, str) for x in given["layers"]):
            raise UserError(f"--hparams {path}: layers must be a list of module names")
        given["layers"] = tuple(given["layers"])
    for key in ("steps",):
        if key in given and (not isinstance(given[key], int) or isinstance(given[key], bool)):
            raise UserError(f"--hparams {path}: {key} must be an integer")
    for key in ("lr", "norm_constraint", "stop_loss"):
        if key in given and (not isinstance(given[key], int | float) or isinstance(given[key], bool)):
            raise UserError(f"--hparams {path}: {key} must be a number")
    return replace(preset, **given)
