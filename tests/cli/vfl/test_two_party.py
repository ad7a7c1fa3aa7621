"""Both parties as separate ``kvtool`` processes over 127.0.0.1, end to end and under faults."""

from __future__ import annotations

import signal
import socket
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from kedit_vfl.artifacts import load_artifact
from kedit_vfl.vfl.channel.transport import INSECURE_PREFACE
from tests.cli.runner import kvtool_json
from tests.cli.vfl.parties import finish, free_port, run_pair, start
from tests.relay import Relay

EPOCHS = ("--epochs", "2")


def _ok(*results) -> None:
    for result in results:
        assert result.code == 0, result.stderr


@pytest.fixture(scope="module")
def pipeline(tables: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """mpd -> split -> distill, each stage once in two processes and once in one."""
    folder = tmp_path_factory.mktemp("two_party")
    a_data = ["--active", tables["active_train"]]
    p_data = ["--passive", tables["passive_train"]]
    out = {
        name: folder / f"{name}.safetensors" for name in ("a_mpd", "p_mpd", "a_split", "p_split", "a_local")
    }
    results = {}
    results["mpd"] = run_pair(
        "pretrain-mpd", [*a_data, *EPOCHS, "--out", out["a_mpd"]], [*p_data, *EPOCHS, "--out", out["p_mpd"]]
    )
    trained = "--train-passive"  # the publisher's tower learns from gradients: the heavier protocol
    results["split"] = run_pair(
        "train-split",
        [*a_data, *EPOCHS, "--init", out["a_mpd"], trained, "--out", out["a_split"]],
        [*p_data, *EPOCHS, "--init", out["p_mpd"], trained, "--out", out["p_split"],
         "--record-received", folder / "received.parquet"],
    )  # fmt: skip
    results["distill"] = run_pair(
        "distill",
        [*a_data, *EPOCHS, "--teacher", out["a_split"], "--out", out["a_local"]],
        [*p_data, "--teacher", out["p_split"]],
    )
    for stage in results.values():
        _ok(*stage)
    both = {name: folder / f"both_{name}.safetensors" for name in ("mpd", "split", "local")}
    data = [*a_data, *p_data, *EPOCHS]
    single = {
        "mpd": kvtool_json("vfl", "pretrain-mpd", *data, "--out", both["mpd"], "--quiet"),
        "split": kvtool_json(
            "vfl",
            "train-split",
            *data,
            "--init",
            both["mpd"],
            "--train-passive",
            "--record-received",
            folder / "both_received.parquet",
            "--out",
            both["split"],
            "--quiet",
        ),
        "distill": kvtool_json(
            "vfl", "distill", *data, "--teacher", both["split"], "--out", both["local"], "--quiet"
        ),
    }
    out["received"], out["both_received"] = folder / "received.parquet", folder / "both_received.parquet"
    return {"out": out, "both": both, "two": {k: v[0].json() for k, v in results.items()},
            "passive": {k: v[1].json() for k, v in results.items()}, "single": single}  # fmt: skip


def test_two_processes_match_the_in_process_run(pipeline: dict) -> None:
    two, single = pipeline["two"], pipeline["single"]
    assert two["mpd"]["val_loss"] == pytest.approx(single["mpd"]["val_loss"], abs=1e-6)
    assert two["split"]["val_auc"] == pytest.approx(single["split"]["val_auc"], abs=1e-3)
    assert two["distill"]["val_auc"] == pytest.approx(single["distill"]["val_auc"], abs=1e-3)
    # each party wrote only its own part, and both parts carry the same run id
    a, p = (load_artifact(pipeline["out"][n], "vfl.split") for n in ("a_split", "p_split"))
    assert a.extra["party"] == "active" and p.extra["party"] == "passive"
    assert not any(k.startswith("tower_b") for k in a.tensors)
    assert set(k.split(".")[0] for k in p.tensors) == {"tower_b"}
    assert "passive" not in a.extra["schema"] and "active" not in p.extra["schema"]
    assert a.extra["run_id"] == p.extra["run_id"] == pipeline["passive"]["split"]["run_id"]
    assert a.extra["peer_sha256"] == p.sha256
    info = kvtool_json("info", pipeline["out"]["p_split"])
    assert info["party"] == "passive"


def test_the_publisher_records_what_it_received_and_audits_it(
    pipeline: dict, tables: dict[str, Path]
) -> None:
    out = pipeline["out"]
    assert pipeline["passive"]["split"]["record_received"] == str(out["received"])
    two, one = (pq.read_table(out[n]).sort_by("id") for n in ("received", "both_received"))
    assert two.column("id").to_pylist() == one.column("id").to_pylist()  # keyed by the publisher's ids
    assert two.column("gradients").to_pylist() == one.column("gradients").to_pylist()
    assert np.allclose(_vectors(two, "total"), _vectors(one, "total"), atol=1e-5)  # the same gradients
    bare = kvtool_json("vfl", "audit", out["received"])
    assert bare["rows_received"] == two.num_rows and bare["gradients_received"] > two.num_rows
    assert bare["concentration"] > 2 * bare["concentration_of_noise"]  # undefended: label-driven
    scored = kvtool_json("vfl", "audit", out["received"], "--labels", tables["active_train"])
    assert scored["attack_auc"]["accumulated"] >= 0.9 and "give the labels away" in scored["verdict"]


def _vectors(table: pa.Table, name: str) -> np.ndarray:
    return np.array(table.column(name).to_pylist(), dtype=np.float64)


def test_traffic_is_counted_and_near_the_floor(pipeline: dict) -> None:
    traffic = pipeline["two"]["split"]["traffic"]
    assert traffic["floor_bytes_per_row"] == 2 * 32 * 4 + 8
    assert (
        traffic["floor_bytes_per_row"]
        <= traffic["bytes_per_trained_row"]
        <= 1.2 * traffic["floor_bytes_per_row"]
    )
    wire = traffic["wire"]
    passive_wire = pipeline["passive"]["split"]["traffic"]
    assert (
        wire["bytes_sent"] == passive_wire["bytes_received"]
        and wire["bytes_received"] == passive_wire["bytes_sent"]
    )
    assert (
        wire["bytes_sent"] >= traffic["bytes_to_passive"]
        and wire["bytes_received"] >= traffic["bytes_to_active"]
    )
    assert traffic["bytes_per_trained_row_with_evaluation"] > traffic["bytes_per_trained_row"]
    assert all(e["rows_trained"] > 0 and e["eval_to_active"] > 0 for e in traffic["epochs"])


def test_federated_score_in_two_processes_matches(
    pipeline: dict, tables: dict[str, Path], tmp_path: Path
) -> None:
    out, relay = pipeline["out"], Relay()
    a, p = run_pair(
        "score",
        ["--mode", "federated", "--model", out["a_split"], "--active", tables["active_test"],
         "--fallback", out["a_local"], "--out", tmp_path / "two.csv"],
        ["--mode", "federated", "--model", out["p_split"], "--passive", tables["passive_test"]],
        relay=relay,
    )  # fmt: skip
    _ok(a, p)
    ids = {str(v) for path in (tables["active_test"], tables["passive_test"])
           for v in pacsv.read_csv(path)["id"].to_pylist()}  # fmt: skip
    for stream in relay.recorded.values():  # a listener on the path reads nothing
        data = bytes(stream)
        assert len(data) > 10_000 and b"nonce" not in data and b"score" not in data
        assert not any(i.encode() in data for i in ids if len(i) >= 5)
    single = kvtool_json(
        "vfl", "score", "--mode", "federated", "--model", pipeline["both"]["split"], "--active",
        tables["active_test"], "--passive", tables["passive_test"], "--fallback", pipeline["both"]["local"],
        "--out", tmp_path / "one.csv",
    )  # fmt: skip
    two = a.json()
    assert two["rows_federated"] == single["rows_federated"] > 0
    assert two["auc"] == pytest.approx(single["auc"], abs=1e-3)
    assert p.json()["rows_embedded"] == two["rows_federated"]
    assert not list(tmp_path.glob("*passive*"))  # the passive party writes nothing when it scores


def _frames(stream: bytes) -> list[bytes]:
    """The messages of one direction of an ``--insecure`` run: the preface, then length-prefixed frames."""
    assert stream.startswith(INSECURE_PREFACE)
    frames, at = [], len(INSECURE_PREFACE)
    while at + 8 <= len(stream):
        (size,) = struct.unpack(">Q", stream[at : at + 8])
        frames.append(stream[at + 8 : at + 8 + size])
        at += 8 + size
    assert at == len(stream), "the recorded stream does not split into frames"
    return frames


@pytest.fixture(scope="module")
def recorded(tables: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """One train-split through a recording relay in plaintext (--insecure) and one under TLS."""
    folder, runs = tmp_path_factory.mktemp("recorded"), {}
    for name, secure in (("plain", False), ("tls", True)):
        relay = Relay()
        a, p = run_pair(
            "train-split",
            ["--active", tables["active_train"], *EPOCHS, "--out", folder / f"{name}_a.safetensors"],
            ["--passive", tables["passive_train"], *EPOCHS, "--out", folder / f"{name}_p.safetensors"],
            secure=secure,
            relay=relay,
        )
        _ok(a, p)
        runs[name] = {"relay": relay, "active": a.json()}
    return runs


def test_plaintext_messages_carry_no_label_and_no_raw_feature(
    recorded: dict[str, dict], tables: dict[str, Path]
) -> None:
    """What crosses, read in the clear: embeddings, gradients, keys, PSI points; no label, no feature."""
    relay = recorded["plain"]["relay"]
    sent = {"active": _frames(bytes(relay.recorded["to_passive"])),
            "passive": _frames(bytes(relay.recorded["to_active"]))}  # fmt: skip
    passive = pacsv.read_csv(tables["passive_train"])
    active = pacsv.read_csv(tables["active_train"])
    blob = {party: b"".join(frames) for party, frames in sent.items()}
    for party, table in (("passive", passive), ("active", active)):
        numeric = [
            n for n in table.column_names if n not in ("id", "y") and pa.types.is_floating(table[n].type)
        ]
        for name in table.column_names:
            if name not in numeric and name not in ("y",):
                needles = [str(v).encode() for v in set(table[name].drop_null().to_pylist())]
                needles = [n for n in needles if len(n) >= 4][:200]
                assert not any(n in blob[party] for n in needles), f"a value of {party} column {name} crossed"
        # a row's features, as they would cross: consecutive values, in float32 or float64
        rows = np.stack([table[n].to_numpy(zero_copy_only=False) for n in numeric], axis=1)[:300]
        rows = rows[np.isfinite(rows).all(axis=1)]
        for dtype in (np.float32, np.float64):
            needles = [row[:2].astype(dtype).tobytes() for row in rows]
            assert not any(n in blob[party] for n in needles), (
                f"raw {party} features crossed as {dtype.__name__}"
            )
    handshake = b"".join(sent["active"][:2]).decode(errors="replace")
    assert '"nonce"' in handshake  # the first two messages are the handshake
    settings = handshake.replace("label_col", "").replace("label_epsilon", "")  # option names
    assert '"y"' not in handshake and "label" not in settings


def test_a_listener_under_tls_reads_nothing(recorded: dict[str, dict], tables: dict[str, Path]) -> None:
    """The same run under TLS: no handshake field, no id, no embedding a plaintext run sent."""
    plain, tls = recorded["plain"]["relay"], recorded["tls"]["relay"]
    assert recorded["tls"]["active"]["val_auc"] == pytest.approx(
        recorded["plain"]["active"]["val_auc"], abs=1e-6
    )
    frames = _frames(bytes(plain.recorded["to_active"]))
    embeddings = [f for f in frames[2:] if len(f) % (32 * 4) == 0 and len(f) >= 4096]  # rows x 32 floats
    assert embeddings, "no batch of embeddings in the plaintext run"
    needles = [embeddings[0][i : i + 16] for i in range(0, len(embeddings[0]), 512)]
    ids = {str(v) for path in (tables["active_train"], tables["passive_train"])
           for v in pacsv.read_csv(path)["id"].to_pylist()}  # fmt: skip
    for direction, stream in tls.recorded.items():
        data = bytes(stream)
        assert len(data) > 100_000 and not data.startswith(INSECURE_PREFACE)
        assert not any(n in data for n in needles), f"an embedding crossed in the clear ({direction})"
        for field in (b"nonce", b"protocol", b"shared", b"summary", b"train-split", b"id_col"):
            assert field not in data, f"handshake field {field!r} crossed in the clear ({direction})"
        assert not any(i.encode() in data for i in ids if len(i) >= 5), f"an id crossed ({direction})"
        assert len(zlib.compress(data)) > 0.99 * len(data)  # ciphertext: nothing to compress


def test_peer_killed_mid_epoch_then_both_resume(tables: dict[str, Path], tmp_path: Path) -> None:
    args = ("--epochs", "12", "--patience", "12", "--timeout", "10")
    a_out, p_out = tmp_path / "a.safetensors", tmp_path / "p.safetensors"
    active = ["--active", tables["active_train"], *args, "--out", a_out]
    passive = ["--passive", tables["passive_train"], *args, "--out", p_out]
    port = free_port()
    p = start("passive", "pretrain-mpd", passive, port)
    a = start("active", "pretrain-mpd", active, port)
    checkpoints = tmp_path / "p.safetensors.checkpoints"
    deadline = time.monotonic() + 60
    running = lambda: p.poll() is None  # noqa: E731
    while len(list(checkpoints.glob("*.safetensors"))) < 2 and time.monotonic() < deadline and running():
        time.sleep(0.02)
    assert p.poll() is None, "the passive party finished before it could be killed"
    p.send_signal(signal.SIGKILL)
    started = time.monotonic()
    survivor = finish(a, timeout=30)
    assert survivor.code == 1, survivor.stderr
    assert time.monotonic() - started < 12
    lines = [line for line in survivor.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "passive party stopped responding" in lines[0] and "--resume" in lines[0]
    assert not a_out.exists() and not p_out.exists()
    a2, p2 = run_pair("pretrain-mpd", [*active, "--resume"], [*passive, "--resume"])
    _ok(a2, p2)
    assert p2.json()["resumed_from"][1] >= 1
    single = kvtool_json(
        "vfl", "pretrain-mpd", "--active", tables["active_train"], "--passive", tables["passive_train"],
        "--epochs", "12", "--patience", "12", "--out", tmp_path / "one.safetensors", "--quiet",
    )  # fmt: skip
    assert a2.json()["val_loss"] == pytest.approx(single["val_loss"], abs=1e-6)  # as if never interrupted
    assert not (tmp_path / "a.safetensors.checkpoints").exists()


def test_mismatched_config_is_refused_on_both_sides(tables: dict[str, Path], tmp_path: Path) -> None:
    a, p = run_pair(
        "pretrain-mpd",
        ["--active", tables["active_train"], "--epochs", "3", "--out", tmp_path / "a.st"],
        ["--passive", tables["passive_train"], "--epochs", "5", "--out", tmp_path / "p.st"],
    )
    for result in (a, p):
        assert result.code == 2, result.stderr
        assert "disagree on --epochs" in result.stderr and result.stderr.count("\n") == 1


def test_wrong_secret_is_refused(tables: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "a.key").write_text("correct horse\n")
    (tmp_path / "p.key").write_text("battery staple\n")
    a, p = run_pair(
        "pretrain-mpd",
        ["--active", tables["active_train"], "--secret-file", tmp_path / "a.key", "--out", tmp_path / "a.st"],
        [
            "--passive",
            tables["passive_train"],
            "--secret-file",
            tmp_path / "p.key",
            "--out",
            tmp_path / "p.st",
        ],
    )
    for result in (a, p):
        assert result.code == 2 and "shared secrets (--secret-file) differ" in result.stderr
    assert b"correct horse" not in (tmp_path / "p.key").read_bytes()  # sanity: distinct secrets


def test_port_in_use_and_absent_peer_are_reported(tables: dict[str, Path], tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = finish(start("active", "pretrain-mpd", ["--active", tables["active_train"]], port), 60)
    assert result.code == 2 and f"port {port} is already in use" in result.stderr
    lonely = finish(
        start("active", "pretrain-mpd", ["--active", tables["active_train"], "--timeout", "2"], free_port()),
        60,
    )
    assert lonely.code == 1 and "did not connect" in lonely.stderr
