"""Artifacts: one safetensors file with typed, checked metadata.

Every command hands its result to the next one as an artifact. The header metadata
holds ``format`` (always ``kvtool``), ``kind`` (``vfl.split``, ``edit.editor``, ...),
``kvtool_version``, ``format_version``, ``config`` (the typed config that built it, as
JSON), ``provenance`` (command, arguments, parents' sha256, data fingerprints, seed,
time), ``extra`` (kind-specific JSON such as feature statistics) and ``content_sha256``,
a digest over the tensors and the rest of the metadata, so that truncation or tampering
is detected on load instead of producing a silently wrong model. The digest alone is not
keyed (anyone can recompute it): with ``--sign-key`` it is also signed, and readers given
``--trust`` refuse what no trusted key signed (:mod:`kedit_vfl.signing`). Loading refuses
weights that are NaN or infinite, and metadata that is not what kvtool writes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from kedit_vfl import __version__, signing
from kedit_vfl.errors import UserError

FORMAT = "kvtool"
FORMAT_VERSION = 1
_META_KEYS = ("format", "format_version", "kind", "kvtool_version", "config", "provenance", "extra")


@dataclass
class Artifact:
    """What an artifact file holds, in memory."""

    kind: str
    tensors: dict[str, torch.Tensor]
    config: dict[str, Any]
    provenance: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    kvtool_version: str = __version__
    format_version: int = FORMAT_VERSION
    path: Path | None = None
    sha256: str | None = None
    signer: str | None = None  # fingerprint of the key that signed it, if signed

    @property
    def party(self) -> str | None:
        """Which VFL party owns this artifact (``active``/``passive``), if any."""
        return self.extra.get("party")


def config_to_dict(config: Any) -> dict[str, Any]:
    """A dataclass config as a JSON-safe dict (paths become strings, tuples lists)."""
    if dataclasses.is_dataclass(config):
        config = dataclasses.asdict(config)
    return json.loads(json.dumps(config, default=str))


def file_sha256(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """sha256 of a file, read in chunks so that large tables do not fill memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def data_fingerprint(paths: Iterable[str | Path]) -> dict[str, str]:
    """sha256 per data file (a folder contributes each file inside it, sorted)."""
    fingerprints: dict[str, str] = {}
    for path in paths:
        path = Path(path)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            fingerprints[str(file)] = file_sha256(file)
    return fingerprints


