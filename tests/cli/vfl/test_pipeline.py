from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kedit_vfl.artifacts import load_artifact
from tests.cli.runner import kvtool, kvtool_json
from tests.cli.vfl.conftest import FAST


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_chain_writes_each_kind_with_schema_and_parents(trained: dict[str, Path]) -> None:
    mpd = load_artifact(trained["mpd"], "vfl.mpd")
    split = load_artifact(trained["split"], "vfl.split")
    local = load_artifact(trained["local"], "vfl.local")
    assert split.provenance["parents"][0]["sha256"] == mpd.sha256
    assert local.provenance["parents"][0]["sha256"] == split.sha256
    assert split.extra["schema"]["active"] == mpd.extra["schema"]["active"]
    assert "ad_category" in local.extra["schema"]["active"]["categorical"]
    assert not any(name.startswith("tower_b") for name in local.tensors)  # the student is active-only


def test_score_local_and_federated_report_fallback_rows(
    tables: dict[str, Path], trained: dict[str, Path], tmp_path: Path
) -> None:
    local = kvtool_json(
        "vfl",
        "score",
        "--model",
        trained["local"],
        "--active",
        tables["active_test"],
        "--out",
        tmp_path / "l.csv",
    )
    assert local["rows"] == local["rows_labelled"] > 100 and local["rows_federated"] == 0
    assert 0.5 < local["auc"] <= 1 and local["logloss"] > 0
    fed = kvtool_json(
        "vfl", "score", "--model", trained["split"], "--mode", "federated", "--active", tables["active_test"],
        "--passive", tables["passive_test"], "--fallback", trained["local"], "--out", tmp_path / "f.csv",
    )  # fmt: skip
    assert fed["rows_federated"] + fed["rows_local_fallback"] == fed["rows"] == local["rows"]
    assert 0 < fed["rows_federated"] < fed["rows"]
    rows = _rows(tmp_path / "f.csv")
    assert list(rows[0]) == ["id", "score", "mode_used"] and len(rows) == fed["rows"]
    assert sum(r["mode_used"] == "federated" for r in rows) == fed["rows_federated"]
    # fallback rows get exactly the student's local score
    local_scores = {r["id"]: float(r["score"]) for r in _rows(tmp_path / "l.csv")}
    fallback = [r for r in rows if r["mode_used"] == "local"]
    assert all(abs(float(r["score"]) - local_scores[r["id"]]) < 1e-6 for r in fallback)


def test_score_without_labels_and_split_local_branch(
    tables: dict[str, Path], trained: dict[str, Path], tmp_path: Path
) -> None:
    unlabelled = tmp_path / "u.csv"
    lines = (tables["active_test"]).read_text().splitlines()
    header = lines[0].split(",")
    keep = [i for i, name in enumerate(header) if name != '"y"']
    unlabelled.write_text("\n".join(",".join(line.split(",")[i] for i in keep) for line in lines) + "\n")
    result = kvtool_json(
        "vfl", "score", "--model", trained["split"], "--active", unlabelled, "--out", tmp_path / "s.csv"
    )
    assert (
        result["auc"] is None
        and result["rows_labelled"] == 0
        and result["local_scorer"] == "split local branch"
    )


def test_bare_commands_chain_on_the_embedded_data(tmp_path: Path) -> None:
    for step in (
        ("pretrain-mpd", "--epochs", "1"),
        ("train-split", "--init", tmp_path / "runs/vfl/mpd.safetensors", "--epochs", "1"),
        ("distill", "--epochs", "1"),
    ):
        result = kvtool("vfl", *step, "--quiet")
        assert result.exit_code == 0, result.stderr
    local = kvtool_json("vfl", "score", "--mode", "local")
    fed = kvtool_json("vfl", "score", "--mode", "federated")
    assert local["rows"] == fed["rows"] > 1000 and fed["rows_local_fallback"] > 0
    assert "local.safetensors" in fed["local_scorer"]  # the sibling student distilled from this split
    assert (tmp_path / "runs/vfl/scores_local.csv").is_file() and (
        tmp_path / "runs/vfl/scores_federated.csv"
    ).is_file()


