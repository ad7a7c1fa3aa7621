"""Both parties as separate ``kvtool`` processes over 127.0.0.1, end to end and under faults."""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
import torch

from kedit_vfl.artifacts import load_artifact
from tests.cli.runner import kvtool_json
from tests.cli.vfl.parties import finish, free_port, run_pair, start

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
    results["split"] = run_pair(
        "train-split",
        [*a_data, *EPOCHS, "--init", out["a_mpd"], "--out", out["a_split"]],
        [*p_data, *EPOCHS, "--init", out["p_mpd"], "--out", out["p_split"]],
    )
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
            "vfl", "train-split", *data, "--init", both["mpd"], "--out", both["split"], "--quiet"
        ),
        "distill": kvtool_json(
            "vfl", "distill", *data, "--teacher", both["split"], "--out", both["local"], "--quiet"
        ),
    }
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
    out = pipeline["out"]
    a, p = run_pair(
        "score",
        ["--mode", "federated", "--model", out["a_split"], "--active", tables["active_test"],
         "--fallback", out["a_local"], "--out", tmp_path / "two.csv"],
        ["--mode", "federated", "--model", out["p_split"], "--passive", tables["passive_test"]],
    )  # fmt: skip
    _ok(a, p)
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


def test_recorded_messages_carry_no_label_and_no_raw_feature(tables: dict[str, Path], tmp_path: Path) -> None:
    record = tmp_path / "record"
    a, p = run_pair(
        "train-split",
        ["--active", tables["active_train"], *EPOCHS, "--out", tmp_path / "a.safetensors"],
        ["--passive", tables["passive_train"], *EPOCHS, "--out", tmp_path / "p.safetensors"],
        env={"KVTOOL_RECORD_TRAFFIC": str(record)},
    )
    _ok(a, p)
    sent = {party: torch.load(next(record.glob(f"{party}-*.pt"))) for party in ("active", "passive")}
    kinds = {party: {m["what"] for m in messages} for party, messages in sent.items()}
    assert kinds["active"] <= {
        "handshake",
        "run details",
        "ids for alignment",
        "header",
        "row keys",
        "gradients",
        "gradients and row keys",
    }
    passive_kinds = {
        "handshake",
        "run details",
        "ids for alignment",
        "embeddings",
        "checkpoint saved",
        "result",
    }
    assert kinds["passive"] <= passive_kinds
    for m in sent["active"]:  # floats leave the active party only as gradients, a width per row
        if m["tensor"].is_floating_point():
            assert m["what"] == "gradients" and m["tensor"].numel() % 32 == 0
        if m["what"] == "gradients and row keys":  # raw bytes: float32 gradients, then int64 keys
            assert m["tensor"].dtype == torch.uint8 and m["tensor"].numel() % 8 == 0
    for m in sent["passive"]:
        if m["tensor"].is_floating_point():
            assert m["what"] == "embeddings" and m["tensor"].shape[1] == 32
    passive = pacsv.read_csv(tables["passive_train"])
    active = pacsv.read_csv(tables["active_train"])
    blob = {party: b"".join(m["tensor"].numpy().tobytes() for m in sent[party]) for party in sent}
    for party, table in (("passive", passive), ("active", active)):
        numeric = [
            n for n in table.column_names if n not in ("id", "y") and pa.types.is_floating(table[n].type)
        ]
        for name in table.column_names:
            if name not in numeric and name not in ("id", "y"):
                needles = [v.encode() for v in set(table[name].drop_null().to_pylist()) if len(v) >= 4][:50]
                assert not any(n in blob[party] for n in needles), f"a value of {party} column {name} crossed"
        # a row's features, as they would cross: consecutive values, in float32 or float64
        rows = np.stack([table[n].to_numpy(zero_copy_only=False) for n in numeric], axis=1)[:300]
        rows = rows[np.isfinite(rows).all(axis=1)]
        for dtype in (np.float32, np.float64):
            needles = [row[:2].astype(dtype).tobytes() for row in rows]
            assert not any(n in blob[party] for n in needles), (
                f"raw {party} features crossed as {dtype.__name__}"
            )
    details = [m for m in sent["active"] if m["what"] in ("handshake", "run details")]
    text = b"".join(m["tensor"].numpy().tobytes() for m in details).decode(errors="replace")
    assert '"y"' not in text and "label" not in text.replace("label_col", "")


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
    while len(list(checkpoints.glob("*.pt"))) < 2 and time.monotonic() < deadline and p.poll() is None:
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
