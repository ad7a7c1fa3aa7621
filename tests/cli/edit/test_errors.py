"""Every bad input named in the issue: one line on stderr, exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cli.edit.conftest import bad_jsonl
from tests.cli.runner import kvtool


def _fails(*args: object, match: str) -> None:
    result = kvtool(*args)
    assert result.exit_code == 2, (result.exit_code, result.stderr, result.exception)
    assert match in result.stderr
    assert "Traceback" not in result.stderr.split("error:")[-1]


def _apply(editor: Path, files: dict[str, Path], edits: Path, out: Path, *extra: object) -> tuple:
    return (
        "edit",
        "apply",
        "--editor",
        editor,
        "--edits",
        edits,
        "--model",
        files["gpt2"],
        "--out",
        out,
        "--device",
        "cpu",
        *extra,
    )


@pytest.mark.parametrize("model", ["no-such-org/no-such-model-xyz", "./missing-folder"])
def test_unknown_model(model: str, edit_files: dict[str, Path]) -> None:
    _fails(
        "edit",
        "train-editor",
        "--model",
        model,
        "--data",
        edit_files["train"],
        "--tasks",
        "counterfact",
        "--device",
        "cpu",
        match=f"--model {model}",
    )


def test_record_missing_prompt_or_target(
    gpt2_editor: Path, edit_files: dict[str, Path], tmp_path: Path
) -> None:
    edits = bad_jsonl(tmp_path / "e.jsonl", {"task": "counterfact", "target_new": "Rome"})
    _fails(*_apply(gpt2_editor, edit_files, edits, tmp_path / "o"), match="prompt")
    edits = bad_jsonl(tmp_path / "f.jsonl", {"task": "counterfact", "prompt": "The capital of Zorvia is"})
    _fails(*_apply(gpt2_editor, edit_files, edits, tmp_path / "o"), match="target")


def test_empty_target(gpt2_editor: Path, edit_files: dict[str, Path], tmp_path: Path) -> None:
    edits = bad_jsonl(
        tmp_path / "e.jsonl", {"task": "counterfact", "prompt": "The capital of Zorvia is", "target_new": " "}
    )
    _fails(*_apply(gpt2_editor, edit_files, edits, tmp_path / "o"), match="target")


def test_prompt_longer_than_context(gpt2_editor: Path, edit_files: dict[str, Path], tmp_path: Path) -> None:
    edits = bad_jsonl(
        tmp_path / "e.jsonl",
        {"task": "counterfact", "prompt": "The capital of Zorvia is " * 80, "target_new": "Rome"},
    )
    _fails(*_apply(gpt2_editor, edit_files, edits, tmp_path / "o"), match="longer than the model's context")


def test_unknown_task_in_tasks(edit_files: dict[str, Path]) -> None:
    _fails(
        "edit",
        "train-editor",
        "--tasks",
        "counterfact,poetry",
        "--device",
        "cpu",
        match="unknown task poetry",
    )
    _fails(
        "edit",
        "train-editor",
        "--model",
        edit_files["gpt2"],
        "--data",
        edit_files["train"],
        "--tasks",
        "poetry",
        "--device",
        "cpu",
        match="unknown task poetry",
    )


def test_instruction_file_without_held_out_description(edit_files: dict[str, Path], tmp_path: Path) -> None:
    pools = {
        t: {"train": [f"Edit {t} fact {i}." for i in range(5)]} for t in ("counterfact", "recent", "zsre")
    }
    path = tmp_path / "pools.json"
    path.write_text(json.dumps(pools))
    _fails(
        "edit",
        "train-editor",
        "--model",
        edit_files["gpt2"],
        "--data",
        edit_files["train"],
        "--tasks",
        "counterfact,recent",
        "--instructions",
        path,
        "--device",
        "cpu",
        match="held-out",
    )


def test_editor_for_another_base_model(
    gpt2_editor: Path, edit_files: dict[str, Path], tmp_path: Path
) -> None:
    _fails(
        "edit",
        "apply",
        "--editor",
        gpt2_editor,
        "--edits",
        edit_files["edits"],
        "--model",
        edit_files["llama"],
        "--out",
        tmp_path / "o",
        "--device",
        "cpu",
        match="trained for another base model",
    )
    _fails(
        "edit",
        "evaluate",
        "--editor",
        gpt2_editor,
        "--data",
        edit_files["edits"],
        "--model",
        edit_files["gpt_neox"],
        "--device",
        "cpu",
        match="trained for another base model",
    )


def test_corrupt_artifact(gpt2_editor: Path, edit_files: dict[str, Path], tmp_path: Path) -> None:
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(gpt2_editor.read_bytes()[:-100])
    _fails(*_apply(broken, edit_files, edit_files["edits"], tmp_path / "o"), match="broken.safetensors")
    _fails(
        "edit",
        "evaluate",
        "--editor",
        broken,
        "--data",
        edit_files["edits"],
        "--device",
        "cpu",
        match="broken.safetensors",
    )


def test_apply_refuses_an_existing_output_folder(
    gpt2_editor: Path, edit_files: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "edited"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _fails(*_apply(gpt2_editor, edit_files, edit_files["edits"], out), match="--overwrite")
    assert (out / "keep.txt").read_text() == "mine"
    result = kvtool(*_apply(gpt2_editor, edit_files, edit_files["edits"], out, "--overwrite", "--json"))
    assert result.exit_code == 0, result.stderr
    assert (out / "model.safetensors").exists() and not (out / "keep.txt").exists()


@pytest.mark.parametrize(("option", "value"), [("--ema", "1"), ("--ema", "-0.5"), ("--lr-alpha", "0")])
def test_out_of_range_training_options(option: str, value: str, edit_files: dict[str, Path]) -> None:
    _fails("edit", "train-editor", "--model", edit_files["gpt2"], option, value, match=option)


def _retouched(folder: Path, out: Path, parameter: str) -> Path:
    """A copy of a model folder with one weight nudged (the tokenizer kept)."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    shutil.copytree(folder, out)
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        dict(model.named_parameters())[parameter].add_(0.25)
    model.save_pretrained(out, safe_serialization=True)
    return out


