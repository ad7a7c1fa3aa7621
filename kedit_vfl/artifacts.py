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

The file is checked from its raw bytes (:func:`read_checked`), without PyTorch, so that
``kvtool info`` starts fast; only :func:`load_artifact` and :func:`save_artifact` build
tensors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kedit_vfl import __version__, signing
from kedit_vfl.errors import UserError

if TYPE_CHECKING:
    import torch

FORMAT = "kvtool"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
TORCH_DTYPES = {
    "F64": "torch.float64", "F32": "torch.float32", "F16": "torch.float16", "BF16": "torch.bfloat16",
    "I64": "torch.int64", "I32": "torch.int32", "I16": "torch.int16", "I8": "torch.int8",
    "U8": "torch.uint8", "BOOL": "torch.bool",
}  # fmt: skip
FORMAT_VERSION = 1
_META_KEYS = ("format", "format_version", "kind", "kvtool_version", "config", "provenance", "extra")


@dataclass
class Artifact:
    """What an artifact file holds, in memory."""

    kind: str
    tensors: dict[str, torch.Tensor]  # empty when read by :func:`read_checked` alone
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


def _digest(parts: Iterable[tuple[str, str, tuple[int, ...], Any]], metadata: Mapping[str, str]) -> str:
    """sha256 over the metadata fields and each tensor's name, dtype, shape and bytes.

    The bytes are views (memoryview, NumPy), never copies: an editor for a 7B model and its
    optimizer state are gigabytes, and a copy of each at once would double the peak.
    """
    digest = hashlib.sha256()
    for key in _META_KEYS:
        digest.update(key.encode() + b"\0" + metadata.get(key, "").encode() + b"\0")
    for name, dtype, shape, data in sorted(parts, key=lambda part: part[0]):
        digest.update(name.encode() + b"\0" + dtype.encode() + str(shape).encode())
        digest.update(data)
    return digest.hexdigest()


