"""train-editor -> apply -> evaluate through the real CLI on tiny GPT-2, LLaMA and GPT-NeoX folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kedit_vfl.artifacts import load_artifact
from kedit_vfl.edit.evaluation.metrics import target_probability
from kedit_vfl.edit.models.tokens import encode_pairs
from tests.cli.edit.conftest import train
from tests.cli.runner import kvtool, kvtool_json


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gpt2", "llama", "gpt_neox"])
def test_train_apply_reload_evaluate(arch: str, edit_files: dict[str, Path], tmp_path: Path) -> None:
    editor = train(edit_files, arch, tmp_path / "editor.safetensors")
    artifact = load_artifact(editor, "edit.editor")
    assert artifact.extra["base"]["fingerprint"] and artifact.extra["targets"]
    assert artifact.extra["instructions"]["zsre"]["held_out"]  # the pools travel with the editor
    assert artifact.config["tasks"] == ["counterfact", "recent"] and artifact.config["holdout"] == "zsre"

    out = tmp_path / "edited"
    applied = kvtool_json(
        "edit",
        "apply",
        "--editor",
        editor,
        "--edits",
        edit_files["edits"],
        "--model",
        edit_files[arch],
        "--out",
        out,
        "--device",
        "cpu",
    )
    assert applied["n_edits"] == 3
    assert all(e["p_post"] > e["p_pre"] for e in applied["edits"])

    # The folder loads through the real from_pretrained path and the edit holds there.
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    original = AutoModelForCausalLM.from_pretrained(edit_files[arch]).eval()
    report = json.loads((out / "kvtool_edits.json").read_text())
    for edit in report["edits"]:
        # the editor was trained to serve plain queries: the report is on the prompt a user asks
        batch = encode_pairs(tokenizer, [edit["prompt"]], [edit["target_new"]], 256)
        with torch.no_grad():
            p_edited = float(target_probability(model(**batch.model_inputs()).logits, batch))
            p_original = float(target_probability(original(**batch.model_inputs()).logits, batch))
        assert p_edited == pytest.approx(edit["p_post"], rel=1e-3)
        assert p_original == pytest.approx(edit["p_pre"], rel=1e-3)
        assert p_edited > p_original

    evaluated = kvtool_json(
        "edit",
        "evaluate",
        "--editor",
        editor,
        "--data",
        edit_files["train"],
        "--model",
        edit_files[arch],
        "--device",
        "cpu",
    )
    assert set(evaluated["tasks"]) == {"counterfact", "recent", "zsre"}
    for values in [*evaluated["tasks"].values(), evaluated["overall"]]:
        for key in ("reliability", "generalization", "locality", "portability"):
            assert key in values and "pre_" + key in values
        assert values["n_records"] > 0
    assert evaluated["tasks"]["counterfact"]["n_records"] == 6


def test_evaluate_sequential_and_instruction_options(gpt2_editor: Path, edit_files: dict[str, Path]) -> None:
    base = (
        "edit",
        "evaluate",
        "--editor",
        gpt2_editor,
        "--data",
        edit_files["train"],
        "--model",
        edit_files["gpt2"],
        "--task",
        "counterfact",
        "--device",
        "cpu",
    )
    single = kvtool_json(*base)
    sequential = kvtool_json(*base, "--sequential", "3")
    unseen = kvtool_json(*base, "--unseen-instruction")
    other = kvtool_json(*base, "--instruction-index", "2")
    plain = kvtool_json(*base, "--no-prefix")
    assert plain["protocol"]["no_prefix"] is True
    assert plain["overall"]["pre_locality"] == 1.0
    assert single["protocol"]["sequential"] == 0 and sequential["protocol"]["sequential"] == 3
    assert unseen["protocol"]["unseen_instruction"] is True
    assert list(single["tasks"]) == ["counterfact"]
    # pre-edit values do not depend on the protocol; the instruction changes the prompts
    assert single["overall"]["pre_reliability"] == sequential["overall"]["pre_reliability"]
    assert other["overall"]["n_records"] == 6
    table = kvtool(*base)
    assert table.exit_code == 0 and "reliability" in table.stdout

    # --batch N: N edits applied together as apply does; a batch of one is the default protocol
    together = kvtool_json(*base, "--batch", "3")
    assert together["protocol"]["batch"] == 3 and together["overall"]["n_records"] == 6
    assert kvtool_json(*base, "--batch", "1")["overall"] == pytest.approx(single["overall"], abs=1e-6)
    both = kvtool(*base, "--batch", "2", "--sequential", "2")
    assert both.exit_code == 2 and "exclude each other" in both.stderr


def test_resume_continues_from_the_checkpoint(edit_files: dict[str, Path], tmp_path: Path) -> None:
    out = train(edit_files, "gpt2", tmp_path / "editor.safetensors")
    assert (tmp_path / "editor.ckpt.safetensors").exists()
    result = kvtool(
        "edit",
        "train-editor",
        "--model",
        edit_files["gpt2"],
        "--data",
        edit_files["train"],
        "--tasks",
        "counterfact,recent",
        "--holdout",
        "zsre",
        "--steps",
        "24",
        "--val-every",
        "8",
        "--batch-size",
        "4",
        "--edit-lr",
        "0.05",
        "--device",
        "cpu",
        "--out",
        out,
        "--json",
        "--resume",
    )
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["steps"] == 24
    history = load_artifact(out, "edit.editor").extra["history"]
    assert [h["step"] for h in history] == [8, 16, 24]


def test_no_instructions_baseline_stores_no_pools(edit_files: dict[str, Path], tmp_path: Path) -> None:
    out = train(edit_files, "gpt2", tmp_path / "plain.safetensors", "--no-instructions")
    assert load_artifact(out, "edit.editor").extra["instructions"] is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bfloat16_pipeline(edit_files: dict[str, Path], tmp_path: Path) -> None:
    editor = train(
        edit_files, "llama", tmp_path / "editor.safetensors", "--device", "cuda", "--dtype", "bfloat16"
    )
    applied = kvtool_json(
        "edit",
        "apply",
        "--editor",
        editor,
        "--edits",
        edit_files["edits"],
        "--model",
        edit_files["llama"],
        "--out",
        tmp_path / "out",
        "--device",
        "cuda",
        "--dtype",
        "bfloat16",
    )
    assert all(e["p_post"] > e["p_pre"] for e in applied["edits"])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert next(model.parameters()).dtype == torch.bfloat16
    evaluated = kvtool_json(
        "edit",
        "evaluate",
        "--editor",
        editor,
        "--data",
        edit_files["train"],
        "--model",
        edit_files["llama"],
        "--device",
        "cuda",
        "--dtype",
        "bfloat16",
    )
    assert evaluated["overall"]["reliability"] > evaluated["overall"]["pre_reliability"]


def test_n_blocks_picks_how_many_last_blocks_are_edited(edit_files: dict[str, Path], tmp_path: Path) -> None:
    out = train(edit_files, "gpt2", tmp_path / "one.safetensors", "--n-blocks", "1", "--no-instructions")
    artifact = load_artifact(out, "edit.editor")
    modules = [t["module"] for t in artifact.extra["targets"]]
    n_layer = AutoModelForCausalLM.from_pretrained(edit_files["gpt2"]).config.n_layer
    assert modules and all(m.startswith(f"transformer.h.{n_layer - 1}.mlp.") for m in modules)
    assert artifact.config["editor"]["n_blocks"] == 1


def test_apply_result_does_not_depend_on_the_batch_size(
    gpt2_editor: Path, edit_files: dict[str, Path], tmp_path: Path
) -> None:
    """Every edit's update is computed on the unedited model: --batch-size bounds memory only."""
    reports, warned = {}, {}
    for size in (1, 3):
        result = kvtool(
            "edit",
            "apply",
            "--editor",
            gpt2_editor,
            "--edits",
            edit_files["edits"],
            "--model",
            edit_files["gpt2"],
            "--out",
            tmp_path / f"edited-{size}",
            "--batch-size",
            str(size),
            "--device",
            "cpu",
            "--json",
        )
        assert result.exit_code == 0, result.stderr
        reports[size], warned[size] = json.loads(result.stdout), "do not hold" in result.stderr
    one, three = reports[1], reports[3]
    assert one["held"] == three["held"] == sum(e["acc_post"] >= 1.0 for e in one["edits"])
    assert warned[1] == warned[3] == (one["held"] < one["n_edits"])  # failed edits are never silent
    for a, b in zip(one["edits"], three["edits"], strict=True):
        assert a["p_post"] == pytest.approx(b["p_post"], rel=1e-4, abs=1e-7)
    first = AutoModelForCausalLM.from_pretrained(tmp_path / "edited-1").state_dict()
    second = AutoModelForCausalLM.from_pretrained(tmp_path / "edited-3").state_dict()
    original = AutoModelForCausalLM.from_pretrained(edit_files["gpt2"]).state_dict()
    changed = [k for k in original if not torch.equal(original[k], first[k])]
    assert changed  # the edits moved some weights
    for key in original:
        torch.testing.assert_close(first[key], second[key], rtol=1e-5, atol=1e-6)