def test_a_base_model_with_other_layers_swapped_is_refused(
    gpt2_editor: Path, edit_files: dict[str, Path], tmp_path: Path
) -> None:
    """The fingerprint covers every weight, not only the edited layers."""
    from kedit_vfl.artifacts import load_artifact

    edited = load_artifact(gpt2_editor, "edit.editor").extra["targets"]
    assert all("wte" not in t["module"] for t in edited)
    swapped = _retouched(edit_files["gpt2"], tmp_path / "swapped", "transformer.wte.weight")
    _fails(*_apply(gpt2_editor, edit_files, edit_files["edits"], tmp_path / "o", "--model", swapped),
           match="trained for another base model")  # fmt: skip
    _fails("edit", "evaluate", "--editor", gpt2_editor, "--data", edit_files["edits"], "--model", swapped,
           "--device", "cpu", match="trained for another base model")  # fmt: skip


def test_an_editor_pointing_at_another_folder_is_checked_against_what_loads(
    gpt2_editor: Path, edit_files: dict[str, Path], tmp_path: Path
) -> None:
    """An artifact that names a base model folder (no --model given): the weights loaded from
    there are fingerprinted, so re-pointing it elsewhere is refused, not silently used."""
    from kedit_vfl.artifacts import load_artifact, save_artifact

    swapped = _retouched(edit_files["gpt2"], tmp_path / "elsewhere", "transformer.h.0.attn.c_attn.weight")
    artifact = load_artifact(gpt2_editor, "edit.editor")
    artifact.extra["base"]["model"] = str(swapped)
    save_artifact(artifact, tmp_path / "pointed.safetensors")  # checksum recomputed, as a forger would
    args = ("edit", "apply", "--editor", tmp_path / "pointed.safetensors", "--edits", edit_files["edits"],
            "--out", tmp_path / "o", "--device", "cpu")  # fmt: skip
    _fails(*args, match="trained for another base model")
    artifact.extra["base"]["model"] = str(edit_files["gpt2"])
    save_artifact(artifact, tmp_path / "home.safetensors")
    home = kvtool("edit", "apply", "--editor", tmp_path / "home.safetensors", "--edits", edit_files["edits"],
                  "--out", tmp_path / "o", "--device", "cpu", "--json")  # fmt: skip
    assert home.exit_code == 0, home.stderr


def test_editors_from_before_the_fingerprint_scope_still_apply(
    gpt2_editor: Path, edit_files: dict[str, Path], tmp_path: Path
) -> None:
    import torch

    from kedit_vfl.artifacts import load_artifact, save_artifact
    from kedit_vfl.edit.models.base import EDITED_LAYERS, load_base_model

    artifact = load_artifact(gpt2_editor, "edit.editor")
    editor = artifact.extra["editor"]
    base = load_base_model(str(edit_files["gpt2"]), torch.device("cpu"), layers=editor["layers"],
                           n_blocks=editor["n_blocks"])  # fmt: skip
    del artifact.extra["base"]["fingerprint_scope"]
    artifact.extra["base"]["fingerprint"] = base.fingerprint(EDITED_LAYERS)
    save_artifact(artifact, tmp_path / "old.safetensors")
    result = kvtool(
        *_apply(tmp_path / "old.safetensors", edit_files, edit_files["edits"], tmp_path / "o", "--json")
    )
    assert result.exit_code == 0, result.stderr
    del artifact.extra["base"]["fingerprint"]
    save_artifact(artifact, tmp_path / "none.safetensors")
    _fails(*_apply(tmp_path / "none.safetensors", edit_files, edit_files["edits"], tmp_path / "p"),
           match="records no base model fingerprint")  # fmt: skip


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda e: e.update(base=[1]), "'base' does not describe a base model"),
        (lambda e: e["base"].update(model=5), "'base' does not describe a base model"),
        (lambda e: e["base"].update(world={"seed": "x"}), "'base.world' is not a world's seed and sizes"),
        (lambda e: e.pop("editor"), "'editor' is not a JSON object"),
        (lambda e: e["editor"].update(rank="x"), "editor.rank: expected int, got str"),
        (lambda e: e["editor"].update(rank=0), "'editor': --rank 0: must be positive"),
        (lambda e: e.update(targets="x"), "no edited layers listed"),
        (lambda e: e["targets"][0].update(d_in="x"), "targets[0].d_in: expected int, got str"),
        (lambda e: e.update(instructions="x"), "instructions: expected a JSON object"),
    ],
)
def test_inconsistent_editor_metadata_with_a_valid_checksum(
    gpt2_editor: Path, edit_files: dict[str, Path], tmp_path: Path, change, expected: str
) -> None:
    from kedit_vfl.artifacts import load_artifact, save_artifact

    artifact = load_artifact(gpt2_editor, "edit.editor")
    change(artifact.extra)
    crafted = tmp_path / "crafted.safetensors"
    save_artifact(artifact, crafted)  # the checksum recomputed, as a forger would
    _fails(*_apply(crafted, edit_files, edit_files["edits"], tmp_path / "o"), match=str(crafted))
    _fails(*_apply(crafted, edit_files, edit_files["edits"], tmp_path / "o"), match=expected)
