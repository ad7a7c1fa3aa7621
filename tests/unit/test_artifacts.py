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

    monkeypatch.setattr("safetensors.torch.save_file", boom)
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


def _rewrite(path: Path, tensors: dict | None = None, **metadata: str) -> None:
    """Rewrite an artifact's tensors or header fields, recomputing the (unkeyed) checksum."""
    from safetensors.torch import load_file, save_file

    from kedit_vfl.artifacts import _content_digest

    header = {**read_metadata(path), **metadata}
    data = tensors if tensors is not None else load_file(str(path))
    header["content_sha256"] = _content_digest(data, header)
    save_file(data, str(path), metadata=header)


def test_nan_or_infinite_weights_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    save_artifact(_artifact(), path)
    _rewrite(path, tensors={"w": torch.tensor([[1.0, float("nan")]]), "b": torch.zeros(3)})
    with pytest.raises(UserError, match="tensor 'w' holds NaN or infinite values"):
        load_artifact(path)
    _rewrite(path, tensors={"w": torch.ones(2), "b": torch.tensor([float("inf")])})
    with pytest.raises(UserError, match="tensor 'b' holds NaN"):
        load_artifact(path)


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"config": "{not json"}, "'config' is not valid JSON"),
        ({"extra": "[1, 2]"}, "'extra' is not a JSON object"),
        ({"format_version": "one"}, "format_version is not a number"),
    ],
)
def test_malformed_metadata_is_one_clear_error(tmp_path: Path, fields: dict, expected: str) -> None:
    path = tmp_path / "a.safetensors"
    save_artifact(_artifact(), path)
    _rewrite(path, **fields)
    with pytest.raises(UserError, match=expected):
        load_artifact(path)


def test_signed_artifacts_and_trust(tmp_path: Path) -> None:
    from kedit_vfl import signing

    ours = signing.generate_signing_key(tmp_path / "ours")
    theirs = signing.generate_signing_key(tmp_path / "theirs")
    assert (tmp_path / "ours" / "signing.key").stat().st_mode & 0o777 == 0o600
    try:
        signing.use_signing(ours[0])
        save_artifact(_artifact(), tmp_path / "signed.safetensors")
        signing.use_signing(theirs[0])
        save_artifact(_artifact(), tmp_path / "theirs.safetensors")
        signing.reset()
        save_artifact(_artifact(), tmp_path / "plain.safetensors")
        assert load_artifact(tmp_path / "plain.safetensors").signer is None  # no --trust: nothing required
        signing.use_signing(None, [ours[1]])
        assert load_artifact(tmp_path / "signed.safetensors").signer == ours[2]
        with pytest.raises(UserError, match="not signed"):
            load_artifact(tmp_path / "plain.safetensors")
        with pytest.raises(UserError, match="not among the --trust keys"):
            load_artifact(tmp_path / "theirs.safetensors")
        # a forger changes a weight, recomputes the checksum and keeps the signature fields
        _rewrite(tmp_path / "signed.safetensors", tensors={"w": torch.ones(2, 3), "b": torch.zeros(3)})
        with pytest.raises(UserError, match="signature does not match"):
            load_artifact(tmp_path / "signed.safetensors")
        signing.use_signing(None, [theirs[1], ours[1]])
        assert load_artifact(tmp_path / "theirs.safetensors").signer == theirs[2]
    finally:
        signing.reset()
    with pytest.raises(UserError, match="not an Ed25519 key|not an unencrypted PEM"):
        signing.use_signing(tmp_path / "ours" / "signing.pub")