def _content_digest(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> str:
    import torch

    parts = []
    for name, tensor in tensors.items():
        tensor = tensor.detach().contiguous().cpu()
        data = tensor.reshape(-1).view(torch.uint8).numpy() if tensor.numel() else b""
        parts.append((name, str(tensor.dtype), tuple(tensor.shape), data))
    return _digest(parts, metadata)


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
    from safetensors.torch import save_file

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


def _header(data: bytes, path: Path) -> tuple[dict[str, Any], int]:
    """A safetensors header and where its data begins, checked against the file's size."""
    if len(data) < 8:
        raise UserError(f"{path}: not a safetensors artifact (too short)")
    size = int.from_bytes(data[:8], "little")
    if size > MAX_HEADER_BYTES:
        raise UserError(f"{path}: not a safetensors artifact (it claims a header of {size:,} bytes)")
    if 8 + size > len(data):
        raise UserError(f"{path}: damaged or truncated artifact (header of {size:,} bytes)")
    try:
        header = json.loads(data[8 : 8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise UserError(f"{path}: not a safetensors artifact (unreadable header)") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: not a safetensors artifact (unreadable header)")
    return header, 8 + size


def _parts(header: dict[str, Any], start: int, data: bytes, path: Path) -> list:
    """(name, torch dtype, shape, bytes) of each tensor, every offset checked."""
    parts = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = (
                entry["dtype"],
                tuple(int(n) for n in entry["shape"]),
                entry["data_offsets"],
            )
            begin, end = int(begin), int(end)
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path}: damaged artifact (tensor '{str(name)[:80]}' is malformed)") from None
        if dtype not in TORCH_DTYPES:
            raise UserError(
                f"{path}: tensor '{str(name)[:80]}' has a type kvtool never writes ({str(dtype)[:20]})"
            )
        if not 0 <= begin <= end <= len(data) - start:
            raise UserError(
                f"{path}: damaged or truncated artifact (tensor '{str(name)[:80]}' out of bounds)"
            )
        parts.append((name, TORCH_DTYPES[dtype], shape, memoryview(data)[start + begin : start + end]))
    return parts


def _finite(dtype: str, data: bytes) -> bool:
    """Whether a float tensor's raw bytes hold no NaN or infinity (NumPy, no PyTorch)."""
    import numpy as np

    if dtype == "torch.bfloat16":  # the upper half of a float32
        values = (np.frombuffer(data, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    elif dtype in ("torch.float16", "torch.float32", "torch.float64"):
        values = np.frombuffer(data, dtype={"torch.float16": "<f2", "torch.float32": "<f4"}.get(dtype, "<f8"))
    else:
        return True
    return bool(np.isfinite(values).all())


@dataclass(frozen=True)
class CheckedFile:
    """An artifact file read and verified from its bytes; tensors not built."""

    artifact: Artifact
    data: bytes
    parts: list


def read_metadata(path: str | Path) -> dict[str, str]:
    """The raw header metadata, without reading or checking the tensors (cheap checks)."""
    path = _existing(path)
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
            size = int.from_bytes(head, "little") if len(head) == 8 else 0
            if not 0 < size <= MAX_HEADER_BYTES:
                raise UserError(f"{path}: not a readable safetensors artifact")
            header, _ = _header(head + handle.read(size), path)
    except OSError as exc:
        raise UserError(f"{path}: cannot read it ({exc.strerror})") from exc
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise UserError(f"{path}: artifact metadata is malformed")
    return dict(metadata)


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a folder, expected an artifact file (.safetensors)")
    return path


def read_checked(path: str | Path, kinds: str | Iterable[str] | None = None) -> CheckedFile:
    """Read and verify an artifact from its bytes: kind, format version, checksum, signature
    (with ``--trust``), metadata and finite weights; refuse anything else with one line."""
    path = _existing(path)
    wanted = (kinds,) if isinstance(kinds, str) else tuple(kinds or ())
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{path}: cannot read it ({exc.strerror})") from exc
    header, start = _header(data, path)
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise UserError(f"{path}: artifact metadata is malformed")
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
    parts = _parts(header, start, data, path)
    digest = _digest(parts, metadata)
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
    for name, dtype, _, raw in parts:
        if not _finite(dtype, raw):
            raise UserError(f"{path}: tensor '{name[:80]}' holds NaN or infinite values (a broken model)")
    artifact = Artifact(
        kind=kind,
        tensors={},
        config=fields["config"],
        provenance=fields["provenance"],
        extra=fields["extra"],
        kvtool_version=metadata.get("kvtool_version", "?"),
        format_version=version,
        path=path,
        sha256=hashlib.sha256(data).hexdigest(),
        signer=signer,
    )
    return CheckedFile(artifact, data, parts)


def load_artifact(path: str | Path, kinds: str | Iterable[str] | None = None) -> Artifact:
    """Load and verify an artifact; refuse a wrong kind, a newer format or a damaged file."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    checked = read_checked(path, kinds)
    try:
        checked.artifact.tensors = load(checked.data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise UserError(f"{checked.artifact.path}: damaged or truncated artifact ({exc})") from exc
    return checked.artifact


def describe(path: str | Path) -> dict[str, Any]:
    """Everything ``kvtool info`` shows: kind, versions, config, provenance, tensor shapes
    (checked from the file's bytes, without PyTorch)."""
    checked = read_checked(path)
    artifact = checked.artifact
    return {
        "path": str(artifact.path),
        "kind": artifact.kind,
        "party": artifact.party,
        "kvtool_version": artifact.kvtool_version,
        "format_version": artifact.format_version,
        "sha256": artifact.sha256,
        "signed_by": artifact.signer,  # as the file claims it, unless verified (--trust)
        "signature_verified": artifact.signer is not None and signing.current().trusted is not None,
        "config": artifact.config,
        "provenance": artifact.provenance,
        "extra_keys": sorted(artifact.extra),
        "tensors": {
            name: {"shape": list(shape), "dtype": dtype.removeprefix("torch.")}
            for name, dtype, shape, _ in sorted(checked.parts, key=lambda part: part[0])
        },
        "parameters": sum(math.prod(shape) for _, _, shape, _ in checked.parts),
    }
