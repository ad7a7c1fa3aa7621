"""A party's identity on the wire: a private key and a self-signed certificate.

``kvtool vfl keygen`` writes both; the parties exchange certificates (never keys) out of
band, check each other's fingerprint as they would an SSH host key, and each then pins
the other's certificate with ``--peer-cert``: the TLS handshake refuses any other peer.
Keys are ECDSA P-256 (supported by every TLS 1.3 stack), made by the ``cryptography``
package; nothing here is hand-made cryptography.
"""

from __future__ import annotations

import datetime
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from kedit_vfl.errors import UserError

KEY_FILE = "key.pem"
CERT_FILE = "cert.pem"
MAX_PEM_BYTES = 64 * 1024  # a certificate or key file is a few hundred bytes
VALID_DAYS = 3650


@dataclass(frozen=True)
class Identity:
    """This party's key and certificate files, and the certificate's fingerprint."""

    key: Path
    cert: Path
    fingerprint: str


def fingerprint_der(der: bytes) -> str:
    """``SHA256:<hex>`` of a DER certificate, as ``kvtool vfl keygen`` prints it."""
    return "SHA256:" + hashlib.sha256(der).hexdigest()


def _read_pem(path: Path, what: str, flag: str) -> bytes:
    try:
        if path.stat().st_size > MAX_PEM_BYTES:
            raise UserError(f"{flag} {path}: {what} file is too large to be one")
        return path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{flag} {path}: no such file (make one with 'kvtool vfl keygen')") from None
    except IsADirectoryError:
        raise UserError(f"{flag} {path}: expected a {what} file, found a folder") from None
    except OSError as exc:
        raise UserError(f"{flag} {path}: cannot read it ({exc.strerror})") from exc


def load_certificate(path: Path, flag: str = "--peer-cert") -> tuple[bytes, str]:
    """The PEM text and fingerprint of a certificate file; refuse anything else."""
    from cryptography import x509

    pem = _read_pem(Path(path), "certificate", flag)
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise UserError(
            f"{flag} {path}: not a PEM certificate (give the cert.pem written by 'kvtool vfl keygen')"
        ) from None
    from cryptography.hazmat.primitives.serialization import Encoding

    return pem, fingerprint_der(cert.public_bytes(Encoding.DER))


def load_identity(folder: Path) -> Identity:
    """A folder written by ``kvtool vfl keygen``; its key must match its certificate."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_pem_private_key

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--identity {folder}: expected the folder written by 'kvtool vfl keygen'")
    key_path, cert_path = folder / KEY_FILE, folder / CERT_FILE
    _, fingerprint = load_certificate(cert_path, "--identity")
    try:
        key = load_pem_private_key(_read_pem(key_path, "key", "--identity"), password=None)
    except (ValueError, TypeError):
        raise UserError(f"--identity {folder}: {KEY_FILE} is not an unencrypted PEM private key") from None
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    der, spki = Encoding.DER, PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(der, spki) != cert.public_key().public_bytes(der, spki):
        raise UserError(f"--identity {folder}: {KEY_FILE} and {CERT_FILE} do not belong together")
    return Identity(key_path, cert_path, fingerprint)


def generate_identity(folder: Path, name: str, force: bool = False) -> Identity:
    """Write a new P-256 key (mode 0600) and a self-signed certificate into ``folder``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
    from cryptography.x509.oid import NameOID

    folder = Path(folder)
    key_path, cert_path = folder / KEY_FILE, folder / CERT_FILE
    if not force and (key_path.exists() or cert_path.exists()):
        raise UserError(
            f"--out {folder}: already holds an identity; keep it, or pass --force to replace it "
            "(the other party must then pin the new certificate)"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--out {folder}: cannot create it ({exc.strerror})") from exc
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"kvtool {name}")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    descriptor = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(key_pem)
    os.chmod(key_path, 0o600)
    cert_path.write_bytes(cert.public_bytes(Encoding.PEM))
    return Identity(key_path, cert_path, fingerprint_der(cert.public_bytes(Encoding.DER)))