def test_runs_are_reproducible_with_a_seed(tables: dict[str, Path], tmp_path: Path) -> None:
    data = ("--active", tables["active_train"], "--passive", tables["passive_train"])
    first = kvtool_json(
        "vfl", "train-split", *data, "--seed", "5", "--out", tmp_path / "a.safetensors", *FAST
    )
    second = kvtool_json(
        "vfl", "train-split", *data, "--seed", "5", "--out", tmp_path / "b.safetensors", *FAST
    )
    a, b = load_artifact(tmp_path / "a.safetensors"), load_artifact(tmp_path / "b.safetensors")
    assert first["val_auc"] == second["val_auc"]
    assert all((a.tensors[k] == b.tensors[k]).all() for k in a.tensors)


def test_make_demo_and_help(tmp_path: Path) -> None:
    result = kvtool_json("vfl", "make-demo", "--rows", "300", "--seed", "2", "--out", tmp_path / "d")
    assert result["rows/active_train.csv"] + result["rows/active_test.csv"] == 300
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [
        "active_test.csv", "active_train.csv", "passive_test.csv", "passive_train.csv",
    ]  # fmt: skip
    for command in ("make-demo", "pretrain-mpd", "train-split", "distill", "score", None):
        help_text = kvtool("vfl", *([command] if command else []), "--help")
        assert help_text.exit_code == 0 and "Example:" in help_text.stdout


def test_table_output_without_json(trained: dict[str, Path], tables: dict[str, Path], tmp_path: Path) -> None:
    result = kvtool("vfl", "score", "--model", trained["local"], "--active", tables["active_test"],
                    "--out", tmp_path / "s.csv")  # fmt: skip
    assert result.exit_code == 0 and "rows_federated" in result.stdout
    json.loads(kvtool("vfl", "make-demo", "--rows", "100", "--out", tmp_path / "x", "--json").stdout)


def test_train_split_self_training_round_is_on_by_default(
    tables: dict[str, Path], trained: dict[str, Path], tmp_path: Path
) -> None:
    data = (
        "--active",
        tables["active_train"],
        "--passive",
        tables["passive_train"],
        "--init",
        trained["mpd"],
    )
    split = load_artifact(trained["split"], "vfl.split")  # trained with the defaults
    metrics = split.extra["metrics"]
    assert metrics["self_train_rows"] > 1.5 * metrics["rows_labelled_train_overlapped"]
    off = kvtool_json(
        "vfl", "train-split", *data, "--self-train-weight", "0", "--out", tmp_path / "s.safetensors", *FAST
    )
    assert off["self_train_rows"] == 0
    assert load_artifact(tmp_path / "s.safetensors", "vfl.split").config["self_train_weight"] == 0.0


