"""Editors for large models on the CPU: peak memory and time per step, and data parallel.

``memory`` (the default part): for each model below (random weights, ``random:`` specs,
bfloat16 base, float32 editor), ``kvtool edit train-editor`` for 20 steps and ``kvtool
edit apply`` of one edit, each in its own process, its peak RSS read from the kernel
(``wait4``). The peak is set beside the budget the issue names: 1.6 x the base model's
bfloat16 weights plus the editor's parameters and Adam state (12 bytes a parameter).

``parallel``: ``torchrun --nproc-per-node 2`` (gloo) against one process with
``--accumulate 2``, the same editor settings and seed on the embedded world, each
evaluated on the test split.

Usage: .venv/bin/python benchmarks/edit_large_models.py [--parts memory,parallel] [--steps 20]
Writes benchmarks/results/edit_large_models.{json,md} (the parts it ran replace theirs).
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

RESULTS = Path(__file__).resolve().parent / "results"
GIB = 2**30

MODELS = {
    # a LLaMA of TinyLlama's depth at half its width (0.3B), and TinyLlama itself (1.1B)
    "llama-0.3b": "random:tinyllama-1.1b,hidden_size=1024,intermediate_size=2816,num_attention_heads=16,"
    "num_key_value_heads=2",
    "tinyllama-1.1b": "random:tinyllama-1.1b",
}


def _run(command: list[str], env: dict[str, str] | None = None) -> tuple[dict[str, Any], float, float]:
    """A command's --json output, its peak RSS in GiB and its wall seconds."""
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=stdout, stderr=stderr, env=env)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - start
        stdout.seek(0)
        stderr.seek(0)
        if process.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed:\n{stderr.read()[-3000:]}")
        return json.loads(stdout.read()), usage.ru_maxrss * 1024 / GIB, seconds


def kvtool(*args: str) -> list[str]:
    return [sys.executable, "-m", "kedit_vfl", *args]


