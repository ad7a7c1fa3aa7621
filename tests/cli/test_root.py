from __future__ import annotations

import json
from pathlib import Path

import torch

from kedit_vfl import __version__
from kedit_vfl.artifacts import Artifact, make_provenance, save_artifact
from tests.cli.runner import kvtool


def test_version() -> None:
    result = kvtool("--version")
    assert result.exit_code == 0 and __version__ in result.stdout


def test_info_json_shows_kind_config_provenance_and_shapes(tmp_path: Path) -> None:
    artifact = Artifact(
        kind="vfl.mpd",
        tensors={"tower.weight": torch.zeros(2, 5)},
        config={"width": 5},
        provenance=make_provenance("vfl pretrain-mpd", {}, seed=1),
        extra={"party": "both"},
    )
    save_artifact(artifact, tmp_path / "m.safetensors")
    result = kvtool("info", tmp_path / "m.safetensors", "--json")
    assert result.exit_code == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["kind"] == "vfl.mpd" and info["config"] == {"width": 5}
    assert info["tensors"]["tower.weight"]["shape"] == [2, 5]
    assert info["provenance"]["command"] == "vfl pretrain-mpd"
    table = kvtool("info", tmp_path / "m.safetensors")
    assert table.exit_code == 0 and "vfl.mpd" in table.stdout


def test_user_error_is_one_line_and_exit_code_2(monkeypatch) -> None:
    monkeypatch.delenv("KVTOOL_DEBUG")
    result = kvtool("info", "missing.safetensors")
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: missing.safetensors: no such file"
    assert result.stdout == ""


def test_groups_have_help() -> None:
    for group in ("vfl", "edit"):
        result = kvtool(group, "--help")
        assert result.exit_code == 0, result.stderr
