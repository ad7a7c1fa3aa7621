"""VFed-SSD quality benchmark: AUC and log loss of VFed-SSD and its baselines over seeds.

For a fully labelled table pair (every user with both parties' features), each seed
draws a test split, then, among the training users and independently of each other,
which the publisher also holds (``--overlap``) and which carry a label
(``--labelled``). The test users keep the same overlap share, so federated mode
falls back to a local score on the others. Rows:

- local only: the active party alone, on its labelled rows;
- vanilla VFL: towers + top model on the labelled overlapped rows, from scratch, no
  auxiliary loss, no self-training (federated; rows the publisher lacks use the
  local-only model), trained at train-split's default batch size and at 64; the
  better of the two (mean test AUC over the seeds) is the baseline the gain is measured
  against, so a batch size that suits VFed-SSD cannot weaken it;
- VFed-SSD federated / local: MPD -> split model (with its self-training round) ->
  SplitKD student;
- ablation, no MPD: the same without pretraining;
- ablation, split local branch without distillation: ``l_L(h_A)`` of the split model;
- pooled ceiling: all features, all labels, every row federated (no privacy).

Run: .venv/bin/python benchmarks/vfl_quality.py --dataset give_credit --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kedit_vfl.vfl.config import DistillConfig, MPDConfig, ScoreConfig, SplitConfig  # noqa: E402
from kedit_vfl.vfl.data.demo import DemoConfig, generate  # noqa: E402
from kedit_vfl.vfl.data.read import read_table  # noqa: E402
from kedit_vfl.vfl.serving.score import score  # noqa: E402
from kedit_vfl.vfl.stages.distill import distill  # noqa: E402
from kedit_vfl.vfl.stages.mpd import pretrain_mpd  # noqa: E402
from kedit_vfl.vfl.stages.split import train_split  # noqa: E402

SHARED = Path(os.environ.get("KVTOOL_SHARED_VFL", ROOT.parent / "shared" / "data" / "vfl"))
PRESETS = {
    "embedded": {"label_col": "y", "categorical": ""},
    "give_credit": {
        "table": SHARED / "give_credit_homo_test.csv",
        "label_col": "y",
        "features_active": "x0,x1,x2,x3,x4",
        "features_passive": "x5,x6,x7,x8,x9",
        "categorical": "",
    },
    "default_credit": {  # reserved for acceptance: run it only to report, never to tune
        "active": SHARED / "default_credit_hetero_guest.csv",
        "passive": SHARED / "default_credit_hetero_host.csv",
        "label_col": "y",
        "categorical": "",
    },
    "movie_lens": {
        "active": SHARED / "movie_lens_hetero_guest.csv",
        "passive": SHARED / "movie_lens_hetero_host.csv",
        "label_col": "label",
        "categorical": "uid,mid",
    },
}
VANILLA_BATCHES = sorted({SplitConfig.batch_size, 64})
METHODS = [
    ("local only", "local"),
    *((f"vanilla VFL, batch {b}", "federated") for b in VANILLA_BATCHES),
    ("vanilla VFL", "federated"),
    ("VFed-SSD", "local"),
    ("VFed-SSD", "federated"),
    ("ablation: no MPD", "local"),
    ("ablation: no MPD", "federated"),
    ("ablation: split local branch, no distillation", "local"),
    ("pooled ceiling (no privacy)", "federated"),
]


def full_tables(args: argparse.Namespace) -> tuple[pa.Table, pa.Table]:
    """The fully labelled active table and the passive table for every user."""
    if args.dataset == "embedded":
        tables = generate(DemoConfig(overlap=1.0, labelled=1.0))
        active = pa.concat_tables([tables["active_train.csv"], tables["active_test.csv"]])
        passive = pa.concat_tables([tables["passive_train.csv"], tables["passive_test.csv"]])
        return active, passive
    if args.table:
        table = read_table(args.table)
        fa, fp = args.features_active.split(","), args.features_passive.split(",")
        return table.select([args.id_col, args.label_col, *fa]), table.select([args.id_col, *fp])
    return read_table(args.active), read_table(args.passive)


def draw_split(
    active: pa.Table, passive: pa.Table, args: argparse.Namespace, seed: int, folder: Path
) -> dict:
    """Write one seed's tables: train/test, overlapped, labelled; and the pooled versions."""
    rng = np.random.default_rng(1000 + seed)
    ids = pc.cast(active[args.id_col], pa.string())
    passive = passive.set_column(
        passive.column_names.index(args.id_col), args.id_col, pc.cast(passive[args.id_col], pa.string())
    )
    active = active.set_column(active.column_names.index(args.id_col), args.id_col, ids)
    n = active.num_rows
    test = rng.random(n) < args.test_fraction
    overlap = rng.random(n) < args.overlap
    labelled = rng.random(n) < args.labelled
    label_index = active.column_names.index(args.label_col)
    y = pc.cast(active[args.label_col], pa.float64()).to_numpy(zero_copy_only=False)
    masked = pa.array(y, mask=~(labelled | test))

    def passive_for(rows: np.ndarray) -> pa.Table:
        keep = pc.is_in(passive[args.id_col], value_set=pa.concat_arrays(ids.filter(pa.array(rows)).chunks))
        return passive.filter(keep)

    paths = {}
    tables = {
        "active_train": active.set_column(label_index, args.label_col, masked).filter(pa.array(~test)),
        "passive_train": passive_for(~test & overlap),
        "active_test": active.filter(pa.array(test)),
        "passive_test": passive_for(test & overlap),
        "pooled_active_train": active.filter(pa.array(~test)),
        "pooled_passive_train": passive_for(~test),
        "pooled_passive_test": passive_for(test),
    }
    for name, table in tables.items():
        paths[name] = folder / f"{name}.parquet"
        pq.write_table(table, paths[name])
    return paths


