"""ONNX export benchmark: local-mode scoring throughput, onnxruntime against kvtool.

A student is trained briefly (``distill`` without a teacher, on a 20,000-user demo set),
exported with ``kvtool vfl export``'s library function, and then scores the same
10^6 generated rows several ways:

- ``kvtool vfl score --mode local`` end to end (read the CSV, transform, model, write
  the scores), its first run (empty table cache) and its best repeat;
- its pure model part (the transformed tensors through the torch model, as ``score`` runs it);
- the exported module (``OnnxScorer``: transform + model) run by torch, the graph's work;
- onnxruntime on preprocessed inputs (``encode_for_onnx``; the graph still does the
  standardisation), batch 65,536 with 1 and 2 intra-op threads, and batch 4,096 with 1;
- ``encode_for_onnx`` itself (Arrow table -> the graph's inputs), for the full serving cost.

The ONNX scores are also compared with ``score``'s CSV on every row.

Run: .venv/bin/python benchmarks/vfl_export.py [--rows 1000000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.csv as pacsv
import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
BATCH = 65_536


def best_of(repeats: int, fn: Any) -> float:
    """Fastest wall time of ``repeats`` calls (the others are the machine's noise)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def make_data(rows: int, folder: Path) -> tuple[Path, Path, Path]:
    """Training tables (20,000 users) and a test table of exactly ``rows`` active rows."""
    from kedit_vfl.vfl.data.demo import DemoConfig, generate

    train = generate(DemoConfig(rows=20_000, seed=1, labelled=0.3))
    active_train, passive_train = folder / "active_train.csv", folder / "passive_train.csv"
    pacsv.write_csv(train["active_train.csv"], active_train)
    pacsv.write_csv(train["passive_train.csv"], passive_train)
    big = generate(DemoConfig(rows=int(rows / 0.8 * 1.01) + 100, seed=2, test_fraction=0.8, labelled=0.0))
    test = big["active_test.csv"].slice(0, rows)
    assert test.num_rows == rows, "the generated test table came out short; raise the margin"
    active_test = folder / "active_test.csv"
    pacsv.write_csv(test, active_test)
    return active_train, passive_train, active_test


def train_student(active: Path, passive: Path, out: Path) -> Path:
    from kedit_vfl.vfl.config import DistillConfig
    from kedit_vfl.vfl.stages.distill import distill

    distill(
        DistillConfig(
            active=active, passive=passive, teacher=None, kd_weight=0.0, epochs=3, device="cpu", out=out
        )
    )
    return out


def run(rows: int, repeats: int) -> dict[str, Any]:
    import onnxruntime as ort

    from kedit_vfl.vfl.config import ScoreConfig
    from kedit_vfl.vfl.data.loading import load_party
    from kedit_vfl.vfl.data.read import read_table
    from kedit_vfl.vfl.models.store import load_local, schemas_of
    from kedit_vfl.vfl.serving.export import ExportConfig, OnnxScorer, encode_for_onnx, export_onnx
    from kedit_vfl.vfl.serving.score import score
    from kedit_vfl.vfl.stages.train import predict

    folder = Path(tempfile.mkdtemp(prefix="kvtool_export_bench_"))
    os.environ["KVTOOL_CACHE"] = str(folder / "cache")  # a table cache of our own, empty at first
    active_train, passive_train, active_test = make_data(rows, folder)
    model_path = train_student(active_train, passive_train, folder / "local.safetensors")
    exported = export_onnx(ExportConfig(model=model_path, out=folder / "local.onnx", table=active_test))

    timings: dict[str, float] = {}
    scores_csv = folder / "scores.csv"
    config = ScoreConfig(model=model_path, active=active_test, mode="local", device="cpu", out=scores_csv)
    timings["score_first"] = best_of(1, lambda: score(config))
    timings["score_repeat"] = best_of(repeats, lambda: score(config))

    model, artifact = load_local(model_path)
    schema = schemas_of(artifact)["active"]
    party = load_party(active_test, "active", "id", "y", schema=schema)
    num, cat = party.rows.num, party.rows.cat
    timings["torch_model"] = best_of(
        repeats, lambda: predict(lambda i: model(num[i], cat[i]), len(num), 4096)
    )

    table = read_table(active_test, "active")
    timings["encode_for_onnx"] = best_of(repeats, lambda: encode_for_onnx(table, schema))
    numeric, categorical = encode_for_onnx(table, schema)
    scorer = OnnxScorer(model, schema).eval()  # the exported module, run by torch
    raw_num, raw_cat = torch.from_numpy(numeric), torch.from_numpy(categorical)
    timings["torch_scorer"] = best_of(
        repeats, lambda: predict(lambda i: scorer(raw_num[i], raw_cat[i])[1], rows, 4096)
    )
    onnx_scores = {}
    for threads, batch in ((1, BATCH), (2, BATCH), (1, 4096)):
        key = f"onnxruntime_{threads}_{batch}"
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(
            str(folder / "local.onnx"), options, providers=["CPUExecutionProvider"]
        )

        def run_all(session: Any = session, key: str = key, batch: int = batch) -> None:
            feeds = [
                {"numeric": numeric[s : s + batch], "categorical": categorical[s : s + batch]}
                for s in range(0, rows, batch)
            ]
            onnx_scores[key] = np.concatenate([session.run(["score"], feed)[0] for feed in feeds])

        run_all()  # warm-up
        timings[key] = best_of(repeats, run_all)

    kvtool_scores = pacsv.read_csv(scores_csv)
    assert kvtool_scores["id"].to_pylist() == table["id"].to_pylist()
    expected = kvtool_scores["score"].to_numpy()
    diff = max(float(np.max(np.abs(v - expected))) for v in onnx_scores.values())
    return {
        "rows": rows,
        "batch_onnxruntime": BATCH,
        "batch_torch": 4096,
        "repeats": repeats,
        "seconds": timings,
        "rows_per_second": {k: rows / v for k, v in timings.items()},
        "max_abs_diff_onnx_vs_score": diff,
        "export": {k: exported[k] for k in ("opset", "bytes", "rows_verified", "max_abs_diff", "seconds")},
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "onnxruntime": ort.__version__,
            "torch_threads": torch.get_num_threads(),
        },
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip(),
    }


