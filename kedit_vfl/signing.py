"""Optional Ed25519 signatures on artifacts, so a pipeline can refuse files it did not make.

A writing command given ``--sign-key`` signs the artifact's content digest (which covers
every tensor and every metadata field); a reading command given ``--trust`` (one or more
public keys) refuses an artifact that no trusted key signed. Without ``--trust`` nothing
is required. Keys come from ``kvtool sign-keygen``; the ``cryptography`` package does the
signing (no hand-made cryptography). The policy is set once per command by the CLI and
read where artifacts are saved and loaded.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kedit_vfl.errors import UserError

SIGNED_MESSAGE = "kvtool-artifact-signature/1|"
MAX_KEY_BYTES = 16 * 1024
PRIVATE_FILE, PUBLIC_FILE = "signing.key", "signing.pub"


@dataclass(frozen=True)
class SigningPolicy:
    """What this command signs with and whose signatures it accepts."""

    sign_key: Any = None  # Ed25519PrivateKey
    signer: str | None = None  # its public key's fingerprint
    trusted: dict[str, Any] | None = None  # fingerprint -> Ed25519PublicKey; None: nothing required


_NO_POLICY = SigningPolicy()
# Process-wide, not a ContextVar: a worker thread that saves or loads an artifact must see
# the command's policy too (a new thread starts with an empty context, which would fail open).
_policy: list[SigningPolicy] = []


def fingerprint(public_key: Any) -> str:
    """``ed25519:SHA256:<hex>`` of the raw public key."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    raw = public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return "ed25519:SHA256:" + hashlib.sha256(raw).hexdigest()


def _read(path: Path, flag: str) -> bytes:
    try:
        if Path(path).stat().st_size > MAX_KEY_BYTES:
            raise UserError(f"{flag} {path}: too large to be a key file")
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise UserError(f"{flag} {path}: no such file (make keys with 'kvtool sign-keygen')") from None
    except IsADirectoryError:
        raise UserError(f"{flag} {path}: expected a key file, found a folder") from None
    except OSError as exc:
        raise UserError(f"{flag} {path}: cannot read it ({exc.strerror})") from exc


def load_private(path: Path) -> Any:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(_read(path, "--sign-key"), password=None)
    except (ValueError, TypeError):
        raise UserError(f"--sign-key {path}: not an unencrypted PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise UserError(f"--sign-key {path}: not an Ed25519 key (make one with 'kvtool sign-keygen')")
    return key


def load_public(path: Path) -> Any:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        key = load_pem_public_key(_read(path, "--trust"))
    except (ValueError, TypeError):
        raise UserError(
            f"--trust {path}: not a PEM public key (give the signing.pub of the signer)"
        ) from None
    if not isinstance(key, Ed25519PublicKey):
        raise UserError(f"--trust {path}: not an Ed25519 public key")
    return key


def use_signing(sign_key: Path | None = None, trust: list[Path] | None = None) -> SigningPolicy:
    """Set this command's policy; the key files are read and checked now, before any work."""
    private = load_private(sign_key) if sign_key is not None else None
    trusted = None
    if trust:
        trusted = {}
        for path in trust:
            public = load_public(path)
            trusted[fingerprint(public)] = public
    if trusted is not None and private is not None:  # what this command signs, it also accepts
        trusted.setdefault(fingerprint(private.public_key()), private.public_key())  # (its own checkpoint)
    policy = SigningPolicy(
        private, fingerprint(private.public_key()) if private is not None else None, trusted
    )
    _policy[:] = [policy]
    return policy


def reset() -> None:
    """Back to no signing and no requirement (after each command)."""
    _policy.clear()


def current() -> SigningPolicy:
    """This command's policy, seen from any thread of the process."""
    return _policy[0] if _policy else _NO_POLICY


def signature_fields(content_digest: str) -> dict[str, str]:
    """The metadata fields that sign ``content_digest`` under this command's key (none without one)."""
    policy = current()
    if policy.sign_key is None:
        return {}
    signature = policy.sign_key.sign((SIGNED_MESSAGE + content_digest).encode())
    return {"signature": signature.hex(), "signer": str(policy.signer)}


def check_signature(path: Path, metadata: dict[str, str], content_digest: str) -> str | None:
    """The signer's fingerprint if the signature holds; with ``--trust``, refuse anything else."""
    policy, signer, signature = current(), metadata.get("signer"), metadata.get("signature")
    if policy.trusted is None:
        return signer
    from cryptography.exceptions import InvalidSignature

    if not signer or not signature:
        raise UserError(f"{path}: not signed, and --trust requires a signature from a trusted key")
    public = policy.trusted.get(signer)
    if public is None:
        raise UserError(f"{path}: signed by {signer[:60]}, which is not among the --trust keys")
    try:
        public.verify(bytes.fromhex(signature), (SIGNED_MESSAGE + content_digest).encode())
    except (InvalidSignature, ValueError):
        raise UserError(f"{path}: the signature does not match the content (tampered or re-signed)") from None
    return signer


def generate_signing_key(folder: Path, force: bool = False) -> tuple[Path, Path, str]:
    """Write an Ed25519 key pair: ``signing.key`` (mode 0600) and ``signing.pub``."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        NoEncryption,
        PrivateFormat,
        PublicFormat,
    )

    folder = Path(folder)
    private_path, public_path = folder / PRIVATE_FILE, folder / PUBLIC_FILE
    if not force and (private_path.exists() or public_path.exists()):
        raise UserError(
            f"--out {folder}: already holds a signing key; keep it, or pass --force to replace it"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--out {folder}: cannot create it ({exc.strerror})") from exc
    key = Ed25519PrivateKey.generate()
    descriptor = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    os.chmod(private_path, 0o600)
    public_path.write_bytes(key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    return private_path, public_path, fingerprint(key.public_key())