def run_seed(args: argparse.Namespace, paths: dict, seed: int, folder: Path) -> dict[tuple[str, str], dict]:
    common = dict(
        active=paths["active_train"],
        passive=paths["passive_train"],
        id_col=args.id_col,
        label_col=args.label_col,
        categorical=tuple(c for c in args.categorical.split(",") if c),
        seed=seed,
        device="cpu",
    )
    if args.table:
        common["features_active"] = tuple(args.features_active.split(","))
        common["features_passive"] = tuple(args.features_passive.split(","))
    test = dict(active=paths["active_test"], id_col=args.id_col, label_col=args.label_col, device="cpu")
    out = {}

    def evaluate(
        name: str, mode: str, model: Path, fallback: Path | None = None, passive: Path | None = None
    ):
        config = ScoreConfig(
            model=model, mode=mode, fallback=fallback, out=folder / "scores.csv",
            passive=passive or (paths["passive_test"] if mode == "federated" else None), **test,
        )  # fmt: skip
        out[(name, mode)] = score(config)

    local_only = folder / "local_only.safetensors"
    distill(DistillConfig(**common, teacher=None, kd_weight=0.0, out=local_only))
    evaluate("local only", "local", local_only)

    for batch in VANILLA_BATCHES:  # the baseline at train-split's default batch size and at 64
        vanilla = folder / f"vanilla_{batch}.safetensors"
        train_split(
            SplitConfig(
                **common,
                aux_weight=0.0,
                self_train_weight=0.0,
                local_first=False,
                batch_size=batch,
                out=vanilla,
            )
        )
        evaluate(f"vanilla VFL, batch {batch}", "federated", vanilla, fallback=local_only)

    mpd = folder / "mpd.safetensors"
    pretrain_mpd(MPDConfig(**common, objective=args.objective, negatives=args.negatives, out=mpd))
    arms = {
        "VFed-SSD": dict(init=mpd, mpd_weight=args.mpd_weight, init_lr_scale=args.init_lr_scale),
        "ablation: no MPD": dict(init=None),
    }
    for name, options in arms.items():
        split = folder / f"split_{len(out)}.safetensors"
        student = folder / f"student_{len(out)}.safetensors"
        train_split(
            SplitConfig(
                **common,
                aux_weight=args.aux_weight,
                self_train_weight=args.self_train_weight,
                out=split,
                **options,
            )
        )
        distill(
            DistillConfig(
                **common,
                teacher=split,
                kd_weight=args.kd_weight,
                temperature=args.temperature,
                kd_local_rows=args.kd_local_rows,
                out=student,
            )
        )
        evaluate(name, "local", student)
        evaluate(name, "federated", split, fallback=student)
        if name == "VFed-SSD":
            evaluate("ablation: split local branch, no distillation", "local", split)

    if args.no_ceiling:
        return out
    pooled = folder / "pooled.safetensors"
    pooled_common = replace_paths(common, paths["pooled_active_train"], paths["pooled_passive_train"])
    train_split(
        SplitConfig(**pooled_common, aux_weight=0.0, self_train_weight=0.0, local_first=False, out=pooled)
    )
    evaluate("pooled ceiling (no privacy)", "federated", pooled, passive=paths["pooled_passive_test"])
    return out


