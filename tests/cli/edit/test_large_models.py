"""Large-model paths through the real CLI: torchrun data parallel, random weights, dtype flags."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from tests.cli.edit.conftest import train
from tests.cli.runner import kvtool, kvtool_json
from tests.unit.edit.tiny import records, write_jsonl

TRAIN_ARGS = (
    "--tasks", "counterfact,recent", "--holdout", "zsre", "--steps", "12", "--val-every", "6",
    "--batch-size", "2", "--edit-lr", "0.05", "--device", "cpu", "--memory-edits", "4", "--json",
)  # fmt: skip


def _editor_weights(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 (not a dict)


def test_torchrun_two_processes_train_one_editor(edit_files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "ddp.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "KVTOOL_RUNS": str(tmp_path)}
    env.pop("KVTOOL_DEBUG", None)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "kedit_vfl", "edit", "train-editor", "--model", str(edit_files["gpt2"]),
        "--data", str(edit_files["train"]), "--out", str(out), "--quiet", *TRAIN_ARGS,
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    payload = json.loads(done.stdout)  # rank 0 alone reports: one JSON document
    assert payload["resources"]["processes"] == 2 and payload["steps"] == 12
    assert out.exists() and not (tmp_path / "ddp.ckpt.safetensors.tmp").exists()

    single = train(edit_files, "gpt2", tmp_path / "single.safetensors", "--accumulate", "2", "--steps", "12")
    ddp, one = _editor_weights(out), _editor_weights(single)
    assert ddp.keys() == one.keys()
    # both moved away from the identity editor, by comparable amounts
    up = [k for k in ddp if k.endswith("blocks.0.up.weight")]
    assert up and all(ddp[k].abs().sum() > 0 and one[k].abs().sum() > 0 for k in up)
    evaluation = kvtool_json(
        "edit", "evaluate", "--editor", out, "--data", edit_files["edits"], "--device", "cpu"
    )
    assert evaluation["overall"]["reliability"] is not None


def test_torchrun_without_a_rendezvous_is_a_user_error(edit_files: dict[str, Path], tmp_path: Path) -> None:
    result = kvtool(
        "edit", "train-editor", "--model", edit_files["gpt2"], "--data", edit_files["train"],
        "--out", tmp_path / "e.safetensors", *TRAIN_ARGS,
        env={"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "", "MASTER_PORT": ""},
    )  # fmt: skip
    assert result.exit_code == 2 and "torchrun" in result.stderr


def test_accumulate_and_checkpointing_flags(edit_files: dict[str, Path], tmp_path: Path) -> None:
    out = train(
        edit_files, "llama", tmp_path / "e.safetensors", "--accumulate", "2", "--gradient-checkpointing",
        "--dtype", "bfloat16",
    )  # fmt: skip
    with safe_open(str(out), "pt") as handle:
        config = json.loads(handle.metadata()["config"])
    assert config["accumulate"] == 2 and config["gradient_checkpointing"] is True
    assert config["dtype"] == "bfloat16"
    bad = kvtool("edit", "train-editor", "--accumulate", "0")
    assert bad.exit_code == 2 and "--accumulate" in bad.stderr
    bad = kvtool("edit", "train-editor", "--dtype", "float8")
    assert bad.exit_code == 2 and "--dtype" in bad.stderr


def test_random_weights_model_trains_applies_and_builds_a_folder(tmp_path: Path) -> None:
    spec = (
        "random:tinyllama-1.1b,num_hidden_layers=2,hidden_size=64,intermediate_size=96,"
        "num_attention_heads=2,num_key_value_heads=1"
    )
    trained = kvtool_json(
        "edit", "train-editor", "--model", spec, "--dtype", "bfloat16", "--steps", "4", "--val-every", "4",
        "--val-records", "2", "--memory-edits", "4", "--n-blocks", "1", "--device", "cpu",
        "--out", tmp_path / "e.safetensors",
    )  # fmt: skip
    resources = trained["resources"]
    assert resources["peak_rss_gib"] > 0 and resources["seconds_per_step"] > 0
    assert resources["base_parameters"] > 0 and resources["editor_parameters"] > 0
    assert trained["edited_layers"] == ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj",
                                        "model.layers.1.mlp.down_proj"]  # fmt: skip
    applied = kvtool_json(
        "edit", "apply", "--editor", tmp_path / "e.safetensors", "--dtype", "bfloat16", "--device", "cpu",
        "--out", tmp_path / "edited",
    )  # fmt: skip
    assert applied["n_edits"] == 4  # the embedded world's demo edits, as for the embedded model
    edits = write_jsonl(tmp_path / "edits.jsonl", records("counterfact", 2))
    applied = kvtool_json(
        "edit", "apply", "--editor", tmp_path / "e.safetensors", "--edits", edits, "--dtype", "bfloat16",
        "--device", "cpu", "--out", tmp_path / "edited1",
    )  # fmt: skip
    built = kvtool_json("edit", "build-model", spec, "--dtype", "bfloat16", "--out", tmp_path / "folder")
    assert built["parameters"] == resources["base_parameters"]
    # the folder is the same model: the editor applies to it through from_pretrained
    again = kvtool_json(
        "edit", "apply", "--editor", tmp_path / "e.safetensors", "--model", tmp_path / "folder",
        "--edits", edits, "--dtype", "bfloat16", "--device", "cpu", "--out", tmp_path / "edited2",
    )  # fmt: skip
    assert [e["p_post"] for e in again["edits"]] == [e["p_post"] for e in applied["edits"]]
    bad = kvtool("edit", "build-model", "random:nope-70b", "--out", tmp_path / "x")
    assert bad.exit_code == 2 and "nope-70b" in bad.stderr