def memory_rows(steps: int, work: Path) -> list[dict[str, Any]]:
    rows = []
    edit = work / "one_edit.jsonl"
    from kedit_vfl.edit.data.embedded import load_embedded_world

    record = load_embedded_world().records["test"]["counterfact"][0]
    edit.write_text(json.dumps(record.to_dict()) + "\n")
    for name, spec in MODELS.items():
        for checkpointing in (False, True):
            out = work / f"{name}-{checkpointing}.safetensors"
            flag = "--gradient-checkpointing" if checkpointing else "--no-gradient-checkpointing"
            trained, train_peak, train_seconds = _run(
                kvtool(
                    "edit", "train-editor", "--model", spec, "--dtype", "bfloat16", "--device", "cpu",
                    "--steps", str(steps), "--val-every", str(steps), "--val-records", "4",
                    "--memory-edits", "8", flag, "--out", str(out), "--json", "--quiet",
                )
            )  # fmt: skip
            applied, apply_peak, apply_seconds = _run(
                kvtool(
                    "edit", "apply", "--editor", str(out), "--edits", str(edit), "--dtype", "bfloat16",
                    "--device", "cpu", "--out", str(work / f"{name}-edited"), "--overwrite",
                    "--json", "--quiet",
                )
            )  # fmt: skip
            res = trained["resources"]
            budget = 1.6 * res["base_weights_gib"] + res["editor_state_gib"]
            rows.append(
                {
                    "model": name,
                    "spec": spec,
                    "gradient_checkpointing": checkpointing,
                    "base_parameters": res["base_parameters"],
                    "base_weights_gib": res["base_weights_gib"],
                    "editor_parameters": res["editor_parameters"],
                    "editor_state_gib": res["editor_state_gib"],
                    "budget_gib": round(budget, 3),
                    "train_peak_rss_gib": round(train_peak, 3),
                    "peak_over_budget": round(train_peak / budget, 3),
                    "seconds_per_step": res["seconds_per_step"],
                    "train_seconds": round(train_seconds, 1),
                    "apply_peak_rss_gib": round(apply_peak, 3),
                    "apply_seconds": round(apply_seconds, 1),
                    "edit_held": applied["held"] == 1,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
            out.unlink(missing_ok=True)
    return rows


def parallel_rows(steps: int, work: Path) -> list[dict[str, Any]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KVTOOL_RUNS": str(work)}
    common = ["--steps", str(steps), "--device", "cpu", "--json", "--quiet"]
    runs = {
        "torchrun, 2 processes": [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "kedit_vfl", "edit", "train-editor", *common,
        ],
        "1 process, --accumulate 2": kvtool("edit", "train-editor", "--accumulate", "2", *common),
    }  # fmt: skip
    rows = []
    for label, command in runs.items():
        out = work / f"{label.split(',')[0].replace(' ', '')}.safetensors"
        trained, peak, seconds = _run([*command, "--out", str(out)], env=env)
        evaluated, _, _ = _run(kvtool("edit", "evaluate", "--editor", str(out), "--json", "--quiet"), env=env)
        trained_tasks = [t for t in evaluated["tasks"] if t != "zsre"]
        row = {"run": label, "seconds": round(seconds, 1), "best_step": trained["best_step"]}
        for metric in ("reliability", "generalization", "locality"):
            row[metric] = round(
                sum(evaluated["tasks"][t][metric] for t in trained_tasks) / len(trained_tasks), 4
            )
            row[f"zsre_{metric}"] = evaluated["tasks"]["zsre"][metric]
        row["validation_score"] = trained["validation"]["score"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _markdown(data: dict[str, Any]) -> str:
    lines = ["# Editors for large models on the CPU", ""]
    env = data["environment"]
    lines.append(
        f"`benchmarks/edit_large_models.py` on {env['cpus']} CPU cores ({env['machine']}), torch "
        f"{env['torch']}, transformers {env['transformers']}; base models with random weights "
        "(`random:` specs) in bfloat16, the editor in float32, default editor settings."
    )
    if data.get("memory"):
        memory = data["memory"]
        lines += [
            "",
            f"## Peak memory: train-editor for {memory['steps']} steps, then apply one edit",
            "",
            "Budget = 1.6 x the base model's bfloat16 weights + the editor's parameters and Adam state "
            "(12 bytes a parameter). Peak RSS is the whole process's, read from the kernel.",
            "",
            "| model | base params | base bf16 GiB | editor params | budget GiB | checkpointing | "
            "train peak RSS GiB | peak / budget | s / step | apply peak RSS GiB | apply s |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in memory["rows"]:
            lines.append(
                f"| {r['model']} | {r['base_parameters'] / 1e9:.2f} B | {r['base_weights_gib']:.2f} | "
                f"{r['editor_parameters'] / 1e6:.0f} M | {r['budget_gib']:.2f} | "
                f"{'on' if r['gradient_checkpointing'] else 'off'} | {r['train_peak_rss_gib']:.2f} | "
                f"{r['peak_over_budget']:.2f} | {r['seconds_per_step']:.2f} | "
                f"{r['apply_peak_rss_gib']:.2f} | {r['apply_seconds']:.0f} |"
            )
    if data.get("parallel"):
        parallel = data["parallel"]
        lines += [
            "",
            f"## Data parallel: torchrun against --accumulate, {parallel['steps']} steps, embedded world",
            "",
            "Test split; trained tasks (counterfact, recent, convsent) averaged; zsre held out.",
            "",
            "| run | R | G | L | zsre R | zsre G | zsre L | validation score | best step | seconds |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in parallel["rows"]:
            lines.append(
                f"| {r['run']} | {r['reliability']:.3f} | {r['generalization']:.3f} | "
                f"{r['locality']:.3f} | {r['zsre_reliability']:.3f} | {r['zsre_generalization']:.3f} | "
                f"{r['zsre_locality']:.3f} | {r['validation_score']:.3f} | {r['best_step']} | "
                f"{r['seconds']:.0f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="memory,parallel")
    parser.add_argument("--steps", type=int, default=20, help="train-editor steps in the memory part")
    parser.add_argument("--parallel-steps", type=int, default=1500)
    args = parser.parse_args()
    import torch
    import transformers

    path = RESULTS / "edit_large_models.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data["environment"] = {
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    parts = args.parts.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        if "memory" in parts:
            data["memory"] = {"steps": args.steps, "rows": memory_rows(args.steps, Path(tmp))}
        if "parallel" in parts:
            data["parallel"] = {
                "steps": args.parallel_steps,
                "rows": parallel_rows(args.parallel_steps, Path(tmp)),
            }
    RESULTS.mkdir(exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    (RESULTS / "edit_large_models.md").write_text(_markdown(data))
    print(_markdown(data))


if __name__ == "__main__":
    main()
