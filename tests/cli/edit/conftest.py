"""Tiny models saved as local folders, edit records as JSONL, and editors trained on them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.cli.runner import kvtool
from tests.unit.edit.tiny import records, save_tiny, write_jsonl


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def _one_thread() -> None:
    # Tiny models: one thread is as fast, and avoids oversubscribing a shared CI runner.
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def edit_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("edit")
    train = records("counterfact", 6) + records("recent", 6) + records("zsre", 3)
    return {
        "root": root,
        "train": write_jsonl(root / "train.jsonl", train),
        "edits": write_jsonl(root / "edits.jsonl", records("counterfact", 3)),
        "gpt2": save_tiny("gpt2", root / "gpt2"),
        "llama": save_tiny("llama", root / "llama"),
        "gpt_neox": save_tiny("gpt_neox", root / "gpt_neox"),
    }


def train(files: dict[str, Path], arch: str, out: Path, *extra: str) -> Path:
    result = kvtool(
        "edit",
        "train-editor",
        "--model",
        files[arch],
        "--data",
        files["train"],
        "--tasks",
        "counterfact,recent",
        "--holdout",
        "zsre",
        "--steps",
        "16",
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
        *extra,
    )
    assert result.exit_code == 0, result.stderr + repr(result.exception)
    return out


@pytest.fixture(scope="session")
def gpt2_editor(edit_files: dict[str, Path]) -> Path:
    return train(edit_files, "gpt2", edit_files["root"] / "gpt2-editor.safetensors")


def bad_jsonl(path: Path, record: dict) -> Path:
    path.write_text(json.dumps(record) + "\n")
    return path
