"""Instructions and queries: what an instructed editor's edits give the prompts a user asks.

An instructed editor edits with the instruction-prefixed prompt. After ``apply`` a user
asks the plain prompt. This scores, on the embedded world's test split over seeds:

- ``instructed, instructed queries``: the editor trained with its edit loss on the
  instructed prompts (``--instructed-queries``, the default before 0.2);
- ``instructed, plain queries (prefix)``: the default of 0.2: the edit loss on the plain
  prompt and rephrase, the instruction prefixing the prompt whose gradient the editor sees;
- ``instructed, conditioned``: the editor reads the plain prompt's gradient and the
  instruction enters as its embedding, scaling and shifting the editor's features
  (``--instruction-input condition``);
- ``plain (MEND)``: the editor trained with ``--no-instructions``;

each evaluated with ``--queries plain`` (what a user asks) and ``--queries instructed``.

Usage: .venv/bin/python benchmarks/edit_instructions.py [--seeds 0 1 2]
Writes benchmarks/results/edit_instructions.{json,md}. Editors are kept in
runs/bench/edit_instructions (and reused from runs/bench/edit_methods*, where
edit_methods.py trained the same settings, when there).
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
# the same settings, trained by edit_methods.py: 0.1's defaults, and 0.3's
EARLIER = {
    "instructed, instructed queries": Path("runs") / "bench" / "edit_methods" / "instructed",
    "instructed, plain queries (prefix)": Path("runs") / "bench" / "edit_methods-0.3" / "instructed",
    "instructed, conditioned": Path("runs") / "bench" / "edit_methods-conditioned" / "instructed",
    "plain (MEND)": Path("runs") / "bench" / "edit_methods-0.3" / "plain",
}
TRAINED = ("counterfact", "recent", "convsent")
VARIANTS = {
    "instructed, instructed queries": ("--instructed-queries",),
    "instructed, plain queries (prefix)": ("--instruction-input", "prefix"),
    "instructed, conditioned": ("--instruction-input", "condition"),
    "plain (MEND)": ("--no-instructions",),
}


def kvtool(*args: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "kedit_vfl", *args, "--json", "--quiet"], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"kvtool {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout)


def editor_for(variant: str, seed: int) -> Path:
    earlier = (
        EARLIER[variant].with_name(f"{EARLIER[variant].name}-{seed}.safetensors")
        if variant in EARLIER
        else None
    )
    if earlier is not None and earlier.exists():
        return earlier
    slug = "".join(c if c.isalnum() else "-" for c in variant).strip("-")
    path = EDITORS / f"{slug}-{seed}.safetensors"
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
