"""Bad input: one clear line on stderr, exit code 2, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cli.runner import kvtool


@pytest.fixture(autouse=True)
def _no_tracebacks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KVTOOL_DEBUG")


def _fails(args: list, expected: str, out: Path) -> None:
    result = kvtool("vfl", *args, "--out", out, "--quiet")
    assert result.exit_code == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert expected in lines[0], lines[0]
    assert result.stdout == ""
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))


def _csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


PASSIVE = "id,p\n1,0.5\n2,0.1\n3,0.7\n4,0.2\n"


@pytest.mark.parametrize(
    ("active", "passive", "extra", "expected"),
    [
        ("id,y,x\n1,0,1\n2,1,2\n3,0,3\n4,1,4\n", None, ["--id-col", "uid"], "no id column 'uid'"),
        ("id,y,x\n1,0,1\n2,1,2\n3,0,3\n4,1,4\n", None, ["--label-col", "click"], "no label column 'click'"),
        ("id,y,x\n1,0,1\n2,1,2\n1,0,3\n4,1,4\n", None, [], "duplicate ids in column 'id': '1'"),
        ("id,y,x\n1,0,1\n2,1,2\n3,0,3\n4,1,4\n", "id,p\n7,1\n8,2\n", [], "no id appears in both tables"),
        ("id,y,x\n1,0,1\n2,3,2\n3,0,3\n4,1,4\n", None, [], "must hold 0, 1 or nothing; found 3"),
        ("id,y,x\n1,0,1\n2,1,2\n3,0,3\n4,1,4\n5,0,oops\n", None, [], "non-numeric text 'oops' (ids 5)"),
        ("id,y,x\n", None, [], "the active table is empty"),
    ],
    ids=["id-col", "label-col", "duplicate-ids", "no-overlap", "bad-label", "text-in-numeric", "empty"],
)
def test_bad_tables(tmp_path: Path, active: str, passive: str | None, extra: list, expected: str) -> None:
    a = _csv(tmp_path / "a.csv", active)
    b = _csv(tmp_path / "b.csv", passive or PASSIVE)
    _fails(
        ["train-split", "--active", a, "--passive", b, *extra],
        expected,
        tmp_path / "out" / "split.safetensors",
    )


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    b = _csv(tmp_path / "b.csv", PASSIVE)
    out = tmp_path / "mpd.safetensors"
    _fails(["pretrain-mpd", "--active", tmp_path / "nope.csv", "--passive", b], "nope.csv: no such file", out)
    garbage = tmp_path / "g.parquet"
    garbage.write_bytes(b"\x00\x01 not parquet at all")
    _fails(
        ["pretrain-mpd", "--active", garbage, "--passive", b], "cannot read this active table as parquet", out
    )


def test_wrong_artifact_kind(trained: dict[str, Path], tables: dict[str, Path], tmp_path: Path) -> None:
    _fails(
        ["score", "--model", trained["mpd"], "--active", tables["active_test"]],
        "expected a vfl.local or vfl.split artifact, got vfl.mpd",
        tmp_path / "s.csv",
    )
    _fails(
        ["score", "--model", trained["local"], "--mode", "federated", "--active", tables["active_test"],
         "--passive", tables["passive_test"]],
        "expected a vfl.split artifact, got vfl.local",
        tmp_path / "s.csv",
    )  # fmt: skip
    _fails(
        [
            "distill",
            "--teacher",
            trained["mpd"],
            "--active",
            tables["active_train"],
            "--passive",
            tables["passive_train"],
        ],
        "expected a vfl.split artifact, got vfl.mpd",
        tmp_path / "l.safetensors",
    )


def test_schema_mismatch(trained: dict[str, Path], tmp_path: Path) -> None:
    other = _csv(tmp_path / "o.csv", "id,y,x0,x1\n1,0,1,2\n2,1,3,4\n")
    _fails(
        ["score", "--model", trained["local"], "--active", other],
        "does not match the model's feature schema: missing column(s) a_num0",
        tmp_path / "s.csv",
    )


def test_text_where_the_model_expects_numbers(
    trained: dict[str, Path], tables: dict[str, Path], tmp_path: Path
) -> None:
    lines = tables["active_test"].read_text().splitlines()
    cells = lines[1].split(",")
    cells[2] = "n/a!"  # a_num0 of the first row
    bad = _csv(tmp_path / "bad.csv", "\n".join([lines[0], ",".join(cells), *lines[2:]]) + "\n")
    _fails(
        ["score", "--model", trained["local"], "--active", bad], "numeric column 'a_num0'", tmp_path / "s.csv"
    )


def test_truncated_and_tampered_artifacts(
    trained: dict[str, Path], tables: dict[str, Path], tmp_path: Path
) -> None:
    raw = trained["local"].read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(raw[: len(raw) // 2])
    _fails(
        ["score", "--model", truncated, "--active", tables["active_test"]],
        "damaged or truncated",
        tmp_path / "s.csv",
    )
    tampered = tmp_path / "tampered.safetensors"
    flipped = bytearray(raw)
    flipped[-3] ^= 0x55
    tampered.write_bytes(bytes(flipped))
    _fails(["score", "--model", tampered, "--active", tables["active_test"]], "checksum", tmp_path / "s.csv")


def test_a_failed_run_keeps_the_previous_artifact(trained: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "split.safetensors"
    out.write_bytes(trained["split"].read_bytes())
    other = _csv(tmp_path / "o.csv", "id,y,x0\n1,0,1\n2,1,3\n")
    result = kvtool("vfl", "train-split", "--active", other, "--passive", _csv(tmp_path / "b.csv", PASSIVE),
                    "--init", trained["mpd"], "--out", out, "--quiet")  # fmt: skip
    assert result.exit_code == 2 and "feature schema" in result.stderr
    assert out.read_bytes() == trained["split"].read_bytes()


def test_federated_mode_needs_the_passive_table(
    trained: dict[str, Path], tables: dict[str, Path], tmp_path: Path
) -> None:
    _fails(
        ["score", "--model", trained["split"], "--mode", "federated", "--active", tables["active_test"]],
        "--mode federated needs --passive",
        tmp_path / "s.csv",
    )


def test_bad_options() -> None:
    result = kvtool("vfl", "score", "--mode", "sideways")
    assert result.exit_code == 2 and "--mode sideways: expected local or federated" in result.stderr
    result = kvtool("vfl", "pretrain-mpd", "--negatives", "600", "--batch-size", "512")
    assert result.exit_code == 2 and "must be smaller than --batch-size" in result.stderr
    result = kvtool("vfl", "distill", "--kd-weight", "1.5")
    assert result.exit_code == 2 and "--kd-weight 1.5" in result.stderr
    result = kvtool("vfl", "make-demo", "--rows", "10")
    assert result.exit_code == 2 and "--rows 10: need at least 50 rows" in result.stderr
    result = kvtool("vfl", "train-split", "--self-train-weight", "-1")
    assert result.exit_code == 2 and "--self-train-weight must not be negative" in result.stderr


def _first(mapping: dict) -> str:
    return next(iter(mapping))


def _tower_a(tensors: dict) -> str:
    return next(name for name in tensors if name.startswith("tower_a."))


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda a: a.extra.pop("schema"), "no feature schema per party"),
        (lambda a: a.extra["schema"]["active"].update(numeric=5), "schema.active.numeric: expected list"),
        (lambda a: a.extra["schema"]["active"].update(mean=[]), "schema.active: lists of unequal length"),
        (lambda a: a.extra.pop("model"), "'model' is not a JSON object"),
        (lambda a: a.extra["model"].update(bogus=1), "'model' has unknown fields ['bogus']"),
        (lambda a: a.extra["model"].update(hidden="big"), "model.hidden: expected int, got str"),
        (lambda a: a.extra["model"].update(hidden=0), "'model': --hidden must be a positive integer"),
        (lambda a: a.extra.update(party=["x"]), "malformed (party"),
        (lambda a: a.tensors.pop(_first(a.tensors)), "do not fit the model its config describes"),
    ],
)
def test_inconsistent_metadata_with_a_valid_checksum(
    trained: dict[str, Path], tables: dict[str, Path], tmp_path: Path, change, expected: str
) -> None:
    """A file crafted with a recomputed checksum: one line naming the file and the field."""
    from kedit_vfl.artifacts import load_artifact, save_artifact

    artifact = load_artifact(trained["local"])
    change(artifact)
    crafted = tmp_path / "crafted.safetensors"
    save_artifact(artifact, crafted)
    _fails(["score", "--model", crafted, "--active", tables["active_test"]], expected, tmp_path / "s.csv")
    _fails(["export", "--model", crafted], expected, tmp_path / "x.onnx")


@pytest.mark.parametrize(
    ("kind", "command", "change", "expected"),
    [
        ("mpd", "train-split", lambda a: a.config.update(negatives="many"), "matching head settings"),
        ("mpd", "train-split", lambda a: a.config.update(objective="other"), "matching head settings"),
        ("mpd", "train-split", lambda a: a.tensors.pop(_tower_a(a.tensors)), "do not fit the model"),
        ("split", "distill", lambda a: a.extra.update(protection={"clip": "x"}), "protection.clip"),
    ],
)
def test_inconsistent_parent_artifacts(
    trained: dict[str, Path],
    tables: dict[str, Path],
    tmp_path: Path,
    kind: str,
    command: str,
    change,
    expected: str,
) -> None:
    from kedit_vfl.artifacts import load_artifact, save_artifact

    artifact = load_artifact(trained[kind])
    change(artifact)
    crafted = tmp_path / "crafted.safetensors"
    save_artifact(artifact, crafted)
    option = "--init" if command == "train-split" else "--teacher"
    data = ["--active", tables["active_train"], "--passive", tables["passive_train"], "--epochs", "1"]
    _fails([command, *data, option, crafted], f"{crafted}: ", tmp_path / "out.safetensors")
    _fails([command, *data, option, crafted], expected, tmp_path / "out.safetensors")
