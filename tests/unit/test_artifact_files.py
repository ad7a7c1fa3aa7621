"""Files that are not kvtool artifacts, crafted byte by byte: each is one UserError line that
names the file and what is wrong, never an exception from deeper down."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from kedit_vfl.artifacts import Artifact, describe, load_artifact, read_metadata, save_artifact
from kedit_vfl.errors import UserError


def _raw(header: object, body: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


KV = {"format": "kvtool"}


def _valid_header() -> dict:
    return {"__metadata__": KV, "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}


CRAFTED = {
    "empty": (b"", "too short"),
    "random bytes": (b"\x13\x37" * 40, "header of"),
    "a claimed 1 TiB header": (struct.pack("<Q", 1 << 40) + b"{}", "header of"),
    "header not JSON": (struct.pack("<Q", 4) + b"\xff\xfe{[", "unreadable header"),
    "header a JSON list": (_raw([1, 2]), "unreadable header"),
    "metadata not strings": (_raw({"__metadata__": {"format": 1}}), "metadata is malformed"),
    "tensor past the end": (_raw(_valid_header(), b"\0" * 4), "out of bounds"),
    "tensor entry malformed": (
        _raw({"__metadata__": {"format": "kvtool"}, "w": {"dtype": "F32"}}),
        "malformed",
    ),
    "a dtype kvtool never writes": (
        _raw(
            {
                "__metadata__": {"format": "kvtool"},
                "w": {"dtype": "F8_E4M3", "shape": [1], "data_offsets": [0, 1]},
            },
            b"\0",
        ),  # fmt: skip
        "a type kvtool never writes",
    ),
}


@pytest.mark.parametrize("name", sorted(CRAFTED))
def test_crafted_files_are_one_line(tmp_path: Path, name: str) -> None:
    data, expected = CRAFTED[name]
    path = tmp_path / "crafted.safetensors"
    path.write_bytes(data)
    for read in (load_artifact, describe):
        with pytest.raises(UserError) as raised:
            read(path)
        message = str(raised.value)
        assert message.startswith(f"{path}: ") and expected in message and "\n" not in message, message


def test_another_tools_safetensors_file_is_not_a_kvtool_artifact(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(2)}, str(path), metadata={"format": "pt"})
    with pytest.raises(UserError, match="not a kvtool artifact"):
        load_artifact(path)
    assert read_metadata(path) == {"format": "pt"}


def test_every_truncation_of_an_artifact_is_refused_in_one_line(tmp_path: Path) -> None:
    source = tmp_path / "a.safetensors"
    save_artifact(Artifact("vfl.local", {"w": torch.arange(16.0)}, {"k": 1}, {}, {}), source)
    data = source.read_bytes()
    cut = tmp_path / "cut.safetensors"
    for size in sorted({0, 1, 7, 8, 9, len(data) // 2, len(data) - 64, len(data) - 1}):
        cut.write_bytes(data[:size])
        with pytest.raises(UserError) as raised:
            load_artifact(cut)
        assert str(raised.value).startswith(f"{cut}: ") and "\n" not in str(raised.value)