def replace_paths(common: dict, active: Path, passive: Path) -> dict:
    return {**common, "active": active, "passive": passive}


def summarise(results: list[dict], args: argparse.Namespace, seconds: float) -> str:
    if all(("vanilla VFL", "federated") not in r for r in results):  # the stronger vanilla run
        versions = [n for n, m in METHODS if n.startswith("vanilla VFL, ") and (n, m) in results[0]]
        best = max(versions, key=lambda n: np.mean([r[(n, "federated")]["auc"] for r in results]))
        args.vanilla_best = best
        for r in results:
            r[("vanilla VFL", "federated")] = r[(best, "federated")]

    def stats(name: str, mode: str, key: str) -> tuple[float, float]:
        values = np.array([r[(name, mode)][key] for r in results], dtype=float)
        return float(values.mean()), float(values.std())

    lines = [
        f"### {args.dataset}: overlap {args.overlap}, labelled {args.labelled}, seeds {args.seeds}",
        "",
        "| method | mode | AUC (mean ± std) | log loss (mean ± std) |",
        "| --- | --- | --- | --- |",
    ]
    for name, mode in METHODS:
        if (name, mode) not in results[0]:
            continue
        auc, auc_sd = stats(name, mode, "auc")
        ll, ll_sd = stats(name, mode, "logloss")
        lines.append(f"| {name} | {mode} | {auc:.4f} ± {auc_sd:.4f} | {ll:.4f} ± {ll_sd:.4f} |")
    gain_local = stats("VFed-SSD", "local", "auc")[0] / stats("local only", "local", "auc")[0] - 1
    gain_fed = stats("VFed-SSD", "federated", "auc")[0] / stats("vanilla VFL", "federated", "auc")[0] - 1
    no_mpd_local = stats("ablation: no MPD", "local", "auc")[0] / stats("local only", "local", "auc")[0] - 1
    no_mpd_fed = (
        stats("ablation: no MPD", "federated", "auc")[0] / stats("vanilla VFL", "federated", "auc")[0] - 1
    )
    lines += [
        "",
        f"Relative AUC gain, local mode vs local only: **{gain_local:+.2%}** (no MPD: {no_mpd_local:+.2%}); "
        f"federated mode vs vanilla VFL: **{gain_fed:+.2%}** (no MPD: {no_mpd_fed:+.2%}). "
        f"Paper's median: +0.86% / +2.6%.",
        "",
        f"Vanilla VFL = {getattr(args, 'vanilla_best', 'vanilla VFL')} (the better of its runs).",
        "",
        f"Settings: {settings(args)}; {seconds:.0f} s on this machine.",
        "",
    ]
    return "\n".join(lines)


