"""Signing keys and the trust policy: what each key file gets, and what a command accepts."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    BestAvailableEncryption,
    Encoding,
    PrivateFormat,
    PublicFormat,
    load_pem_public_key,
)

from kedit_vfl import signing
from kedit_vfl.errors import UserError


@pytest.fixture(autouse=True)
def _no_policy_left_behind():
    yield
    signing.reset()


def test_keygen_writes_a_private_pem_0600_and_prints_the_raw_key_fingerprint(tmp_path: Path) -> None:
    private, public, fingerprint = signing.generate_signing_key(tmp_path / "k")
    assert private.stat().st_mode & 0o777 == 0o600
    assert private.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS8
    raw = load_pem_public_key(public.read_bytes()).public_bytes(Encoding.Raw, PublicFormat.Raw)
    assert fingerprint == "ed25519:SHA256:" + hashlib.sha256(raw).hexdigest()
    with pytest.raises(UserError, match="--force"):
        signing.generate_signing_key(tmp_path / "k")
    assert signing.generate_signing_key(tmp_path / "k", force=True)[2] != fingerprint


def test_a_command_that_signs_accepts_its_own_signature(tmp_path: Path) -> None:
    """train-editor --sign-key K --trust T --resume reads back its own checkpoint."""
    own = signing.generate_signing_key(tmp_path / "own")
    other = signing.generate_signing_key(tmp_path / "other")
    policy = signing.use_signing(own[0], [other[1]])
    assert set(policy.trusted or {}) == {own[2], other[2]}
    fields = signing.signature_fields("ab" * 32)
    assert signing.check_signature(tmp_path / "a", fields, "ab" * 32) == own[2]
    with pytest.raises(UserError, match="signature does not match"):
        signing.check_signature(tmp_path / "a", fields, "cd" * 32)
    with pytest.raises(UserError, match="signature does not match"):
        signing.check_signature(tmp_path / "a", {**fields, "signature": "zz"}, "ab" * 32)
    assert signing.use_signing(own[0]).trusted is None  # no --trust: nothing required


def test_key_files_that_are_not_ed25519_pem_are_refused(tmp_path: Path) -> None:
    encrypted = tmp_path / "enc.key"
    encrypted.write_bytes(
        Ed25519PrivateKey.generate().private_bytes(
            Encoding.PEM, PrivateFormat.PKCS8, BestAvailableEncryption(b"secret")
        )
    )
    with pytest.raises(UserError, match="--sign-key .*not an unencrypted PEM private key"):
        signing.use_signing(encrypted)
    ecdsa = tmp_path / "ec.pub"
    public = ec.generate_private_key(ec.SECP256R1()).public_key()
    ecdsa.write_bytes(public.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    with pytest.raises(UserError, match="--trust .*not an Ed25519 public key"):
        signing.use_signing(None, [ecdsa])
    with pytest.raises(UserError, match="--trust .*no such file"):
        signing.use_signing(None, [tmp_path / "missing.pub"])
    (tmp_path / "big.pub").write_bytes(b"x" * (signing.MAX_KEY_BYTES + 1))
    with pytest.raises(UserError, match="too large"):
        signing.use_signing(None, [tmp_path / "big.pub"])


def test_worker_threads_see_the_commands_policy(tmp_path: Path) -> None:
    """A policy that a new thread could not see would skip --trust checks there (fail open)."""
    import threading

    trusted = signing.generate_signing_key(tmp_path / "k")
    signing.use_signing(None, [trusted[1]])
    seen = []
    worker = threading.Thread(target=lambda: seen.append(signing.current().trusted))
    worker.start()
    worker.join()
    assert seen[0] is not None and trusted[2] in seen[0]


def test_info_says_whether_the_signature_was_verified(tmp_path: Path) -> None:
    """Without --trust the signer is only what the file claims; info must not present it as checked."""
    import torch

    from kedit_vfl.artifacts import Artifact, describe, save_artifact

    key = signing.generate_signing_key(tmp_path / "k")
    signing.use_signing(key[0])
    save_artifact(Artifact("vfl.local", {"w": torch.ones(2)}, {}, {}, {}), tmp_path / "a.safetensors")
    signing.reset()
    claimed = describe(tmp_path / "a.safetensors")
    assert claimed["signed_by"] == key[2] and not claimed["signature_verified"]
    signing.use_signing(None, [key[1]])
    assert describe(tmp_path / "a.safetensors")["signature_verified"]
