from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from kedit_vfl.artifacts import (
    Artifact,
    config_to_dict,
    load_artifact,
    make_provenance,
    read_metadata,
    save_artifact,
)
from kedit_vfl.errors import UserError


@dataclass(frozen=True)
class _Config:
    width: int = 4
    path: Path = Path("x.csv")


def _artifact() -> Artifact:
    return Artifact(
        kind="vfl.split",
        tensors={"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.zeros(3)},
        config=config_to_dict(_Config()),
        provenance=make_provenance("test", {"a": 1}, seed=3),
        extra={"party": "active"},
    )


def test_round_trip_keeps_tensors_config_and_provenance(tmp_path: Path) -> None:
    sha = save_artifact(_artifact(), tmp_path / "a.safetensors")
    loaded = load_artifact(tmp_path / "a.safetensors", "vfl.split")
    assert torch.equal(loaded.tensors["w"], _artifact().tensors["w"])
    assert loaded.config == {"width": 4, "path": "x.csv"}
    assert loaded.provenance["seed"] == 3 and loaded.party == "active"
    assert loaded.sha256 == sha and len(sha) == 64
    assert read_metadata(tmp_path / "a.safetensors")["kind"] == "vfl.split"


def test_wrong_kind_is_refused_with_both_kinds_named(tmp_path: Path) -> None:
    save_artifact(_artifact(), tmp_path / "a.safetensors")
    with pytest.raises(UserError, match="expected a vfl.local artifact, got vfl.split"):
        load_artifact(tmp_path / "a.safetensors", "vfl.local")


def test_truncated_file_is_a_user_error(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    save_artifact(_artifact(), path)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(UserError, match="damaged or truncated"):
        load_artifact(path)


def test_tampered_tensor_bytes_fail_the_checksum(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    save_artifact(_artifact(), path)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="checksum"):
        load_artifact(path)


def test_failed_write_leaves_the_old_artifact_intact(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "a.safetensors"
    save_artifact(_artifact(), path)
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("kedit_vfl.artifacts.save_file", boom)
    with pytest.raises(UserError, match="could not write"):
        save_artifact(_artifact(), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]


def test_not_an_artifact(tmp_path: Path) -> None:
    (tmp_path / "x.safetensors").write_text("hello")
    with pytest.raises(UserError):
        load_artifact(tmp_path / "x.safetensors")
    with pytest.raises(UserError, match="no such file"):
        load_artifact(tmp_path / "missing.safetensors")


def test_scalar_and_bfloat16_tensors_round_trip(tmp_path: Path) -> None:
    artifact = _artifact()
    artifact.tensors["count"] = torch.tensor(3.0, dtype=torch.float64)
    artifact.tensors["half"] = torch.ones(2, dtype=torch.bfloat16)
    save_artifact(artifact, tmp_path / "s.safetensors")
    loaded = load_artifact(tmp_path / "s.safetensors")
    assert loaded.tensors["count"].item() == 3.0 and loaded.tensors["half"].dtype == torch.bfloat16


def test_written_files_get_the_usual_permissions(tmp_path: Path) -> None:
    import os
    import stat

    save_artifact(_artifact(), tmp_path / "a.safetensors")
    mode = stat.S_IMODE(os.stat(tmp_path / "a.safetensors").st_mode)
    mask = os.umask(0)
    os.umask(mask)
    assert mode == 0o666 & ~mask
