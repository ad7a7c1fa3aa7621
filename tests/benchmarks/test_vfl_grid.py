"""The quality grid's script on a reduced grid: it runs, tabulates and resumes.

No quality assertion (that is the full grid's table); this checks that the script the
table comes from works, on one data set, two cells and one seed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODELS = {
    "local MLP", "local LR", "local GBDT", "VFed-SSD local",
    "vanilla VFL", "pooled LR", "pooled GBDT", "VFed-SSD federated", "ceiling GBDT",
}  # fmt: skip


def _grid(shared: Path, out: Path) -> subprocess.CompletedProcess:
    command = [
        sys.executable, str(ROOT / "benchmarks" / "vfl_grid.py"), "--datasets", "give_credit",
        "--splits", "given", "--overlaps", "0.3,0.6", "--labelled", "0.05", "--seeds", "0",
        "--jobs", "1", "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "KVTOOL_SHARED_VFL": str(shared / "data" / "vfl")}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


def test_a_reduced_grid_runs_every_model_and_resumes(shared_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "grid.md"
    done = _grid(shared_dir, out)
    assert done.returncode == 0, done.stderr[-2000:]
    runs = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert sorted(r["cell"] for r in runs) == ["give_credit|given|0.3|0.05", "give_credit|given|0.6|0.05"]
    for run in runs:
        assert set(run["models"]) == MODELS
        assert all(0.0 <= m["auc"] <= 1.0 and m["logloss"] > 0 for m in run["models"].values())
        assert run["rows"]["labelled"] > 0 and run["rows"]["test"] > 0
    table = out.read_text()
    assert table.count("| give_credit | given |") == 4  # two cells, in each mode's table
    assert "median gain" in table and "Seed spread" in table
    again = _grid(shared_dir, out)  # every run is on file: nothing runs again
    assert again.returncode == 0 and len(out.with_suffix(".jsonl").read_text().splitlines()) == 2
    assert '"seed"' not in again.stdout.split("# VFed-SSD")[0]
