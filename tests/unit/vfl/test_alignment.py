"""Private alignment pieces without the wire: wire keys, the PSI steps, config, loading."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from kedit_vfl.artifacts import Artifact, data_fingerprint, save_artifact
from kedit_vfl.errors import UserError
from kedit_vfl.vfl.channel import alignment as al


def _ids(values: list[str]) -> pa.ChunkedArray:
    return pa.chunked_array([pa.array(values, pa.string())])


def test_wire_keys_are_keyed_deterministic_and_non_negative() -> None:
    ids = _ids([f"user{i}" for i in range(2000)])
    one, two = b"k" * 32, b"j" * 32
    keys = al.wire_keys(ids, one)
    assert keys.dtype == np.int64 and keys.shape == (2000,)
    assert (keys >= 0).all() and len(np.unique(keys)) == 2000
    assert np.array_equal(keys, al.wire_keys(ids, one))
    assert not np.any(keys == al.wire_keys(ids, two))
    first = int.from_bytes(hmac.digest(one, b"user0", "sha256")[:8], "little") & (2**63 - 1)
    assert int(keys[0]) == first
    # The top bit is cleared, and the keys spread over it (not all small).
    assert keys.max() > 2**62


def test_fingerprint_is_of_the_sorted_list_bytes() -> None:
    keys = np.array([3, 1, 2], dtype=np.int64)
    expected = hashlib.sha256(np.sort(keys).astype("<i8").tobytes()).hexdigest()
    assert al.fingerprint(np.sort(keys)) == expected


def test_duplicate_wire_keys_are_refused() -> None:
    with pytest.raises(UserError, match="same 64-bit wire key"):
        al._unique(np.array([5, 7, 5], dtype=np.int64), "active")


@pytest.mark.parametrize("chunk", [7, 1000])
def test_psi_steps_find_the_intersection(chunk: int) -> None:
    server_items = [f"id{i}" for i in range(0, 60, 2)]  # even ids
    client_items = [f"id{i}" for i in range(0, 45, 3)]  # multiples of 3
    server, client = al.new_server(), al.new_client()
    setup = al.parse_setup(al.server_setup(server, server_items, len(client_items), 1e-9))
    found = []
    for start, stop in al.chunks(len(client_items), chunk):
        request = al.client_request(client, client_items[start:stop])
        assert b"id3" not in request  # the request holds curve points, not ids
        response = al.server_answer(server, request)
        found.extend((al.client_intersection(client, setup, response) + start).tolist())
    assert found == [i for i, item in enumerate(client_items) if item in set(server_items)]


def test_chunks_cover_every_row_once() -> None:
    assert al.chunks(0) == []
    assert al.chunks(5, 2) == [(0, 2), (2, 4), (4, 5)]


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"party": None}, "--party None: expected active or passive"),
        ({"party": "both"}, "--party both"),
        ({"rendezvous": None}, "--rendezvous is required"),
        ({"table": None}, "--table is required"),
        ({"reveal": "none"}, "--reveal none: expected one of both, active-only"),
        ({"fpr": 0.0}, "--fpr 0.0: must be in (0, 0.01]"),
        ({"fpr": 0.5}, "--fpr 0.5"),
        ({"timeout": 0}, "--timeout 0: must be positive"),
        ({"deadline": 10}, "--deadline 10: must be at least --timeout"),
        ({"insecure": False}, "--identity DIR"),
        ({"rendezvous": "tcp://192.0.2.1:1"}, "192.0.2.1 is not a loopback address"),
    ],
)
def test_config_validation(options: dict, expected: str) -> None:
    base = {
        "party": "active",
        "rendezvous": "tcp://127.0.0.1:29500",
        "table": Path("a.csv"),
        "insecure": True,
    }
    with pytest.raises(UserError) as caught:
        al.AlignConfig(**{**base, **options})
    assert expected in str(caught.value)


def test_config_default_output_names_the_party(tmp_path: Path) -> None:
    config = al.AlignConfig(
        party="passive", rendezvous="tcp://127.0.0.1:1", table=Path("b.csv"), insecure=True
    )
    assert config.output.name == "alignment_passive.safetensors"


def test_load_alignment_refuses_the_other_party_and_another_table(tmp_path: Path) -> None:
    table, other = tmp_path / "a.csv", tmp_path / "b.csv"
    table.write_text("id\n1\n2\n")
    other.write_text("id\n1\n3\n")
    path = tmp_path / "al.safetensors"
    extra = {"party": "active", "reveal": "both", "intersection_size": 2, "fingerprint": "f" * 64}
    extra |= {"table": data_fingerprint([table]), "run_id": "r"}
    tensors = {"keys": torch.tensor([9, 4]), "rows": torch.tensor([0, 1])}
    save_artifact(Artifact(al.KIND, tensors, {}, extra=extra), path)
    loaded = al.load_alignment(path, "active", table)
    assert loaded.rows.tolist() == [0, 1] and loaded.intersection_size == 2 and loaded.reveal == "both"
    with pytest.raises(UserError, match="active party's alignment; the passive party needs its own"):
        al.load_alignment(path, "passive", table)
    with pytest.raises(UserError, match="computed for a different table"):
        al.load_alignment(path, "active", other)


def test_id_types_are_named_by_family() -> None:
    assert al.id_type_name(pa.int32()) == al.id_type_name(pa.int64()) == "int64"
    assert al.id_type_name(pa.large_string()) == al.id_type_name(pa.string()) == "string"
    assert al.id_type_name(pa.float64()) == "double"


@pytest.mark.parametrize("message", [b"\x01\x02garbage", b"\xff\xff", b""])
def test_malformed_psi_messages_are_peer_faults(message: bytes) -> None:
    from kedit_vfl.errors import PeerError

    server = al.new_server()
    with pytest.raises(PeerError, match="malformed PSI request"):
        al._parsed(lambda m: al.server_answer(server, m), message, "request")
    if message:  # an empty message is a valid, empty protobuf setup
        with pytest.raises(PeerError, match="malformed PSI setup"):
            al._parsed(al.parse_setup, message, "setup")


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"extra": {"fingerprint": None}}, "fingerprint"),
        ({"extra": {"table": ["not", "a", "mapping"]}}, "table"),
        ({"extra": {"reveal": "everything"}}, "reveal"),
        ({"tensors": {"keys": torch.tensor([1.5, 2.5]), "rows": torch.tensor([0, 1])}}, "keys and rows"),
        ({"tensors": {"keys": torch.tensor([1, 2, 3]), "rows": torch.tensor([0, 1])}}, "keys and rows"),
        ({"tensors": {"rows": torch.tensor([0, 1])}}, "keys and rows"),
    ],
)
def test_a_crafted_alignment_is_one_clear_error(tmp_path: Path, change: dict, expected: str) -> None:
    """A file with a valid checksum but not what 'kvtool vfl align' writes: one line, exit 2."""
    table = tmp_path / "a.csv"
    table.write_text("id\n1\n2\n")
    extra = {"party": "active", "reveal": "both", "intersection_size": 2, "fingerprint": "f" * 64}
    extra |= {"table": data_fingerprint([table]), "run_id": "r", **change.get("extra", {})}
    tensors = change.get("tensors", {"keys": torch.tensor([9, 4]), "rows": torch.tensor([0, 1])})
    save_artifact(Artifact(al.KIND, tensors, {}, extra=extra), tmp_path / "al.safetensors")
    with pytest.raises(UserError, match=expected):
        al.load_alignment(tmp_path / "al.safetensors", "active", table)
