"""Instructions and queries: what an instructed editor's edits give the prompts a user asks.

An instructed editor edits with the instruction-prefixed prompt. After ``apply`` a user
asks the plain prompt. This scores, on the embedded world's test split over seeds:

- ``instructed, instructed queries``: the editor trained with its edit loss on the
  instructed prompts (``--instructed-queries``, the default before 0.2);
- ``instructed, plain queries``: the default since 0.2: the edit loss on the plain prompt
  and rephrase, the instruction only conditioning the gradient the editor sees;
- ``plain (MEND)``: the editor trained with ``--no-instructions``;

each evaluated with ``--queries plain`` (what a user asks) and ``--queries instructed``.

Usage: .venv/bin/python benchmarks/edit_instructions.py [--seeds 0 1 2]
Writes benchmarks/results/edit_instructions.{json,md}. Editors are kept in
runs/bench/edit_instructions (and reused from runs/bench/edit_methods when there).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
EDITORS = Path("runs") / "bench" / "edit_instructions"
EARLIER = Path("runs") / "bench" / "edit_methods"  # the same settings, trained by edit_methods.py
TRAINED = ("counterfact", "recent", "convsent")
VARIANTS = {
    "instructed, instructed queries": ("--instructed-queries",),
    "instructed, plain queries (default)": (),
    "plain (MEND)": ("--no-instructions",),
}
EARLIER_NAMES = {"instructed, instructed queries": "instructed", "plain (MEND)": "plain"}


def kvtool(*args: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "kedit_vfl", *args, "--json", "--quiet"], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"kvtool {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout)


def editor_for(variant: str, seed: int) -> Path:
    earlier = EARLIER / f"{EARLIER_NAMES.get(variant, '-')}-{seed}.safetensors"
    if earlier.exists():
        return earlier
    path = EDITORS / f"{variant.split(',')[0].split(' ')[0]}-{len(VARIANTS[variant])}-{seed}.safetensors"
    if not path.exists():
        EDITORS.mkdir(parents=True, exist_ok=True)
        kvtool("edit", "train-editor", *VARIANTS[variant], "--seed", str(seed), "--out", str(path))
    return path


def figures(result: dict[str, Any]) -> dict[str, float]:
    tasks = result["tasks"]
    out = {
        k: statistics.mean(tasks[t][k] for t in TRAINED)
        for k in ("reliability", "generalization", "locality")
    }
    out.update({f"zsre_{k}": tasks["zsre"][k] for k in ("reliability", "generalization", "locality")})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    runs = []
    for seed in args.seeds:
        for variant in VARIANTS:
            path = editor_for(variant, seed)
            for queries in ("plain", "instructed"):
                if variant == "plain (MEND)" and queries == "instructed":
                    continue  # no instruction to ask with
                method = "mend" if variant == "plain (MEND)" else "instructedit"
                result = kvtool(
                    "edit", "evaluate", "--editor", str(path), "--queries", queries, "--method", method
                )
                runs.append({"variant": variant, "queries": queries, "seed": seed, **figures(result)})
                print(json.dumps(runs[-1]), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "edit_instructions.json").write_text(
        json.dumps({"seeds": args.seeds, "runs": runs}, indent=2) + "\n"
    )
    (RESULTS / "edit_instructions.md").write_text(markdown(runs, args.seeds))
    print(markdown(runs, args.seeds))


def markdown(runs: list[dict[str, Any]], seeds: list[int]) -> str:
    keys = (
        "reliability",
        "generalization",
        "locality",
        "zsre_reliability",
        "zsre_generalization",
        "zsre_locality",
    )
    lines = [
        "## Instructions and queries (embedded world, test split)",
        "",
        f"Seeds {seeds}; mean ± standard deviation over seeds. Trained tasks: {', '.join(TRAINED)} "
        "(their mean); zsre is held out of training. *Queries* is what the edited model is asked: "
        "the plain prompt and rephrases (what a user asks after `apply`) or the instructed ones.",
        "",
        "| editor | queries | R | G | L | zsre R | zsre G | zsre L |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for variant in VARIANTS:
        for queries in ("plain", "instructed"):
            group = [r for r in runs if r["variant"] == variant and r["queries"] == queries]
            if not group:
                continue
            cells = []
            for key in keys:
                values = [r[key] for r in group]
                spread = statistics.stdev(values) if len(values) > 1 else 0.0
                cells.append(f"{statistics.mean(values):.3f} ± {spread:.3f}")
            lines.append(f"| {variant} | {queries} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