ROWS = [
    (
        "score_first",
        "`kvtool vfl score --mode local`, end to end, first run",
        "read CSV, transform, model, write CSV",
    ),
    (
        "score_repeat",
        "`kvtool vfl score --mode local`, end to end, repeated",
        "read CSV, transform, model, write CSV",
    ),
    ("torch_model", "its model part (torch, 1 thread, batch 4,096)", "transformed tensors -> logits"),
    (
        "encode_for_onnx",
        "`encode_for_onnx` (Arrow table -> graph inputs)",
        "raw floats with NaN, vocabulary indices",
    ),
    (
        "torch_scorer",
        "the exported module run by torch (1 thread, batch 4,096)",
        "raw inputs -> transform + model",
    ),
    ("onnxruntime_1_65536", "onnxruntime, 1 thread, batch 65,536", "graph: transform + model + sigmoid"),
    ("onnxruntime_2_65536", "onnxruntime, 2 threads, batch 65,536", "graph: transform + model + sigmoid"),
    ("onnxruntime_1_4096", "onnxruntime, 1 thread, batch 4,096", "graph: transform + model + sigmoid"),
]


def markdown(result: dict[str, Any]) -> str:
    seconds, rate = result["seconds"], result["rows_per_second"]
    lines = [
        f"# Local-mode scoring: onnxruntime vs kvtool ({result['rows']:,} rows)",
        "",
        f"Machine: {result['machine']['cpus']} CPU cores (shared), {result['machine']['platform']}; "
        f"torch {result['machine']['torch']}, onnxruntime {result['machine']['onnxruntime']}; "
        f"commit {result['commit']}. Best of {result['repeats']} runs (first run: one run).",
        "",
        "| path | what is timed | seconds | rows/s | µs/row |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for key, name, what in ROWS:
        lines.append(
            f"| {name} | {what} | {seconds[key]:.3f} | {rate[key]:,.0f} "
            f"| {1e6 * seconds[key] / result['rows']:.2f} |"
        )
    lines += [
        "",
        "ONNX scores vs `kvtool vfl score`'s CSV, all rows: "
        f"max |diff| = {result['max_abs_diff_onnx_vs_score']:.2e}.",
        f"Export: opset {result['export']['opset']}, {result['export']['bytes']:,} bytes, verified on "
        f"{result['export']['rows_verified']} rows (max |diff| {result['export']['max_abs_diff']:.2e}) "
        f"in {result['export']['seconds']:.2f} s.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print only; do not write benchmarks/results")
    args = parser.parse_args()
    result = run(args.rows, args.repeats)
    text = markdown(result)
    print(text)
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "vfl_export.md").write_text(text)
        (RESULTS / "vfl_export.json").write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {RESULTS / 'vfl_export.md'} and .json", file=sys.stderr)


if __name__ == "__main__":
    main()