def make_provenance(
    command: str,
    arguments: Mapping[str, Any],
    parents: Iterable[Artifact] = (),
    data: Mapping[str, str] | None = None,
    seed: int | None = None,
) -> dict[str, Any]:
    """The provenance record stored with every artifact."""
    return {
        "command": command,
        "arguments": json.loads(json.dumps(dict(arguments), default=str)),
        "parents": [
            {"path": str(p.path) if p.path else None, "kind": p.kind, "sha256": p.sha256} for p in parents
        ],
        "data": dict(data or {}),
        "seed": seed,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _content_digest(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> str:
    digest = hashlib.sha256()
    for key in _META_KEYS:
        digest.update(key.encode() + b"\0" + metadata.get(key, "").encode() + b"\0")
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous().cpu()
        digest.update(name.encode() + b"\0" + str(tensor.dtype).encode() + str(tuple(tensor.shape)).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def atomic_write(path: Path, write: Any) -> None:
    """Call ``write(tmp_path)`` then rename over ``path``: no half-written file is ever left."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{path.parent}: cannot create the output folder ({exc.strerror})") from exc
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise UserError(f"{path}: cannot write here ({exc.strerror})") from exc
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except OSError as exc:
        raise UserError(f"{path}: could not write the file ({exc.strerror})") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_artifact(artifact: Artifact, path: str | Path) -> str:
    """Write the artifact atomically; return its file's sha256."""
    path = Path(path)
    tensors = {name: t.detach().contiguous().cpu() for name, t in artifact.tensors.items()}
    metadata = {
        "format": FORMAT,
        "format_version": str(artifact.format_version),
        "kind": artifact.kind,
        "kvtool_version": artifact.kvtool_version,
        "config": json.dumps(artifact.config, sort_keys=True),
        "provenance": json.dumps(artifact.provenance, sort_keys=True),
        "extra": json.dumps(artifact.extra, sort_keys=True),
    }
    metadata["content_sha256"] = _content_digest(tensors, metadata)
    metadata.update(signing.signature_fields(metadata["content_sha256"]))
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    artifact.path = path
    artifact.sha256 = file_sha256(path)
    artifact.signer = metadata.get("signer")
    return artifact.sha256


def read_metadata(path: str | Path) -> dict[str, str]:
    """The raw header metadata, without loading tensors (cheap checks, ``kvtool info``)."""
    from safetensors import safe_open

    path = _existing(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{path}: not a readable safetensors artifact ({exc})") from exc


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a folder, expected an artifact file (.safetensors)")
    return path


def load_artifact(path: str | Path, kinds: str | Iterable[str] | None = None) -> Artifact:
    """Load and verify an artifact; refuse a wrong kind, a newer format or a damaged file."""
    path = _existing(path)
    wanted = (kinds,) if isinstance(kinds, str) else tuple(kinds or ())
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"{path}: damaged or truncated artifact ({exc})") from exc
    metadata = read_metadata(path)
    if metadata.get("format") != FORMAT:
        raise UserError(f"{path}: not a kvtool artifact (no 'format: kvtool' in its header)")
    kind = metadata.get("kind", "?")
    if wanted and kind not in wanted:
        raise UserError(f"{path}: expected a {' or '.join(wanted)} artifact, got {kind[:60]}")
    try:
        version = int(metadata.get("format_version", "0"))
    except ValueError:
        raise UserError(f"{path}: artifact metadata is malformed (format_version is not a number)") from None
    if version > FORMAT_VERSION:
        raise UserError(
            f"{path}: artifact format {version} is newer than this kvtool supports "
            f"({FORMAT_VERSION}); upgrade kvtool"
        )
    digest = _content_digest(tensors, metadata)
    if digest != metadata.get("content_sha256"):
        raise UserError(f"{path}: artifact content does not match its checksum (tampered or damaged)")
    signer = signing.check_signature(path, metadata, digest)
    fields = {}
    for name, default in (("config", None), ("provenance", None), ("extra", "{}")):
        try:
            fields[name] = json.loads(metadata[name] if default is None else metadata.get(name, default))
        except KeyError:
            raise UserError(f"{path}: artifact metadata is malformed (no '{name}')") from None
        except (json.JSONDecodeError, RecursionError):
            raise UserError(f"{path}: artifact metadata is malformed ('{name}' is not valid JSON)") from None
        if not isinstance(fields[name], dict):
            raise UserError(f"{path}: artifact metadata is malformed ('{name}' is not a JSON object)")
    config, provenance, extra = fields["config"], fields["provenance"], fields["extra"]
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and tensor.numel() and not bool(torch.isfinite(tensor).all()):
            raise UserError(
                f"{path}: tensor '{name[:80]}' holds NaN or infinite values; refusing a broken model"
            )
    return Artifact(
        kind=kind,
        tensors=tensors,
        config=config,
        provenance=provenance,
        extra=extra,
        kvtool_version=metadata.get("kvtool_version", "?"),
        format_version=version,
        path=path,
        sha256=file_sha256(path),
        signer=signer,
    )


def describe(path: str | Path) -> dict[str, Any]:
    """Everything ``kvtool info`` shows: kind, versions, config, provenance, tensor shapes."""
    artifact = load_artifact(path)
    return {
        "path": str(artifact.path),
        "kind": artifact.kind,
        "party": artifact.party,
        "kvtool_version": artifact.kvtool_version,
        "format_version": artifact.format_version,
        "sha256": artifact.sha256,
        "signed_by": artifact.signer,
        "config": artifact.config,
        "provenance": artifact.provenance,
        "extra_keys": sorted(artifact.extra),
        "tensors": {
            name: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
            for name, t in sorted(artifact.tensors.items())
        },
        "parameters": int(sum(t.numel() for t in artifact.tensors.values())),
    }
