"""A thousand edits in a row: the retention curve of the side memory on a larger world.

The default embedded world holds 239 records of the trained tasks, too few for the
editing issue's curve to 1,000 edits. This script builds a world four times larger
(``--world-countries 160 --world-people 240 --world-recent 160``: its own base model),
trains the default editor on it, and applies ``--edits`` edits one after another (the
test records of the trained tasks first, then training records, tasks interleaved),
scoring every edit so far every ``--every`` edits: retention (their Reliability) and
Locality, for ``--method memory`` and, as the reference, InstructEdit's summed updates.
Training records were meta-trained on: past the test records the curve measures how
edits interfere, not how they generalise.

Usage: .venv/bin/python benchmarks/edit_memory_long.py [--edits 1000] [--every 100]
Writes benchmarks/results/edit_memory_long.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
WORLD = ["--world-countries", "160", "--world-people", "240", "--world-recent", "160"]
TRAINED = ("counterfact", "recent", "convsent")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edits", type=int, default=1000)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument(
        "--editor", type=Path, default=ROOT / "runs" / "bench" / "edit_memory_long" / "editor.safetensors"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "edit_memory_long.md")
    args = parser.parse_args()
    started = time.perf_counter()
    if not args.editor.exists():
        command = [str(ROOT / ".venv" / "bin" / "kvtool"), "edit", "train-editor", *WORLD]
        subprocess.run(
            [*command, "--out", str(args.editor), "--quiet", "--json"], check=True, stdout=subprocess.DEVNULL
        )
    import torch

    from kedit_vfl.edit.algs.registry import build_method
    from kedit_vfl.edit.data.sources import embedded_world, interleaved, world_options_of
    from kedit_vfl.edit.editor.batches import Prompter
    from kedit_vfl.edit.editor.store import load_editor, open_editor_base
    from kedit_vfl.edit.evaluation.evaluate import evaluate

    torch.set_num_threads(2)
    loaded = load_editor(args.editor)
    base = open_editor_base(loaded, None, "cpu", "float32", str(args.editor))
    world = embedded_world(world_options_of(loaded.base))
    test = interleaved([world.records["test"][t] for t in TRAINED])
    train = interleaved([world.records["train"][t] for t in TRAINED])
    sequence = (test + train)[: args.edits]
    prompter = Prompter(loaded.pools, index=0)
    results = {
        "edits": len(sequence),
        "test_records": len(test),
        "threshold": loaded.artifact.extra["memory"],
    }
    for name in ("memory", "instructedit"):
        method = build_method(name, loaded, prompter)
        summary = evaluate(method, base, {"all": sequence}, sequential=len(sequence), curve_every=args.every)
        results[name] = {"curve": summary["sequential_curve"], "overall": summary["overall"]}
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    lines = [
        "# A thousand edits in a row (a world four times the default, trained tasks)",
        "",
        f"{len(sequence)} edits one after another: the {min(len(test), len(sequence))} test records of the "
        "trained tasks first, then training records (meta-trained on), tasks interleaved. Every "
        f"{args.every} edits, all edits so far are scored on the model as it stands. Routing threshold "
        f"{results['threshold']['threshold']:.3f} (calibrated by train-editor for "
        f"{results['threshold']['memory_edits']} edits). One seed.",
        "",
        "| edits so far | memory: retention | memory: Locality | summed: retention | summed: Locality |",
        "| --- | --- | --- | --- | --- |",
    ]
    for ours, theirs in zip(results["memory"]["curve"], results["instructedit"]["curve"], strict=True):
        lines.append(
            f"| {ours['edits']} | {ours['retention']:.3f} | {ours['locality']:.3f} | "
            f"{theirs['retention']:.3f} | {theirs['locality']:.3f} |"
        )
    lines += ["", f"Wall time {time.perf_counter() - started:.0f} s."]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
