"""The bare commands chain on the embedded default (the README's quick start, shortened)."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from kedit_vfl.artifacts import load_artifact
from tests.cli.runner import kvtool_json


def evaluated_sizes() -> dict[str, int]:
    from kedit_vfl.edit.data.embedded import load_embedded_world

    return {task: len(records) for task, records in load_embedded_world().records["test"].items()}


@pytest.mark.slow
def test_bare_commands_chain_on_the_embedded_default(tmp_path: Path) -> None:
    trained = kvtool_json("edit", "train-editor", "--steps", "10", "--val-every", "5", "--device", "cpu")
    editor = Path(trained["out"])
    assert editor == tmp_path / "runs" / "edit" / "editor.safetensors"
    artifact = load_artifact(editor, "edit.editor")
    assert artifact.extra["base"]["model"] == "embedded" and artifact.extra["holdout"] == "zsre"
    assert artifact.config["tasks"] == ["counterfact", "recent", "convsent"]

    # The default requests come from the embedded test split; the base model is the editor's own.
    applied = kvtool_json("edit", "apply", "--device", "cpu")
    assert applied["n_edits"] == len(evaluated_sizes())  # the first test edit of each task
    assert all(0.0 <= e["p_pre"] <= 1.0 and 0.0 <= e["p_post"] <= 1.0 for e in applied["edits"])
    AutoModelForCausalLM.from_pretrained(applied["out"])

    evaluated = kvtool_json("edit", "evaluate", "--limit", "3", "--device", "cpu")
    assert set(evaluated["tasks"]) == {"counterfact", "recent", "convsent", "zsre"}
    assert evaluated["holdout"] == "zsre" and evaluated["overall"]["n_records"] == 12