def test_score_streams_batch_by_batch_with_the_scores_of_one_batch(
    tables: dict[str, Path], trained: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Parquet shards read in small batches (dictionary-encoded categories, overlap spread
    over many batches) score exactly as one CSV batch does, in both modes."""
    from kedit_vfl.vfl.config import ScoreConfig
    from kedit_vfl.vfl.data import read as data_module
    from kedit_vfl.vfl.serving.score import score

    shards = tmp_path / "shards"
    shards.mkdir()
    whole = data_module.read_table(tables["active_test"])  # as kvtool reads it: empty fields missing
    for i, start in enumerate(range(0, whole.num_rows, 150)):
        pq.write_table(whole.slice(start, 150), shards / f"part-{i}.parquet", row_group_size=64)
    runs = {}
    for name, active, batch_rows in (("one", tables["active_test"], 1 << 18), ("many", shards, 37)):
        monkeypatch.setattr(data_module, "BATCH_ROWS", batch_rows)
        for mode, model in (("local", trained["local"]), ("federated", trained["split"])):
            out = tmp_path / f"{name}_{mode}.parquet"
            result = score(ScoreConfig(model=model, active=active, passive=tables["passive_test"], mode=mode,
                                       fallback=trained["local"], out=out, device="cpu"))  # fmt: skip
            runs[name, mode] = (result, pq.read_table(out))
    for mode in ("local", "federated"):
        (one, one_table), (many, many_table) = runs["one", mode], runs["many", mode]
        assert many_table["id"].equals(one_table["id"]), mode
        assert many_table["mode_used"].equals(one_table["mode_used"]), mode
        diff = np.abs(many_table["score"].to_numpy() - one_table["score"].to_numpy()).max()
        assert diff < 1e-6, (mode, diff)  # float32 rounding differs with the slice size
        assert {k: many[k] for k in ("rows", "rows_federated", "auc")} == {
            k: one[k] for k in ("rows", "rows_federated", "auc")
        }
    assert 0 < runs["many", "federated"][0]["rows_federated"] < whole.num_rows


def test_local_scoring_never_imports_pandas(
    tables: dict[str, Path], trained: dict[str, Path], tmp_path: Path
) -> None:
    """pyarrow's own conversions import pandas (0.3 s) to look for pandas inputs; scoring
    goes through kedit_vfl.vfl.data.arrays instead, for CSV and for Parquet (dictionary-encoded
    categories), missing values and labels included."""
    from kedit_vfl.vfl.data import read as data_module

    parquet = tmp_path / "active.parquet"
    pq.write_table(data_module.read_table(tables["active_test"]), parquet)
    for active, out in ((tables["active_test"], "scores.csv"), (parquet, "scores.parquet")):
        argv = ["kvtool", "vfl", "score", "--model", str(trained["local"]), "--active", str(active),
                "--out", str(tmp_path / out), "--quiet"]  # fmt: skip
        script = f"import sys; from kedit_vfl import launch; sys.argv = {argv!r}\n"
        script += "status = launch.run(); print(status, 'pandas' in sys.modules)"
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
        assert done.stdout.split()[-2:] == ["0", "False"], done.stderr
        assert (tmp_path / out).is_file()


def test_scoring_keeps_repeated_ids_the_publisher_must_not_repeat_them(
    tables: dict[str, Path], trained: dict[str, Path], tmp_path: Path
) -> None:
    publisher = {r["id"] for r in _rows(tables["passive_test"])}

    def doubled(source: Path, name: str) -> Path:  # 3 rows the publisher holds, 2 it lacks; 2 repeated
        rows = [r for r in _rows(source) if r["id"] in publisher][:3]
        rows += [r for r in _rows(source) if r["id"] not in publisher][:2]
        path = tmp_path / name
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows + rows[:2])
        return path

    active = doubled(tables["active_test"], "active.csv")
    ids = [r["id"] for r in _rows(active)]
    for mode, model in (("local", trained["local"]), ("federated", trained["split"])):
        out = tmp_path / f"{mode}.csv"
        result = kvtool_json("vfl", "score", "--model", model, "--mode", mode, "--active", active,
                             "--passive", tables["passive_test"], "--out", out)  # fmt: skip
        scored = _rows(out)
        assert result["rows"] == 7 and [r["id"] for r in scored] == ids
        for copy, first in ((5, 0), (6, 1)):  # each copy scores the same (up to float32 rounding:
            # a matrix product's rows may take different kernels by their place in the batch)
            assert scored[copy]["mode_used"] == scored[first]["mode_used"]
            assert float(scored[copy]["score"]) == pytest.approx(float(scored[first]["score"]), abs=1e-6)
        assert result["rows_federated"] == (5 if mode == "federated" else 0)
    passive = doubled(tables["passive_test"], "passive.csv")
    result = kvtool("vfl", "score", "--model", trained["split"], "--mode", "federated", "--active", active,
                    "--passive", passive, "--out", tmp_path / "f.csv", "--quiet")  # fmt: skip
    assert result.exit_code == 2 and "duplicate ids in column 'id'" in result.stderr
    assert not (tmp_path / "f.csv").exists()


def test_a_bad_value_in_a_late_batch_stops_scoring_and_leaves_no_output(
    tables: dict[str, Path], trained: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kedit_vfl.vfl.data import read as data_module

    table = data_module.read_table(tables["active_test"])
    text = table["a_num0"].cast(pa.string()).to_pylist()
    text[-3] = "oops"  # in the last of many batches
    bad = table.set_column(table.schema.get_field_index("a_num0"), "a_num0", pa.array(text, pa.string()))
    pq.write_table(bad, tmp_path / "bad.parquet", row_group_size=40)
    monkeypatch.setattr(data_module, "BATCH_ROWS", 40)
    out = tmp_path / "scores.parquet"
    result = kvtool("vfl", "score", "--model", trained["local"], "--active", tmp_path / "bad.parquet",
                    "--out", out, "--quiet")  # fmt: skip
    assert result.exit_code == 2 and "numeric column 'a_num0' holds non-numeric text 'oops'" in result.stderr
    assert not out.exists() and not list(tmp_path.glob(".scores.parquet*"))


def test_scores_stream_to_stdout_for_a_pipeline(
    tables: dict[str, Path], trained: dict[str, Path], tmp_path: Path
) -> None:
    """`kvtool vfl score --out - | ...`: CSV or JSON Lines on stdout, the summary on stderr;
    a reader that stops early ends it quietly with status 0 under pipefail."""
    kvtool_bin = str(Path(sys.executable).parent / "kvtool")
    base = [
        kvtool_bin,
        "vfl",
        "score",
        "--model",
        str(trained["local"]),
        "--active",
        str(tables["active_test"]),
    ]
    done = subprocess.run([*base, "--out", "-", "--quiet"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    kvtool("vfl", "score", "--model", trained["local"], "--active", tables["active_test"],
           "--out", tmp_path / "s.csv", "--quiet")  # fmt: skip
    assert done.stdout == (tmp_path / "s.csv").read_text()  # the same bytes as the file
    assert "score (local mode)" in done.stderr
    lines = subprocess.run([*base, "--out", "-", "--json-lines", "--json"], capture_output=True, text=True)
    rows = [json.loads(line) for line in lines.stdout.splitlines()]
    assert len(rows) == len(_rows(tmp_path / "s.csv")) and set(rows[0]) == {"id", "score", "mode_used"}
    assert json.loads(lines.stderr[lines.stderr.index("{") :])["rows"] == len(rows)
    shell = "set -o pipefail; " + " ".join(base) + " --out - --quiet 2>/dev/null | head -n 2"
    piped = subprocess.run(["bash", "-c", shell], capture_output=True, text=True)
    assert piped.returncode == 0 and len(piped.stdout.splitlines()) == 2
    wrong = kvtool("vfl", "score", "--model", trained["local"], "--json-lines", "--out", tmp_path / "x.csv")
    assert wrong.exit_code == 2 and "--json-lines is for --out -" in wrong.stderr


def test_train_local_is_the_advertisers_own_model(tables: dict[str, Path], tmp_path: Path) -> None:
    """No partner at all: a vfl.local model from the active table alone, scored like any other."""
    out = tmp_path / "own.safetensors"
    trained = kvtool_json("vfl", "train-local", "--active", tables["active_train"], *FAST, "--out", out)
    assert trained["kind"] == "vfl.local" and trained["rows_with_teacher_federated"] == 0
    artifact = load_artifact(out, "vfl.local")
    assert artifact.provenance["command"] == "vfl train-local" and not artifact.provenance["parents"]
    assert "passive" not in artifact.extra["schema"]
    scored = kvtool_json(
        "vfl", "score", "--model", out, "--active", tables["active_test"], "--out", tmp_path / "s.csv"
    )
    assert scored["local_scorer"] == "student" and 0.5 < scored["auc"] <= 1


def test_vanilla_vfl_never_scores_with_its_untrained_local_branch(
    tables: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`train-split --aux-weight 0` trains no local branch: rows the publisher lacks need
    --fallback (for example the advertiser's own model), and local mode refuses it."""
    monkeypatch.delenv("KVTOOL_DEBUG")
    data = ["--active", tables["active_train"], "--passive", tables["passive_train"], *FAST]
    vanilla, own = tmp_path / "vanilla.safetensors", tmp_path / "own.safetensors"
    assert kvtool("vfl", "train-split", *data, "--aux-weight", "0", "--self-train-weight", "0",
                  "--out", vanilla).exit_code == 0  # fmt: skip
    test = [
        "--active",
        tables["active_test"],
        "--passive",
        tables["passive_test"],
        "--out",
        tmp_path / "s.csv",
    ]
    refused = kvtool("vfl", "score", "--mode", "federated", "--model", vanilla, *test)
    assert refused.exit_code == 2 and "local branch was never trained" in refused.stderr
    assert "--fallback" in refused.stderr and not (tmp_path / "s.csv").exists()
    local = kvtool("vfl", "score", "--model", vanilla, "--active", tables["active_test"])
    assert local.exit_code == 2 and "vfl.local model instead" in local.stderr
    assert (
        kvtool("vfl", "train-local", "--active", tables["active_train"], *FAST, "--out", own).exit_code == 0
    )
    scored = kvtool_json("vfl", "score", "--mode", "federated", "--model", vanilla, *test, "--fallback", own)
    assert scored["rows_local_fallback"] > 0 and scored["local_scorer"].startswith("student")
