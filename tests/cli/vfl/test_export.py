"""``kvtool vfl export``: the ONNX graph scores as ``kvtool vfl score`` does; failures leave nothing."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.csv as pacsv
import pytest

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from kedit_vfl.artifacts import file_sha256  # noqa: E402
from kedit_vfl.vfl.data.read import read_table  # noqa: E402
from kedit_vfl.vfl.data.schema import PartySchema  # noqa: E402
from kedit_vfl.vfl.models.store import schemas_of  # noqa: E402
from kedit_vfl.vfl.serving import export as export_module  # noqa: E402
from kedit_vfl.vfl.serving.export import encode_for_onnx  # noqa: E402
from tests.cli.runner import kvtool, kvtool_json  # noqa: E402


def _onnx_scores(graph: Path, table_path: Path) -> tuple[list[str], np.ndarray]:
    """Score a CSV table the way a serving system would: sidecar -> inputs -> onnxruntime."""
    sidecar = json.loads(Path(f"{graph}.json").read_text())
    columns = {i["name"]: i["columns"] for i in sidecar["inputs"]}
    categorical = columns.get("categorical", [])
    schema = PartySchema(
        numeric=columns.get("numeric", []),
        categorical=categorical,
        vocab=[sidecar["vocabularies"][c] for c in categorical],
    )
    table = read_table(table_path)  # as kvtool reads it: an empty cell is missing
    numeric, categorical = encode_for_onnx(table, schema, table_path)
    feeds = {"numeric": numeric, "categorical": categorical}
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    (score,) = session.run(["score"], {i["name"]: feeds[i["name"]] for i in sidecar["inputs"]})
    return table["id"].to_pylist(), score


def _kvtool_scores(model: Path, table_path: Path, out: Path) -> dict[str, float]:
    kvtool_json("vfl", "score", "--model", model, "--active", table_path, "--mode", "local", "--out", out)
    scores = pacsv.read_csv(out)
    return dict(zip(scores["id"].to_pylist(), scores["score"].to_pylist(), strict=True))


@pytest.mark.parametrize("name", ["local", "split"])
def test_export_scores_as_kvtool_score_does(
    name: str, trained: dict[str, Path], tables: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "serving" / f"{name}.onnx"
    result = kvtool_json(
        "vfl",
        "export",
        "--model",
        trained[name],
        "--format",
        "onnx",
        "--out",
        out,
        "--table",
        tables["active_test"],
    )
    assert result["out"] == str(out) and Path(result["sidecar"]) == Path(f"{out}.json")
    assert result["model_kind"] == f"vfl.{name}"
    assert result["inputs"] == ["numeric", "categorical"] and result["opset"] == 17
    assert result["max_abs_diff"] < 1e-5 and result["rows_from_table"] > 100

    sidecar = json.loads(Path(result["sidecar"]).read_text())
    schema = schemas_of(export_module.load_artifact(trained[name]))["active"]
    assert sidecar["artifact"]["sha256"] == file_sha256(trained[name])
    assert [i["columns"] for i in sidecar["inputs"]] == [schema.numeric, schema.categorical]
    assert sidecar["vocabularies"] == dict(zip(schema.categorical, schema.vocab, strict=True))
    assert sidecar["categorical_index"]["unseen"] == 0 and sidecar["categorical_index"]["missing"] == 1
    assert sidecar["kvtool_version"] and sidecar["opset"] == 17

    ids, onnx_scores = _onnx_scores(out, tables["active_test"])
    expected = _kvtool_scores(trained[name], tables["active_test"], tmp_path / "scores.csv")
    assert len(ids) == len(expected)
    diff = np.abs(onnx_scores - np.array([expected[i] for i in ids]))
    assert diff.max() < 1e-5


def test_default_verification_uses_the_demo_table_and_synthetic_rows(trained: dict[str, Path]) -> None:
    result = kvtool_json("vfl", "export", "--model", trained["local"], "--verify-rows", "50", "--opset", "20")
    assert Path(result["out"]).is_file() and result["opset"] == 20
    assert result["rows_from_table"] == 50 and result["rows_verified"] > 50


def test_wrong_kind_is_refused(trained: dict[str, Path], tmp_path: Path) -> None:
    result = kvtool("vfl", "export", "--model", trained["mpd"], "--out", tmp_path / "m.onnx")
    assert result.exit_code == 2
    assert "expected a vfl.local or vfl.split artifact, got vfl.mpd" in result.stderr
    assert not list(tmp_path.iterdir())


def test_unknown_format_is_refused(trained: dict[str, Path]) -> None:
    result = kvtool("vfl", "export", "--model", trained["local"], "--format", "tflite")
    assert result.exit_code == 2 and "--format tflite: expected one of onnx" in result.stderr


def test_unwritable_out_folder_leaves_no_files(trained: dict[str, Path], tmp_path: Path) -> None:
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the output folder should be")
    result = kvtool("vfl", "export", "--model", trained["local"], "--out", blocker / "local.onnx")
    assert result.exit_code == 2 and "cannot create the output folder" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not_a_folder"]


def test_failed_sidecar_write_removes_the_graph(trained: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "local.onnx"
    Path(f"{out}.json").mkdir()  # a folder in the sidecar's place: the rename fails
    result = kvtool("vfl", "export", "--model", trained["local"], "--out", out)
    assert result.exit_code == 2 and "local.onnx.json" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["local.onnx.json"]


def test_a_mismatch_is_refused_and_nothing_written(
    trained: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(export_module, "TOLERANCE", 0.0)  # any difference, even 0, now fails
    result = kvtool("vfl", "export", "--model", trained["local"], "--out", tmp_path / "local.onnx")
    assert result.exit_code == 2 and "nothing was written" in result.stderr
    assert not list(tmp_path.iterdir())


def test_missing_runtime_names_the_extra(
    trained: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    result = kvtool("vfl", "export", "--model", trained["local"], "--out", tmp_path / "local.onnx")
    assert result.exit_code == 2 and "pip install 'kvtool[onnx]'" in result.stderr
    assert not list(tmp_path.iterdir())
