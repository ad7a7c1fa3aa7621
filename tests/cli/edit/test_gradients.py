"""analyze-gradients on tiny editors: outputs, modes and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kedit_vfl.edit.evaluation.gradients import AnalyzeConfig, UpdateEncoder, analyze_gradients
from kedit_vfl.errors import UserError
from tests.cli.edit.conftest import train
from tests.unit.edit.tiny import records, write_jsonl


@pytest.fixture(scope="module")
def plain_editor(edit_files: dict[str, Path]) -> Path:
    return train(edit_files, "gpt2", edit_files["root"] / "gpt2-plain.safetensors", "--no-instructions")


def _data(tmp_path: Path, per_task: int = 4) -> Path:
    items = records("counterfact", per_task) + records("recent", per_task) + records("zsre", per_task)
    return write_jsonl(tmp_path / "analysis.jsonl", items)


def test_one_editor_with_and_without_prefix(gpt2_editor: Path, tmp_path: Path) -> None:
    out = tmp_path / "analysis"
    result = analyze_gradients(
        AnalyzeConfig(editor=str(gpt2_editor), out=str(out), data=(str(_data(tmp_path)),))
    )
    assert [p["name"] for p in result["panels"]] == ["with instructions", "without instruction prefix"]
    assert result["holdout_task"] == "zsre" and result["tasks"] == {"counterfact": 4, "recent": 4, "zsre": 4}
    panel = result["panels"][0]
    assert len(panel["projected_2d"]) == 12 and panel["holdout"]["nearest"] in ("counterfact", "recent")
    assert 0.0 <= sum(panel["explained_variance_2d"]) <= 1.0 + 1e-9
    saved = json.loads((out / "analysis.json").read_text())
    assert saved["representation"]["kind"] == "exact"
    assert (out / "gradients.png").read_bytes()[:4] == b"\x89PNG"


def test_two_editors_side_by_side(gpt2_editor: Path, plain_editor: Path, tmp_path: Path) -> None:
    config = AnalyzeConfig(
        editor=str(gpt2_editor),
        compare=str(plain_editor),
        out=str(tmp_path / "a"),
        data=(str(_data(tmp_path)),),
        exact_limit=10,  # force the random projection
        sketch_dim=64,
    )
    result = analyze_gradients(config)
    assert result["mode"] == "two editors" and len(result["panels"]) == 2
    assert result["representation"]["kind"] == "kronecker-random-projection"
    assert result["panels"][0]["representation_size"] == result["representation"]["size"]


def test_encoder_size_is_bounded_by_the_sketch() -> None:
    encoder = UpdateEncoder({"a": (4096, 1024), "b": (1024, 4096)}, exact_limit=1000, sketch_dim=512, seed=0)
    assert not encoder.exact and encoder.size <= 512


def test_bad_input(gpt2_editor: Path, edit_files: dict[str, Path], tmp_path: Path) -> None:
    one_task = write_jsonl(tmp_path / "one.jsonl", records("counterfact", 5))
    with pytest.raises(UserError, match="at least 2 tasks"):
        analyze_gradients(
            AnalyzeConfig(editor=str(gpt2_editor), out=str(tmp_path / "o"), data=(str(one_task),))
        )
    few = write_jsonl(tmp_path / "few.jsonl", records("counterfact", 5) + records("recent", 2))
    with pytest.raises(UserError, match="'recent' has 2 record"):
        analyze_gradients(AnalyzeConfig(editor=str(gpt2_editor), out=str(tmp_path / "o"), data=(str(few),)))
    with pytest.raises(UserError, match="at least 3"):
        AnalyzeConfig(editor=str(gpt2_editor), out="o", per_task=2)


def test_compare_with_an_editor_for_another_model_is_refused(
    gpt2_editor: Path, edit_files: dict[str, Path], tmp_path: Path
) -> None:
    neox = train(edit_files, "gpt_neox", tmp_path / "neox.safetensors")
    config = AnalyzeConfig(
        editor=str(gpt2_editor), compare=str(neox), out=str(tmp_path / "o"), data=(str(_data(tmp_path)),)
    )
    with pytest.raises(UserError, match="another base model"):
        analyze_gradients(config)


def test_unwritable_output_folder(gpt2_editor: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "taken"
    blocker.write_text("a file, not a folder")
    config = AnalyzeConfig(
        editor=str(gpt2_editor), out=str(blocker / "analysis"), data=(str(_data(tmp_path)),)
    )
    with pytest.raises(UserError, match="cannot create the output folder"):
        analyze_gradients(config)


def test_cli_analyze_gradients_json_and_table(gpt2_editor: Path, tmp_path: Path) -> None:
    from tests.cli.runner import kvtool

    data = _data(tmp_path)
    out = tmp_path / "cli-analysis"
    result = kvtool(
        "edit", "analyze-gradients", "--editor", gpt2_editor, "--data", data, "--out", out, "--json"
    )
    assert result.exit_code == 0, result.stderr
    analysis = json.loads(result.stdout)
    assert analysis["mode"].startswith("one editor") and (out / "gradients.png").exists()
    table = kvtool("edit", "analyze-gradients", "--editor", gpt2_editor, "--data", data, "--out", out)
    assert table.exit_code == 0 and "silhouette" in table.stdout
    bad = kvtool("edit", "analyze-gradients", "--editor", gpt2_editor, "--data", data, "--per-task", "2")
    assert bad.exit_code == 2 and "at least 3" in bad.stderr


def test_data_without_task_labels_is_refused(gpt2_editor: Path, tmp_path: Path) -> None:
    from tests.cli.runner import kvtool

    rows = [{"prompt": f"The capital of Zorvia{i} is", "target_new": "Bel"} for i in range(6)]
    data = tmp_path / "untagged.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = kvtool(
        "edit", "analyze-gradients", "--editor", gpt2_editor, "--data", data, "--out", tmp_path / "o"
    )
    assert result.exit_code == 2 and "at least 2 tasks" in result.stderr
