"""VFed-SSD at advertising scale: wall time and peak memory of every command.

For generated tables of 10^6 and 10^7 users (40 feature columns: 16 + 14 numeric, 5 + 5
categorical, as Parquet shards written by ``kvtool vfl make-demo`` in bounded memory),
each command runs once as its own process, one epoch where it trains:
``pretrain-mpd``, ``train-split`` (its fit and its self-training round), ``distill``
and ``score`` in both modes on the whole active training table, beside a process that
merely reads that table with the same reader (all columns, every batch; for federated
scoring in one process, both parties' tables). Scoring is compared with the read twice:
whole process against whole process (both import PyTorch, about 2 s here), and the
command's own work (its ``seconds``) against the read itself. Each comparison is the
median of ``--pairs`` read-then-score pairs run one after the other: on these shared
cores the same process took from 1x to 1.5x its fastest time within minutes, and a
pair sees the same machine. Peak resident memory is the process's ``ru_maxrss`` (the
largest of the runs). Training throughput is compared with a plain PyTorch loop
(AdamW, in-memory tensors, the same networks and batch size) in this process.

Run: .venv/bin/python benchmarks/vfl_scale.py [--rows 1000000 10000000] [--pairs 5] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
KVTOOL = str(Path(sys.executable).parent / "kvtool")
sys.path.insert(0, str(ROOT))

from kedit_vfl.vfl.data.schema import PartySchema  # noqa: E402
from kedit_vfl.vfl.models.networks import ModelConfig, SplitModel  # noqa: E402

SHAPE = ["--numeric-active", "16", "--numeric-passive", "14", "--categorical-extra", "3"]
READ = (  # the same reader, every column of every batch; prints rows and the in-process seconds
    "import sys, time; from kedit_vfl.vfl.data.read import open_table\n"
    "start = time.perf_counter()\n"
    "rows = sum(b.num_rows for path in sys.argv[1:] for b in open_table(path).batches())\n"
    "print(rows, round(time.perf_counter() - start, 3))"
)


def measured(argv: list[str]) -> dict[str, Any]:
    """Run one process under GNU time; its wall time, peak RSS and (for --json) its result."""
    with tempfile.NamedTemporaryFile(suffix=".time") as stats:
        start = time.perf_counter()
        done = subprocess.run(
            ["/usr/bin/time", "-f", "%M", "-o", stats.name, *argv], capture_output=True, text=True
        )
        seconds = time.perf_counter() - start
        if done.returncode:
            raise SystemExit(f"{' '.join(argv)} failed: {done.stderr}")
        peak_kib = int(Path(stats.name).read_text().split()[-1])
    out = done.stdout.strip()
    result = json.loads(out) if out.startswith("{") else {"stdout": out}
    return {"seconds": round(seconds, 1), "peak_gib": round(peak_kib / 2**20, 2), "result": result}


def plain_rows_per_s(demo: Path, batch: int = 128, steps: int = 400) -> float:
    """A plain PyTorch loop: the split model's networks, AdamW, in-memory tensors."""
    import pyarrow.parquet as pq

    def schema_of(folder: Path) -> PartySchema:
        table = pq.read_table(next(iter(sorted(folder.glob("*.parquet")))))
        numeric = [c for c in table.column_names if "_num" in c]
        categorical = [c for c in table.column_names if c not in numeric and c not in ("id", "y")]
        vocab = [[f"v{i}" for i in range(20)]] * len(categorical)
        ones = [1.0] * len(numeric)
        return PartySchema(numeric=numeric, mean=ones, std=ones, categorical=categorical, vocab=vocab)

    schemas = {"active": schema_of(demo / "active_train"), "passive": schema_of(demo / "passive_train")}
    model = SplitModel(schemas, ModelConfig())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    n = batch * steps
    a_num, b_num = (
        torch.randn(n, len(schemas["active"].numeric)),
        torch.randn(n, len(schemas["passive"].numeric)),
    )
    a_cat = torch.randint(0, 22, (n, len(schemas["active"].categorical)))
    b_cat = torch.randint(0, 22, (n, len(schemas["passive"].categorical)))
    y = torch.randint(0, 2, (n,)).float()
    torch.set_num_threads(1)
    start = time.perf_counter()
    for index in torch.randperm(n).split(batch):
        local, full = model(a_num[index], a_cat[index], b_num[index], b_cat[index])
        loss = F.binary_cross_entropy_with_logits(full, y[index]) + 0.5 * F.binary_cross_entropy_with_logits(
            local, y[index]
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return n / (time.perf_counter() - start)


def run(rows: int, folder: Path, pairs: int) -> dict[str, Any]:
    demo = folder / f"demo_{rows}"
    out = folder / f"runs_{rows}"
    out.mkdir(parents=True, exist_ok=True)
    vfl = [KVTOOL, "vfl"]
    steps: dict[str, dict[str, Any]] = {}
    steps["make-demo"] = measured([*vfl, "make-demo", "--rows", str(rows), "--format", "parquet", *SHAPE,
                                   "--shard-rows", str(max(rows // 10, 1000)),
                                   "--out", str(demo), "--json"])  # fmt: skip
    data = ["--active", str(demo / "active_train"), "--passive", str(demo / "passive_train")]
    one = ["--epochs", "1", "--json", "--quiet"]
    steps["pretrain-mpd"] = measured(
        [*vfl, "pretrain-mpd", *data, *one, "--out", str(out / "mpd.safetensors")]
    )
    steps["train-split"] = measured([*vfl, "train-split", *data, *one, "--init", str(out / "mpd.safetensors"),
                                     "--out", str(out / "split.safetensors")])  # fmt: skip
    steps["distill"] = measured([*vfl, "distill", *data, *one, "--teacher", str(out / "split.safetensors"),
                                 "--out", str(out / "local.safetensors")])  # fmt: skip
    # score the whole active training table (the largest one), each run right after a read of it
    scored = ["--active", str(demo / "active_train"), "--json", "--quiet"]
    local = [*vfl, "score", "--model", str(out / "local.safetensors"), *scored,
             "--out", str(out / "scores_local.parquet")]  # fmt: skip
    federated = [*vfl, "score", "--mode", "federated", "--model", str(out / "split.safetensors"),
                 "--passive", str(demo / "passive_train"), "--fallback", str(out / "local.safetensors"),
                 *scored, "--out", str(out / "scores_fed.parquet")]  # fmt: skip
    read_active = [sys.executable, "-c", READ, str(demo / "active_train")]
    read_both = [*read_active, str(demo / "passive_train")]
    scoring = {
        mode: [{"read": measured(read), "score": measured(command)} for _ in range(pairs)]
        for mode, read, command in (("local", read_active, local), ("federated", read_both, federated))
    }
    plain = plain_rows_per_s(demo)
    return {"rows": rows, "steps": steps, "scoring": scoring, "plain_rows_per_s": plain}


def read_result(result: dict[str, Any]) -> tuple[int, float]:
    rows, seconds = result["stdout"].split()
    return int(rows), float(seconds)


def scoring_rows(mode: str, pairs: list[dict[str, Any]]) -> list[str]:
    """A read row and a score row: medians over the pairs, each ratio taken within its pair."""
    reads = [pair["read"] for pair in pairs]
    scores = [pair["score"] for pair in pairs]
    rows, _ = read_result(reads[0]["result"])
    reading = [read_result(read["result"])[1] for read in reads]
    whole = [s["seconds"] / r["seconds"] for s, r in zip(scores, reads, strict=True)]
    work = [s["result"]["seconds"] / seconds for s, seconds in zip(scores, reading, strict=True)]
    peak = max(s["peak_gib"] for s in scores)
    which = "active train" if mode == "local" else "active + passive train"
    read_note = f"{rows:,} rows; {statistics.median(reading):.1f} s of it reading"
    score_note = (
        f"{scores[0]['result']['rows']:,} rows; {statistics.median(whole):.2f}x the read process "
        f"({min(whole):.2f}-{max(whole):.2f}x over {len(pairs)} pairs); work "
        f"{statistics.median([s['result']['seconds'] for s in scores]):.1f} s, "
        f"{statistics.median(work):.2f}x the reading"
    )
    read_wall = statistics.median([r["seconds"] for r in reads])
    score_wall = statistics.median([s["seconds"] for s in scores])
    return [
        f"| read ({which}) | {read_wall:.1f} | {max(r['peak_gib'] for r in reads):.2f} | {read_note} |",
        f"| score {mode} | {score_wall:.1f} | {peak:.2f} | {score_note} |",
    ]


def report(runs: list[dict[str, Any]]) -> str:
    lines = ["### VFed-SSD at scale: one epoch per training command, 40 feature columns, Parquet shards", ""]
    for r in runs:
        steps = r["steps"]
        lines += [
            f"**{r['rows']:,} users**",
            "",
            "| step | wall s | peak RSS GiB | notes |",
            "| --- | --- | --- | --- |",
        ]
        for name, step in steps.items():
            res, note = step["result"], ""
            if "train_rows_per_s" in res:
                speed = res["train_rows_per_s"]
                note = f"{speed:,.0f} rows/s ({speed / r['plain_rows_per_s']:.2f}x plain loop)"
            lines.append(f"| {name} | {step['seconds']:.1f} | {step['peak_gib']:.2f} | {note} |")
        for mode, runs_of_mode in r["scoring"].items():
            lines += scoring_rows(mode, runs_of_mode)
        lines += ["", f"Plain PyTorch loop (split model, AdamW, batch 128, in-memory tensors, 1 thread): "
                  f"{r['plain_rows_per_s']:,.0f} rows/s.", ""]  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000])
    parser.add_argument("--pairs", type=int, default=5, help="Read-then-score pairs per scoring mode.")
    parser.add_argument("--keep", type=Path, help="Keep the generated tables and models here.")
    args = parser.parse_args()
    if args.pairs < 1:  # refused now, not after the training commands have run
        parser.error("--pairs must be at least 1")
    runs = []
    with tempfile.TemporaryDirectory(dir=args.keep) as tmp:
        os.environ["KVTOOL_RUNS"] = str(Path(tmp) / "runs")
        for rows in args.rows:
            runs.append(run(rows, Path(tmp), args.pairs))
            text = report(runs)
            print(text)
            RESULTS.mkdir(parents=True, exist_ok=True)
            (RESULTS / "vfl_scale.md").write_text(text)
            (RESULTS / "vfl_scale.json").write_text(json.dumps(runs, indent=1, default=str))


if __name__ == "__main__":
    main()
