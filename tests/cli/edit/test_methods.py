"""``edit evaluate --method``: every method behind one seam, on the same records and metric."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kedit_vfl.edit.algs.finetune import FineTune, prompt_last_loss, target_new_loss
from kedit_vfl.edit.algs.registry import ft_config
from kedit_vfl.edit.config import FT_PRESETS, EvalConfig
from kedit_vfl.edit.models.tokens import TokenBatch
from kedit_vfl.errors import UserError
from tests.cli.edit.conftest import train
from tests.cli.runner import kvtool, kvtool_json


def on_records(editor: Path, files: dict[str, Path]) -> list[object]:
    """evaluate's options for ``editor`` on the session's edit records and tiny GPT-2."""
    return ["--editor", editor, "--data", files["edits"], "--model", files["gpt2"]]


def test_methods_are_compared_on_the_same_records(edit_files: dict[str, Path], gpt2_editor: Path) -> None:
    common = on_records(gpt2_editor, edit_files)
    result = kvtool_json("edit", "evaluate", *common, "--method", "instructedit,ft-m,ft-l", "--device", "cpu")
    assert list(result["methods"]) == ["instructedit", "ft-m", "ft-l"] and result["method"] == "instructedit"
    assert result["overall"] == result["methods"]["instructedit"]["overall"]  # the first one on top
    rows = {row["method"]: row for row in result["comparison"]}
    for name, row in rows.items():
        assert row["seconds_per_edit"] > 0
        figures = result["methods"][name]["overall"]
        assert row["mean_rgl"] == pytest.approx(
            (figures["reliability"] + figures["generalization"] + figures["locality"]) / 3
        )
    # FT-M fine-tunes on the edit itself until the loss is tiny: its own prompts hold
    assert rows["ft-m"]["reliability"] == 1.0
    # FT-L's elementwise bound keeps it close to the base model: less reliable, more local
    assert rows["ft-l"]["reliability"] < rows["ft-m"]["reliability"]
    assert rows["ft-l"]["locality"] >= rows["ft-m"]["locality"]


def test_mend_is_the_editor_without_instructions(
    edit_files: dict[str, Path], gpt2_editor: Path, tmp_path: Path
) -> None:
    common = [*on_records(gpt2_editor, edit_files), "--device", "cpu"]
    refused = kvtool("edit", "evaluate", *common, "--method", "mend")
    assert refused.exit_code == 2 and "--mend-editor" in refused.stderr
    plain = train(edit_files, "gpt2", tmp_path / "plain.safetensors", "--no-instructions")
    result = kvtool_json("edit", "evaluate", *common, "--method", "instructedit,mend", "--mend-editor", plain)
    assert set(result["methods"]) == {"instructedit", "mend"}
    alone = kvtool_json(
        "edit", "evaluate", *common[:-2], "--editor", plain, "--method", "mend", "--device", "cpu"
    )
    assert alone["overall"] == result["methods"]["mend"]["overall"]  # same editor, same figures


def test_hparams_override_the_preset_and_are_checked(tmp_path: Path) -> None:
    good = tmp_path / "ft.json"
    good.write_text(json.dumps({"lr": 0.01, "steps": 5, "layers": ["transformer.h.0.mlp.c_proj"]}))
    config = ft_config(FT_PRESETS["ft-l"], str(good))
    assert config.lr == 0.01 and config.steps == 5 and config.norm_constraint == 5e-4
    assert config.layers == ("transformer.h.0.mlp.c_proj",)
    for text, message in [
        ("[1]", "expected a JSON object"),
        ('{"learning_rate": 1}', "unknown setting learning_rate"),
        ('{"steps": 2.5}', "steps must be an integer"),
        ('{"objective": "other"}', "objective 'other'"),
        ("{", "not JSON"),
    ]:
        good.write_text(text)
        with pytest.raises(UserError, match=message):
            ft_config(FT_PRESETS["ft-m"], str(good))
    with pytest.raises(UserError, match="--method rome"):
        EvalConfig(methods=("rome",))


def test_ft_losses_score_the_target_tokens() -> None:
    # one row: prompt token 0, target tokens 1, 2 (labels mark targets; position 0 predicts token 1)
    batch = TokenBatch(
        torch.tensor([[0, 1, 2]]), torch.ones(1, 3, dtype=torch.long), torch.tensor([[-100, 1, 2]])
    )
    logits = torch.full((1, 3, 4), -10.0)
    logits[0, 0, 1] = logits[0, 1, 2] = 10.0  # teacher-forced: each position predicts its next target
    assert float(target_new_loss(logits, batch)) < 1e-3
    # FT-L reads only the last prompt position, which cannot put mass on both target tokens
    assert float(prompt_last_loss(logits, batch)) > 5.0
    assert FineTune("ft-m", FT_PRESETS["ft-m"]).prompter.pools is None


def test_sequential_editing_reports_a_retention_curve(
    edit_files: dict[str, Path], gpt2_editor: Path, tmp_path: Path
) -> None:
    common = on_records(gpt2_editor, edit_files)
    plot = tmp_path / "curve.png"
    result = kvtool_json("edit", "evaluate", *common, "--device", "cpu", "--method", "instructedit,ft-m",
                         "--sequential", "3", "--curve-every", "1", "--plot", plot)  # fmt: skip
    for name in ("instructedit", "ft-m"):
        curve = result["methods"][name]["sequential_curve"]
        assert [p["edits"] for p in curve] == [1, 2, 3] and all(p["sequences"] == 1 for p in curve)
        # after the last edit, the curve scores the same edits on the same model as the summary
        assert curve[-1]["retention"] == pytest.approx(result["methods"][name]["overall"]["reliability"])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = kvtool("edit", "evaluate", *common, "--device", "cpu", "--sequential", "3", "--curve-every", "1")
    assert table.exit_code == 0 and "retention over 3" in table.stdout
    refused = kvtool("edit", "evaluate", *common, "--plot", plot)
    assert refused.exit_code == 2 and "add --sequential" in refused.stderr


def test_an_editor_trains_on_mixed_batch_sizes(
    edit_files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kedit_vfl.artifacts import load_artifact
    from kedit_vfl.edit.editor import training

    drawn: list[int] = []
    sample = training.sample_records
    monkeypatch.setattr(
        training, "sample_records", lambda data, n, rng: drawn.append(n) or sample(data, n, rng)
    )
    editor = train(edit_files, "gpt2", tmp_path / "mixed.safetensors", "--batch-sizes", "1,3")
    assert set(drawn) == {1, 3}  # both sizes drawn over 16 seeded steps
    assert load_artifact(editor, "edit.editor").config["batch_sizes"] == [1, 3]
    bad = kvtool("edit", "train-editor", "--batch-sizes", "1,x")
    assert bad.exit_code == 2 and "--batch-sizes 1,x" in bad.stderr
    zero = kvtool("edit", "train-editor", "--batch-sizes", "0,2")
    assert zero.exit_code == 2 and "every size must be >= 1" in zero.stderr


def test_the_side_memory_routes_each_edit_and_leaves_the_rest_alone(
    edit_files: dict[str, Path], gpt2_editor: Path
) -> None:
    from kedit_vfl.edit.algs.memory import MemoryEdit
    from kedit_vfl.edit.algs.registry import build_method
    from kedit_vfl.edit.data.sources import read_records
    from kedit_vfl.edit.editor.batches import Prompter, edit_batch
    from kedit_vfl.edit.editor.network import forward_with
    from kedit_vfl.edit.editor.store import load_editor, open_editor_base
    from kedit_vfl.edit.models.tokens import encode_pairs

    loaded = load_editor(gpt2_editor)
    assert 0 < loaded.artifact.extra["memory"]["threshold"] <= 1  # calibrated by train-editor
    base = open_editor_base(loaded, str(edit_files["gpt2"]), "cpu", "float32", str(gpt2_editor))
    prompter = Prompter(loaded.pools)
    assert isinstance(build_method("memory", loaded, prompter), MemoryEdit)
    # a strict threshold: only an edit's own prompt routes (the tiny model's calibration is loose)
    method = MemoryEdit("memory", loaded.editor, prompter, threshold=0.9999)
    edits = read_records([str(edit_files["edits"])])
    one = method.add(base, method.start(base), edits[:1])
    every = method.add(base, one, edits[1:])  # later edits, one batch
    own = edit_batch(edits[:1], prompter, base.tokenizer, base.max_length)
    assert torch.equal(one.logits(base, own), every.logits(base, own))  # the first edit is untouched
    unrelated = encode_pairs(base.tokenizer, ["Zz qq unrelated words here"], ["x"], base.max_length)
    assert torch.equal(
        every.logits(base, unrelated), forward_with(base.model, None, unrelated.model_inputs())
    )
    old = dict(loaded.artifact.extra)
    loaded.artifact.extra.pop("memory")
    with pytest.raises(UserError, match="records no routing threshold"):
        build_method("memory", loaded, prompter)
    loaded.artifact.extra.update(old)
    common = on_records(gpt2_editor, edit_files)
    result = kvtool_json(
        "edit", "evaluate", *common, "--device", "cpu", "--method", "memory", "--sequential", "3"
    )
    assert result["method"] == "memory" and result["overall"]["n_records"] == 3


def test_queries_choose_what_the_edited_model_is_asked(
    edit_files: dict[str, Path], gpt2_editor: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kedit_vfl.edit.evaluation.evaluate as evaluation

    probed: list[bool] = []  # whether each scored record was asked with its instruction
    original = evaluation.probe
    monkeypatch.setattr(
        evaluation, "probe", lambda r, p, *a: probed.append(p.pools is not None) or original(r, p, *a)
    )
    common = [*on_records(gpt2_editor, edit_files), "--device", "cpu"]
    asked = {}
    for queries in ("instructed", "plain"):
        probed.clear()
        asked[queries] = kvtool_json(
            "edit", "evaluate", *common, "--method", "instructedit,ft-m", "--queries", queries
        )
        # instructedit's three records, then ft-m's (never instructed)
        assert probed == [queries == "instructed"] * 3 + [False] * 3
    assert asked["plain"]["protocol"]["queries"] == "plain"
    # by default, the queries the editor was trained for: plain, for an editor of 0.2
    default = kvtool_json("edit", "evaluate", *common)
    assert default["protocol"]["queries"] == "plain" and default["overall"] == asked["plain"]["overall"]
    assert asked["plain"]["methods"]["ft-m"]["overall"] == asked["instructed"]["methods"]["ft-m"]["overall"]
    bad = kvtool("edit", "evaluate", *common, "--queries", "polite")
    assert bad.exit_code == 2 and "--queries polite" in bad.stderr


def test_an_editor_conditioned_on_the_instruction_differentiates_the_plain_prompt(
    edit_files: dict[str, Path], tmp_path: Path
) -> None:
    from kedit_vfl.edit.data.sources import read_records
    from kedit_vfl.edit.editor.batches import Prompter
    from kedit_vfl.edit.editor.conditioning import editor_batch, instruction_embeddings
    from kedit_vfl.edit.editor.network import edit_gradients
    from kedit_vfl.edit.editor.store import load_editor, open_editor_base

    path = train(edit_files, "gpt2", tmp_path / "cond.safetensors", "--instruction-input", "condition")
    loaded = load_editor(path)
    config = loaded.editor.config
    base = open_editor_base(loaded, str(edit_files["gpt2"]), "cpu", "float32", str(path))
    width = int(base.model.config.hidden_size)
    assert config.instruction_input == "condition" and config.condition_dim == width
    edits = read_records([str(edit_files["edits"])])
    batch, conditions = editor_batch(loaded.editor, base, edits, Prompter(loaded.pools))
    assert conditions is not None and conditions.shape == (len(edits), width)
    assert not any("Task:" in base.tokenizer.decode(row) for row in batch.input_ids)  # the plain prompt
    two = instruction_embeddings(base, ["Edit a fact about a country.", "Change a sentiment.", None])
    assert not torch.allclose(two[0], two[1]) and torch.equal(two[2], torch.zeros(width))
    # the instruction changes the update, the prompt being the same
    first, other = loaded.pools.pools["counterfact"][:2]
    updates_for = {}
    for text in (first, other):
        grads = edit_gradients(base.model, base.targets, batch)
        with torch.no_grad():
            updates_for[text] = loaded.editor.eval()(
                grads, conditions=instruction_embeddings(base, [text] * len(edits))
            )
    assert any(not torch.allclose(updates_for[first][k], updates_for[other][k]) for k in updates_for[first])
    common = [*on_records(path, edit_files), "--device", "cpu"]
    result = kvtool_json("edit", "evaluate", *common, "--method", "instructedit,memory", "--batch", "3")
    assert result["overall"]["n_records"] == 3
    applied = kvtool_json(
        "edit",
        "apply",
        "--editor",
        path,
        "--edits",
        edit_files["edits"],
        "--model",
        edit_files["gpt2"],
        "--out",
        tmp_path / "edited",
        "--device",
        "cpu",
    )
    assert applied["n_edits"] == 3
    bad = kvtool("edit", "train-editor", "--instruction-input", "suffix")
    assert bad.exit_code == 2 and "--instruction-input suffix" in bad.stderr