def settings(args: argparse.Namespace) -> str:
    keys = (
        "objective", "negatives", "mpd_weight", "init_lr_scale", "aux_weight", "self_train_weight",
        "kd_weight", "temperature", "kd_local_rows",
    )  # fmt: skip
    return ", ".join(f"{k}={getattr(args, k)}" for k in keys)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="embedded", help="embedded, give_credit, movie_lens or a name")
    parser.add_argument("--table", type=Path, help="one table holding both parties' columns")
    parser.add_argument("--active", type=Path, help="active table (with --passive)")
    parser.add_argument("--passive", type=Path)
    parser.add_argument("--id-col", default="id")
    parser.add_argument("--label-col")
    parser.add_argument("--features-active", help="with --table: comma-separated active columns")
    parser.add_argument("--features-passive", help="with --table: comma-separated passive columns")
    parser.add_argument("--categorical")
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--labelled", type=float, default=0.1)
    parser.add_argument("--test-fraction", type=float, default=0.3)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--objective", default=MPDConfig.objective)
    parser.add_argument("--negatives", type=int, default=MPDConfig.negatives)
    parser.add_argument("--mpd-weight", type=float, default=SplitConfig.mpd_weight)
    parser.add_argument("--init-lr-scale", type=float, default=SplitConfig.init_lr_scale)
    parser.add_argument("--aux-weight", type=float, default=SplitConfig.aux_weight)
    parser.add_argument("--self-train-weight", type=float, default=SplitConfig.self_train_weight)
    parser.add_argument("--kd-weight", type=float, default=DistillConfig.kd_weight)
    parser.add_argument("--temperature", type=float, default=DistillConfig.temperature)
    parser.add_argument(
        "--kd-local-rows", action="store_true", help="distil the local branch on active-only rows"
    )
    parser.add_argument("--no-ceiling", action="store_true", help="skip the pooled ceiling (quicker sweeps)")
    parser.add_argument(
        "--out", type=Path, help="markdown file [default: benchmarks/results/vfl_quality_NAME.md]"
    )
    parser.add_argument("--raw", type=Path, help="also write the per-seed results as JSON here")
    parser.add_argument(
        "--merge", type=Path, nargs="*", help="summarise earlier --raw files instead of running"
    )
    args = parser.parse_args()
    for key, value in PRESETS.get(args.dataset, {}).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.label_col = args.label_col or "y"
    args.categorical = args.categorical or ""
    start = time.perf_counter()
    if args.merge:
        raw = [json.loads(path.read_text()) for path in args.merge]
        args.seeds = ",".join(str(r["seed"]) for run in raw for r in run["results"])
        results = [
            {tuple(k.split("|")): v for k, v in r["metrics"].items()} for run in raw for r in run["results"]
        ]
        write_report(summarise(results, args, sum(run["seconds"] for run in raw)), args)
        return
    active, passive = full_tables(args)
    results = []
    for seed in (int(s) for s in args.seeds.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            paths = draw_split(active, passive, args, seed, Path(tmp))
            result = run_seed(args, paths, seed, Path(tmp))
            results.append(result)
            brief = {f"{k[0]}/{k[1]}": round(v["auc"], 4) for k, v in result.items()}
            print(json.dumps({"seed": seed, **brief}), file=sys.stderr, flush=True)
    seconds = time.perf_counter() - start
    if args.raw:
        seeds = [int(s) for s in args.seeds.split(",")]
        runs = [
            {"seed": seed, "metrics": {"|".join(k): v for k, v in r.items()}}
            for seed, r in zip(seeds, results, strict=True)
        ]
        args.raw.write_text(json.dumps({"seconds": seconds, "results": runs}))
    write_report(summarise(results, args, seconds), args)


def write_report(report: str, args: argparse.Namespace) -> None:
    out = args.out or ROOT / "benchmarks" / "results" / f"vfl_quality_{args.dataset}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    print(report)


if __name__ == "__main__":
    main()
