"""Editing methods, batches and sequences on the embedded world: the tables of issue 23.

Trains, per seed, the default instructed editor (one edit per step), an instructed editor
on mixed batch sizes (``--batch-sizes 1,2,4,8,16,32``) and a plain one
(``--no-instructions``: MEND), then scores on the embedded world's test split, through
the library's ``evaluate`` (the protocol of ``kvtool edit evaluate``, on the prompts each
editor was trained to serve: ``--queries auto``):

1. every method, one edit at a time (rolled back), per task, with seconds per edit;
2. the test edits of all tasks interleaved, applied together in groups of 8 and 32
   (and 128, on the test and validation records together: the test split holds 97),
   for the weight methods and the side memory, with the update time against single
   edits; the default editor also with its batch's updates summed (``aggregate="sum"``,
   every editor before 0.3) beside the joint combination;
3. sequences of every test edit one after another (tasks interleaved) with the
   retention curve, and a curve to ``--curve-edits`` edits on training-split records
   (the editors were meta-trained on them: the curve measures interference, not
   generalisation);
4. instructed against plain editors per task (the held-out task included).

FT-L and FT-M have no seed (no training); they run once. Runs resume from the JSON.

Usage: .venv/bin/python benchmarks/edit_methods.py [--seeds 0,1,2] [--jobs 2]
Writes benchmarks/results/edit_methods.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
EDITORS = {  # variant -> train-editor options
    "instructed": [],
    "instructed, mixed batches": ["--batch-sizes", "1,2,4,8,16,32"],
    "plain (MEND)": ["--no-instructions"],
}
FILES = {"instructed": "instructed", "instructed, mixed batches": "mixed", "plain (MEND)": "plain"}
TASKS = ("counterfact", "recent", "convsent", "zsre")
HOLDOUT = "zsre"
METRICS = ("reliability", "generalization", "locality")


def train(job: dict[str, Any]) -> str:
    """Train one editor with the CLI (its defaults, a seed, a variant's options)."""
    out = Path(job["out"])
    if not out.exists():
        command = [str(ROOT / ".venv" / "bin" / "kvtool"), "edit", "train-editor", "--seed", str(job["seed"])]
        subprocess.run(
            [*command, *EDITORS[job["variant"]], "--out", str(out), "--quiet", "--json"],
            check=True,
            stdout=subprocess.DEVNULL,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
    return str(out)


def overall(summary: dict[str, Any]) -> dict[str, Any]:
    o = summary["overall"]
    return {**{m: o[m] for m in METRICS}, "seconds_per_edit": summary.get("seconds_per_edit")}


def score_seed(job: dict[str, Any]) -> dict[str, Any]:
    """Every measurement that needs the seed's editors (runs in a worker process)."""
    import torch

    torch.set_num_threads(1)
    from kedit_vfl.edit.algs.registry import build_method
    from kedit_vfl.edit.data.sources import embedded_world, interleaved, world_options_of
    from kedit_vfl.edit.editor.batches import Prompter
    from kedit_vfl.edit.editor.store import load_editor, open_editor_base
    from kedit_vfl.edit.evaluation.evaluate import evaluate, trained_queries

    paths = job["editors"]
    loaded = {v: load_editor(p) for v, p in paths.items()}
    main = loaded["instructed"]
    base = open_editor_base(main, None, "cpu", "float32", paths["instructed"])
    world = embedded_world(world_options_of(main.base))
    test = {t: list(world.records["test"][t]) for t in TASKS}
    mixed = {"mixed": interleaved([test[t] for t in sorted(test)])}
    plain_prompter = Prompter(None)

    def method(name: str, variant: str = "instructed") -> Any:
        chosen = loaded[variant]
        prompter = Prompter(chosen.pools, index=0) if chosen.pools else plain_prompter
        # scored on the prompts the editor serves, as `kvtool edit evaluate --queries auto`
        queries = plain_prompter if trained_queries(chosen) == "plain" else None
        return build_method(name, chosen, prompter, plain=loaded["plain (MEND)"], queries=queries)

    methods = {
        "instructedit": method("instructedit"),
        "instructedit, mixed-batch editor": method("instructedit", "instructed, mixed batches"),
        "memory": method("memory"),
        "mend": method("mend"),
    }
    # the default editor with its edits summed (as every editor before 0.3): batches only
    summed = copy.deepcopy(methods["instructedit"])
    summed.editor.config = dataclasses.replace(summed.editor.config, aggregate="sum")
    if job["seed"] == job["first_seed"]:
        methods.update({"ft-m": method("ft-m"), "ft-l": method("ft-l")})
    out: dict[str, Any] = {"seed": job["seed"], "single": {}, "batch": {}, "sequential": {}}
    for name, m in methods.items():
        summary = evaluate(m, base, test)
        out["single"][name] = {**overall(summary), "tasks": summary["tasks"]}
    pool = mixed["mixed"] + interleaved([world.records["validation"][t] for t in sorted(TASKS)])
    batched = {**methods, "instructedit, summed updates": summed}
    for name in (
        "instructedit",
        "instructedit, summed updates",
        "instructedit, mixed-batch editor",
        "memory",
        "ft-m",
    ):
        if name not in batched:
            continue
        for size in (8, 32, 128):
            records = mixed["mixed"] if size < 128 else pool
            usable = records[: len(records) // size * size]  # whole groups only
            summary = evaluate(batched[name], base, {"mixed": usable}, batch=size)
            out["batch"].setdefault(name, {})[str(size)] = overall(summary)
    for name in ("instructedit", "instructedit, mixed-batch editor", "memory", "ft-m"):
        if name not in methods:
            continue
        n = len(mixed["mixed"])
        summary = evaluate(methods[name], base, mixed, sequential=n, curve_every=10)
        out["sequential"][name] = {**overall(summary), "curve": summary["sequential_curve"], "edits": n}
    train_records = interleaved([world.records["train"][t] for t in sorted(TASKS) if t != HOLDOUT])
    long = train_records[: job["curve_edits"]]
    for name in ("memory", "instructedit"):
        every = max(1, len(long) // 10)
        summary = evaluate(methods[name], base, {"train": long}, sequential=len(long), curve_every=every)
        out["sequential"][f"{name}, training records"] = {
            **overall(summary),
            "curve": summary["sequential_curve"],
            "edits": len(long),
        }
    return out


def spread(values: list[float | None]) -> str:
    known = [v for v in values if v is not None]
    if not known:
        return "-"
    if len(known) == 1:
        return f"{known[0]:.3f}"
    return f"{statistics.mean(known):.3f} ± {statistics.stdev(known):.3f}"


def table(seeds: list[dict[str, Any]]) -> str:
    lines = ["# Editing methods, batches and sequences (embedded world, test split)", ""]
    lines += [
        f"Seeds: {', '.join(str(s['seed']) for s in seeds)} (mean ± std; FT-L and FT-M need no seed).",
        "",
    ]
    names = list(seeds[0]["single"])
    lines += [
        "## One edit at a time (rolled back), overall (mean over tasks)",
        "",
        "| method | Reliability | Generalization | Locality | mean R/G/L | s per edit |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name in names:
        runs = [s["single"][name] for s in seeds if name in s["single"]]
        rgl = [statistics.mean([r[m] for m in METRICS]) for r in runs]
        lines.append(
            f"| {name} | {' | '.join(spread([r[m] for r in runs]) for m in METRICS)} | {spread(rgl)} | "
            f"{spread([r['seconds_per_edit'] for r in runs])} |"
        )
    lines += ["", "Per task, Reliability / Generalization / Locality:", ""]
    lines += ["| method | " + " | ".join(f"{t}{' (held out)' if t == HOLDOUT else ''}" for t in TASKS) + " |"]
    lines += ["| --- |" + " --- |" * len(TASKS)]
    for name in names:
        runs = [s["single"][name] for s in seeds if name in s["single"]]
        cells = []
        for task in TASKS:
            cells.append(" / ".join(spread([r["tasks"][task][m] for r in runs]) for m in METRICS))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Several edits in one batch (tasks interleaved; updates computed together, as `apply`)",
        "",
        "128: the test and validation records together (the test split holds 97).",
        "",
        "| method | edits together | Reliability | Generalization | Locality | s per edit |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name in seeds[0]["batch"]:
        for size in ("8", "32", "128"):
            runs = [s["batch"][name][size] for s in seeds if name in s["batch"]]
            lines.append(
                f"| {name} | {size} | {' | '.join(spread([r[m] for r in runs]) for m in METRICS)} | "
                f"{spread([r['seconds_per_edit'] for r in runs])} |"
            )
    lines += [
        "",
        "## Edits one after another (tasks interleaved)",
        "",
        "Retention: Reliability of all edits so far, on the model as it stands; Locality of those edits.",
        "",
        "| method | records | edits | retention, end | Locality | curve (edits: retention / Locality) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name in seeds[0]["sequential"]:
        runs = [s["sequential"][name] for s in seeds if name in s["sequential"]]
        records = "training split" if "training records" in name else "test split"
        curve = runs[0]["curve"]
        points = []
        for point in curve:
            at = [p for r in runs for p in r["curve"] if p["edits"] == point["edits"]]
            retention, locality = spread([p["retention"] for p in at]), spread([p["locality"] for p in at])
            points.append(f"{point['edits']}: {retention} / {locality}")
        final = spread([r["reliability"] for r in runs])
        label = name.removesuffix(", training records")
        lines.append(
            f"| {label} | {records} | {runs[0]['edits']} | {final}"
            f" | {spread([r['locality'] for r in runs])} | {'; '.join(points)} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--curve-edits", type=int, default=1000)
    parser.add_argument("--editors", type=Path, default=ROOT / "runs" / "bench" / "edit_methods-conditioned")
    parser.add_argument("--out", type=Path, default=RESULTS / "edit_methods.md")
    parser.add_argument(
        "--summarise-only", action="store_true", help="tabulate the JSON on file, run nothing"
    )
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    runs_file = args.out.with_suffix(".json")
    if args.summarise_only:
        done = {r["seed"]: r for r in json.loads(runs_file.read_text())}
        write(args.out, [done[s] for s in seeds], "")
        return
    args.editors.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    jobs = [
        {
            "seed": s,
            "variant": v,
            "out": str(args.editors / f"{FILES[v]}-{s}.safetensors"),
        }
        for s in seeds
        for v in EDITORS
    ]
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        paths = list(pool.map(train, jobs))
    editors = {s: {} for s in seeds}
    for job, path in zip(jobs, paths, strict=True):
        editors[job["seed"]][job["variant"]] = path
    done = {r["seed"]: r for r in json.loads(runs_file.read_text())} if runs_file.exists() else {}
    todo = [
        {"seed": s, "editors": editors[s], "first_seed": seeds[0], "curve_edits": args.curve_edits}
        for s in seeds
        if s not in done
    ]
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for result in pool.map(score_seed, todo):
            done[result["seed"]] = result
            runs_file.write_text(json.dumps(list(done.values()), indent=1))
    write(
        args.out,
        [done[s] for s in seeds],
        f"Wall time {time.perf_counter() - started:.0f} s with {args.jobs} worker(s).",
    )


def write(out: Path, seeds: list[dict[str, Any]], footer: str) -> None:
    """The markdown tables, and the test-split retention curves as a PNG beside them."""
    from kedit_vfl.edit.evaluation.plots import retention_curves

    png = out.with_name(out.stem + "_sequential.png")
    curves = {}
    for name, first in seeds[0]["sequential"].items():
        if "training records" in name:
            continue
        points = []
        for point in first["curve"]:
            runs = [s["sequential"][name] for s in seeds if name in s["sequential"]]
            at = [p for r in runs for p in r["curve"] if p["edits"] == point["edits"]]
            points.append({
                "edits": point["edits"],
                "retention": statistics.mean(p["retention"] for p in at),
                "locality": statistics.mean(p["locality"] for p in at),
            })  # fmt: skip
        curves[name] = points
    retention_curves(curves, seeds[0]["sequential"][next(iter(curves))]["edits"], png)
    text = table(seeds) + f"\n![Retention curves]({png.name})\n" + (f"\n{footer}\n" if footer else "")
    out.write_text(text)
    print(text, file=sys.stdout)


if __name__ == "__main__":
    main()