def test_signed_editor_resumes_and_applies_under_trust(edit_files: dict[str, Path], tmp_path: Path) -> None:
    """A pipeline signs the editor it trains (its resumable checkpoint too) and refuses others."""
    assert kvtool("sign-keygen", "--out", tmp_path / "ci").exit_code == 0
    assert kvtool("sign-keygen", "--out", tmp_path / "other").exit_code == 0
    key, pub = tmp_path / "ci" / "signing.key", tmp_path / "ci" / "signing.pub"
    out = train(edit_files, "gpt2", tmp_path / "editor.safetensors", "--sign-key", key)
    assert load_artifact(out, "edit.editor").signer.startswith("ed25519:SHA256:")
    resumed = train(edit_files, "gpt2", out, "--sign-key", key, "--trust", tmp_path / "other" / "signing.pub",
                    "--resume")  # fmt: skip
    assert resumed == out
    apply = ("edit", "apply", "--editor", out, "--edits", edit_files["edits"], "--device", "cpu")
    ok = kvtool(*apply, "--out", tmp_path / "o1", "--trust", pub, "--json")
    assert ok.exit_code == 0, ok.stderr
    refused = kvtool(*apply, "--out", tmp_path / "o2", "--trust", tmp_path / "other" / "signing.pub")
    assert refused.exit_code == 2 and "not among the --trust keys" in refused.stderr
    assert not (tmp_path / "o2").exists()
