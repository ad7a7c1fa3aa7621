"""Align privately, then train and score with the alignment: no id crosses, results match."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pyarrow.csv as pacsv
import pytest

from tests.cli.runner import kvtool_json
from tests.cli.vfl.parties import KVTOOL, finish, free_port, run_pair, security_args
from tests.relay import Relay

EPOCHS = ("--epochs", "2")


def _ok(*results) -> None:
    for result in results:
        assert result.code == 0, result.stderr


def _align(active: Path, passive: Path, folder: Path, name: str) -> tuple[Path, Path]:
    """Both parties' files of one ``kvtool vfl align`` run."""
    a_out, p_out = folder / f"{name}_a.safetensors", folder / f"{name}_p.safetensors"
    port = free_port()
    procs = [_start_align("passive", passive, p_out, port), _start_align("active", active, a_out, port)]
    _ok(*(finish(p, 120) for p in procs))
    return a_out, p_out


def _start_align(party: str, table: Path, out: Path, port: int) -> subprocess.Popen:
    argv = [KVTOOL, "vfl", "align", "--party", party, "--rendezvous", f"tcp://127.0.0.1:{port}",
            "--table", str(table), "--out", str(out), "--quiet", "--json", *security_args(party)]  # fmt: skip
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_aligned_training_and_scoring_send_no_id_and_match_in_process(
    tables: dict[str, Path], tmp_path: Path
) -> None:
    train_a, train_p = _align(tables["active_train"], tables["passive_train"], tmp_path, "train")
    relay = Relay()
    a_split, p_split = tmp_path / "a_split.safetensors", tmp_path / "p_split.safetensors"
    a, p = run_pair(
        "train-split",
        ["--active", tables["active_train"], "--alignment", train_a, *EPOCHS, "--out", a_split],
        ["--passive", tables["passive_train"], "--alignment", train_p, *EPOCHS, "--out", p_split],
        relay=relay,
    )
    _ok(a, p)
    single = kvtool_json(
        "vfl", "train-split", "--active", tables["active_train"], "--passive", tables["passive_train"],
        *EPOCHS, "--out", tmp_path / "one.safetensors", "--quiet",
    )  # fmt: skip
    assert a.json()["val_auc"] == pytest.approx(single["val_auc"], abs=1e-3)
    assert a.json()["rows_overlapped"] == single["rows_overlapped"]

    blob = bytes(relay.recorded["to_active"] + relay.recorded["to_passive"])
    assert len(blob) > 100_000
    ids = set()
    for path in (tables["active_train"], tables["passive_train"]):
        ids |= {str(v) for v in pacsv.read_csv(path)["id"].to_pylist()}
    for value in ids:
        raw = value.encode()
        assert raw not in blob, f"id {value} crossed"
        for digest in (hashlib.sha256(raw).digest(), hashlib.md5(raw).digest(), hashlib.sha1(raw).digest()):
            assert digest[:8] not in blob

    test_a, test_p = _align(tables["active_test"], tables["passive_test"], tmp_path, "test")
    a, p = run_pair(
        "score",
        ["--mode", "federated", "--model", a_split, "--active", tables["active_test"], "--alignment", test_a,
         "--out", tmp_path / "two.csv"],
        ["--mode", "federated", "--model", p_split, "--passive", tables["passive_test"],
         "--alignment", test_p],
    )  # fmt: skip
    _ok(a, p)
    one = kvtool_json(
        "vfl", "score", "--mode", "federated", "--model", tmp_path / "one.safetensors", "--active",
        tables["active_test"], "--passive", tables["passive_test"], "--out", tmp_path / "one.csv",
    )  # fmt: skip
    assert a.json()["rows_federated"] == one["rows_federated"] > 0
    assert a.json()["auc"] == pytest.approx(one["auc"], abs=1e-3)


def test_alignments_of_different_runs_are_refused(tables: dict[str, Path], tmp_path: Path) -> None:
    first_a, _ = _align(tables["active_train"], tables["passive_train"], tmp_path, "one")
    _, second_p = _align(tables["active_train"], tables["passive_train"], tmp_path, "two")
    a, p = run_pair(
        "pretrain-mpd",
        ["--active", tables["active_train"], "--alignment", first_a, "--out", tmp_path / "a.st"],
        ["--passive", tables["passive_train"], "--alignment", second_p, "--out", tmp_path / "p.st"],
    )
    for result in (a, p):
        assert result.code == 2 and "alignments differ" in result.stderr, result.stderr
