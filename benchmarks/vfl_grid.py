"""VFed-SSD against what a practitioner would otherwise run, over a grid of settings.

For every data set, feature split, overlap share, labelled share and seed, one run draws
a 70/30 train/test split of the users, then among the training users, independently,
which the publisher also holds (overlap) and which carry a label; the test users keep
the same overlap share. Every model is scored on the same test rows, in its mode:

local mode (the advertiser serves alone; competitors trained on its labelled rows):
  kvtool's local-only MLP (``vfl train-local``), a standard-scaled logistic regression,
  a HistGradientBoosting classifier; against VFed-SSD's distilled student.
federated mode (test rows the publisher holds use both parties' features, the others
fall back to the same family's local model):
  vanilla VFL (``train-split`` with no auxiliary loss and no self-training, fallback
  ``train-local``), logistic regression and HistGradientBoosting on the pooled labelled
  overlap (what FATE's hetero logistic regression and SecureBoost, both lossless,
  reach privately on the same rows); against VFed-SSD's split model with its student
  as fallback.
ceiling: HistGradientBoosting on every training row, every label, both parties'
  features (no privacy).

Feature splits: ``given`` is the data set's own (or, for one-table data sets, the
documented one below); ``informative-passive`` gives the publisher the features with the
highest mutual information with the label (as many as it holds in the given split), the
extreme of VertiBench's importance-based splits. VertiBench's splitter itself draws the
shares at random and pulls in shap, pymoo and matplotlib, so the ranking is done here.

Every kvtool model runs with the command-line defaults (the config dataclasses); the
scikit-learn models with scikit-learn's defaults (LR: C=1 after StandardScaler on the
numbers and one-hot categories; GBDT: HistGradientBoostingClassifier as it comes).
Runs are appended to a JSON Lines file as they finish, so an interrupted grid resumes.

Run: .venv/bin/python benchmarks/vfl_grid.py            (the full grid, hours on 2 cores)
     .venv/bin/python benchmarks/vfl_grid.py --datasets give_credit --labelled 0.02 \
         --overlaps 0.3,0.6 --seeds 0 --out /tmp/grid.md   (a reduced grid)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHARED = Path(os.environ.get("KVTOOL_SHARED_VFL", ROOT.parent / "shared" / "data" / "vfl"))
RESULTS = ROOT / "benchmarks" / "results"
DATASETS = ("give_credit", "default_credit", "movie_lens", "adult")
SPLITS = ("given", "informative-passive")
LOCAL_COMPETITORS = ("local MLP", "local LR", "local GBDT")
FEDERATED_COMPETITORS = ("vanilla VFL", "pooled LR", "pooled GBDT")
ADULT_ACTIVE = (  # what an ad platform knows of a user
    "age", "sex", "race", "native_country", "education", "education_num", "hours_per_week",
)  # fmt: skip
ADULT_PASSIVE = (  # what a financial or household publisher knows
    "workclass", "fnlwgt", "marital_status", "occupation", "relationship", "capital_gain", "capital_loss",
)  # fmt: skip


@dataclass
class Dataset:
    """Both parties' columns of every user, fully labelled, and the given feature split."""

    name: str
    frame: pd.DataFrame  # id (str), y (0/1), every feature
    active: tuple[str, ...]
    passive: tuple[str, ...]
    categorical: tuple[str, ...]


def load_dataset(name: str) -> Dataset:
    if name == "give_credit":
        frame = pd.read_csv(SHARED / "give_credit_homo_test.csv")
        return _dataset(
            name, frame, tuple(f"x{i}" for i in range(5)), tuple(f"x{i}" for i in range(5, 10)), ()
        )
    if name == "default_credit":
        guest = pd.read_csv(SHARED / "default_credit_hetero_guest.csv")
        host = pd.read_csv(SHARED / "default_credit_hetero_host.csv")
        host = host.rename(columns={c: f"host_{c}" for c in host.columns if c != "id"})
        frame = guest.merge(host, on="id")
        active = tuple(c for c in guest.columns if c not in ("id", "y"))
        return _dataset(name, frame, active, tuple(c for c in host.columns if c != "id"), ())
    if name == "movie_lens":
        guest = pd.read_csv(SHARED / "movie_lens_hetero_guest.csv").rename(columns={"label": "y"})
        host = pd.read_csv(SHARED / "movie_lens_hetero_host.csv")
        frame = guest.merge(host, on="id")
        genres = tuple(c for c in host.columns if c != "id")
        return _dataset(name, frame, ("uid", "mid"), genres, ("uid", "mid"))
    if name == "adult":
        frame = pd.read_csv(SHARED / "adult.csv")
        categorical = tuple(c for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c]))
        return _dataset(name, frame, ADULT_ACTIVE, ADULT_PASSIVE, categorical)
    raise SystemExit(f"unknown data set {name!r}: expected one of {', '.join(DATASETS)}")


def _dataset(name: str, frame: pd.DataFrame, active: tuple, passive: tuple, categorical: tuple) -> Dataset:
    frame = frame.copy()
    frame["id"] = frame["id"].astype(str)
    frame["y"] = frame["y"].astype(int)
    for column in categorical:
        frame[column] = frame[column].astype("string")
    return Dataset(name, frame, tuple(active), tuple(passive), tuple(categorical))


def informative_passive(data: Dataset) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(active, passive) with the publisher holding the features most informative of the label.

    Mutual information with the label (categories as codes, discrete), on the whole table:
    the split defines the scenario, no model is tuned on it. The publisher gets as many
    features as in the given split, but at most half of them: the advertiser keeps at
    least half (movie_lens's given split leaves it 2 of 12, which with the most
    informative gone are two all-zero genre columns: a scenario with nothing to compare).
    """
    from sklearn.feature_selection import mutual_info_classif

    features = [*data.active, *data.passive]
    matrix = np.column_stack(
        [
            data.frame[c].astype("category").cat.codes.to_numpy()
            if c in data.categorical
            else data.frame[c].fillna(data.frame[c].median()).to_numpy(dtype=float)
            for c in features
        ]
    )
    discrete = [c in data.categorical for c in features]
    info = mutual_info_classif(matrix, data.frame["y"].to_numpy(), discrete_features=discrete, random_state=0)
    ranked = [features[i] for i in np.argsort(-info, kind="stable")]
    passive = tuple(ranked[: min(len(data.passive), len(features) // 2)])
    return tuple(c for c in features if c not in passive), passive


@dataclass(frozen=True)
class Cell:
    dataset: str
    split: str
    overlap: float
    labelled: float

    @property
    def key(self) -> str:
        return f"{self.dataset}|{self.split}|{self.overlap}|{self.labelled}"


def draw(n: int, cell: Cell, seed: int, test_fraction: float = 0.3) -> dict[str, np.ndarray]:
    """Per-row masks of one run: test, overlapped (publisher holds it), labelled (training only)."""
    rng = np.random.default_rng(1000 + seed)
    test = rng.random(n) < test_fraction
    overlap = rng.random(n) < cell.overlap
    labelled = (rng.random(n) < cell.labelled) & ~test
    return {"test": test, "overlap": overlap, "labelled": labelled}


def run_one(
    cell: Cell,
    seed: int,
    development: bool = False,
    overrides: dict | None = None,
    defence: dict | None = None,
) -> dict[str, Any]:
    """Every model of one run; AUC, log loss and score spread per model.

    ``development``: the run's real test rows are dropped and a test split is drawn from
    the rest, so that settings compared this way never see the rows the grid reports on.
    ``overrides``: config fields set in every kvtool config that has them; ``defence``:
    fields set in VFed-SSD's ``train-split`` only (the label-leakage defences).
    """
    data = load_dataset(cell.dataset)
    active, passive = (data.active, data.passive) if cell.split == "given" else informative_passive(data)
    if development:
        kept = ~draw(len(data.frame), cell, seed)["test"]
        frame = data.frame[kept].reset_index(drop=True)
        data = Dataset(data.name, frame, data.active, data.passive, data.categorical)
        seed_draw = seed + 500
    else:
        seed_draw = seed
    masks = draw(len(data.frame), cell, seed_draw)
    start = time.perf_counter()
    results = sklearn_models(data, active, passive, masks, seed)
    with tempfile.TemporaryDirectory() as tmp:
        ours, leaked = kvtool_models(
            data, active, passive, masks, seed, Path(tmp), overrides or {}, defence or {}
        )
        results.update(ours)
    return {
        "cell": cell.key,
        "seed": seed,
        "active": list(active),
        "passive": list(passive),
        "seconds": round(time.perf_counter() - start, 1),
        "rows": {k: int(v.sum()) for k, v in masks.items()},
        "models": results,
        "label_leakage": leaked,
    }


def metrics_of(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import log_loss, roc_auc_score

    scores = np.clip(np.asarray(scores, dtype=float), 1e-7, 1 - 1e-7)
    return {
        "auc": float(roc_auc_score(labels, scores)),
        "logloss": float(log_loss(labels, scores, labels=[0, 1])),
        "score_std": float(scores.std()),
    }


def sklearn_models(
    data: Dataset, active: tuple, passive: tuple, masks: dict, seed: int
) -> dict[str, dict[str, float]]:
    frame, y = data.frame, data.frame["y"].to_numpy()
    test, labelled, overlap = masks["test"], masks["labelled"], masks["overlap"]
    y_test = y[test]
    out = {}
    every = (*active, *passive)
    for family in ("LR", "GBDT"):
        local = fitted(family, frame.loc[labelled, list(active)], y[labelled], data.categorical, seed)
        local_scores = local.predict_proba(frame.loc[test, list(active)])[:, 1]
        out[f"local {family}"] = metrics_of(y_test, local_scores)
        pooled_rows = labelled & overlap
        pooled = fitted(family, frame.loc[pooled_rows, list(every)], y[pooled_rows], data.categorical, seed)
        mixed = local_scores.copy()
        served = overlap[test]
        mixed[served] = pooled.predict_proba(frame.loc[test & overlap, list(every)])[:, 1]
        out[f"pooled {family}"] = metrics_of(y_test, mixed)
    ceiling = fitted("GBDT", frame.loc[~test, list(every)], y[~test], data.categorical, seed)
    out["ceiling GBDT"] = metrics_of(y_test, ceiling.predict_proba(frame.loc[test, list(every)])[:, 1])
    return out


def fitted(family: str, features: pd.DataFrame, labels: np.ndarray, categorical: tuple, seed: int):
    """A scikit-learn pipeline at its defaults: scaled LR (one-hot categories) or HistGBDT.

    GBDT takes categories natively where they have at most 250 levels (its limit is the
    bin count), else as ordinal codes.
    """
    from sklearn.compose import ColumnTransformer
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, OrdinalEncoder, StandardScaler

    cats = [c for c in features.columns if c in categorical]
    nums = [c for c in features.columns if c not in categorical]
    features = features.astype({c: object for c in cats})
    for c in cats:
        features[c] = features[c].where(features[c].notna(), "(missing)")
    if family == "LR":
        prepare = ColumnTransformer(
            [
                ("num", make_pipeline(SimpleImputer(), StandardScaler()), nums),
                ("cat", OneHotEncoder(handle_unknown="ignore"), cats),
            ]
        )
        model = make_pipeline(prepare, LogisticRegression(max_iter=2000))
    else:
        native = [c for c in cats if features[c].nunique() <= 250]
        prepare = ColumnTransformer(
            [
                ("num", "passthrough", nums),
                (
                    "cat",
                    OrdinalEncoder(handle_unknown="use_encoded_value", unknown_value=np.nan),
                    cats,
                ),
            ]
        )
        flags = [False] * len(nums) + [c in native for c in cats]
        model = make_pipeline(
            prepare, HistGradientBoostingClassifier(categorical_features=flags or None, random_state=seed)
        )
    model.fit(features, labels)
    return _CategoriesAsObject(model, cats)


class _CategoriesAsObject:
    """The fitted pipeline, with test rows' categories prepared as in training."""

    def __init__(self, model: Any, cats: list[str]) -> None:
        self.model, self.cats = model, cats

    def predict_proba(self, features: pd.DataFrame) -> np.ndarray:
        features = features.astype({c: object for c in self.cats})
        for c in self.cats:
            features[c] = features[c].where(features[c].notna(), "(missing)")
        return self.model.predict_proba(features)


def kvtool_models(
    data: Dataset,
    active: tuple,
    passive: tuple,
    masks: dict,
    seed: int,
    folder: Path,
    overrides: dict,
    defence: dict,
) -> tuple[dict[str, dict[str, float]], dict]:
    """kvtool's models at the command-line defaults (or ``overrides``), through its Python
    API, and the label-leakage audit of VFed-SSD's split training (with ``defence``)."""
    from kedit_vfl.vfl.config import (
        DistillConfig,
        LocalConfig,
        ModelConfig,
        MPDConfig,
        ScoreConfig,
        SplitConfig,
    )
    from kedit_vfl.vfl.serving.score import score
    from kedit_vfl.vfl.stages.distill import distill
    from kedit_vfl.vfl.stages.mpd import pretrain_mpd
    from kedit_vfl.vfl.stages.split import train_split

    frame = data.frame
    test, labelled, overlap = masks["test"], masks["labelled"], masks["overlap"]
    active_train = frame.loc[~test, ["id", "y", *active]].copy()
    active_train["y"] = active_train["y"].where(labelled[~test]).astype("Float64")
    tables = {
        "active_train": active_train,
        "passive_train": frame.loc[~test & overlap, ["id", *passive]],
        "active_test": frame.loc[test, ["id", "y", *active]],
        "passive_test": frame.loc[test & overlap, ["id", *passive]],
    }
    paths = {}
    for name, table in tables.items():
        paths[name] = folder / f"{name}.parquet"
        table.to_parquet(paths[name], index=False)
    categorical = tuple(c for c in data.categorical if c in (*active, *passive))
    common = dict(
        active=paths["active_train"],
        passive=paths["passive_train"],
        categorical=categorical,
        seed=seed,
        device="cpu",
    )
    y_test = frame.loc[test, "y"].to_numpy()
    out = {}

    def configured(cls: type, **fields: Any) -> Any:
        known = cls.__dataclass_fields__
        own = {"teacher", "kd_weight"} if cls is LocalConfig else set()  # train-local has no teacher
        extra = {k: v for k, v in overrides.items() if k in known and k not in fields and k not in own}
        if "model" in known and any(k in ModelConfig.__dataclass_fields__ for k in overrides):
            sizes = {k: v for k, v in overrides.items() if k in ModelConfig.__dataclass_fields__}
            extra["model"] = ModelConfig(**sizes)
        return cls(**fields, **extra)

    def evaluate(name: str, mode: str, model: Path, fallback: Path | None = None) -> None:
        scores = folder / "scores.csv"
        score(
            ScoreConfig(
                model=model,
                mode=mode,
                fallback=fallback,
                active=paths["active_test"],
                passive=paths["passive_test"] if mode == "federated" else None,
                out=scores,
                device="cpu",
            )
        )
        scored = pd.read_csv(scores, dtype={"id": str}).set_index("id")["score"]
        out[name] = metrics_of(y_test, scored.loc[frame.loc[test, "id"]].to_numpy())

    own = folder / "own.safetensors"
    distill(configured(LocalConfig, **{k: v for k, v in common.items() if k != "passive"}, out=own))
    evaluate("local MLP", "local", own)
    vanilla = folder / "vanilla.safetensors"
    vanilla_options = dict(aux_weight=0.0, self_train_weight=0.0, local_first=False)
    train_split(configured(SplitConfig, **common, **vanilla_options, out=vanilla))
    evaluate("vanilla VFL", "federated", vanilla, fallback=own)
    mpd, split, student = (folder / f"{n}.safetensors" for n in ("mpd", "split", "student"))
    pretrain_mpd(configured(MPDConfig, **common, out=mpd))
    split_config = configured(SplitConfig, **common, init=mpd, out=split, audit=True, **defence)
    _, trained = train_split(split_config, price_defence=False)  # the grid runs "none" itself
    distill(configured(DistillConfig, **common, teacher=split, out=student))
    evaluate("VFed-SSD local", "local", student)
    evaluate("VFed-SSD federated", "federated", split, fallback=student)
    return out, trained["label_leakage"]


def summarise(runs: list[dict], cells: list[Cell]) -> str:
    """The markdown tables: one row per cell, mean ± std over seeds, gains, and the totals."""
    by_cell: dict[str, list[dict]] = {}
    for run in runs:
        by_cell.setdefault(run["cell"], []).append(run)

    def stat(group: list[dict], model: str) -> tuple[float, float]:
        values = np.array([r["models"][model]["auc"] for r in group])
        return float(values.mean()), float(values.std())

    local_gains, fed_gains, spreads, lines_local, lines_fed = [], [], [], [], []
    constant = [
        f"{r['cell']} seed {r['seed']}: {m}"
        for r in runs
        for m, v in r["models"].items()
        if v["score_std"] < 1e-4
    ]
    for cell in cells:
        group = by_cell.get(cell.key)
        if not group:
            continue
        seeds = len(group)
        head = f"| {cell.dataset} | {cell.split} | {cell.overlap} | {cell.labelled} | {seeds} |"
        for mode, competitors, ours, gains, lines in (
            ("local", LOCAL_COMPETITORS, "VFed-SSD local", local_gains, lines_local),
            ("federated", FEDERATED_COMPETITORS, "VFed-SSD federated", fed_gains, lines_fed),
        ):
            cols = [stat(group, m) for m in (*competitors, ours)]
            best = max(range(len(competitors)), key=lambda i: cols[i][0])
            gain = cols[-1][0] / cols[best][0] - 1
            gains.append((gain, cell))
            spreads.append((cols[-1][1], f"{cell.key} {mode}"))
            text = [f"{m:.4f} ± {s:.4f}" for m, s in cols]
            text[best] = f"**{text[best]}**"
            ceiling = stat(group, "ceiling GBDT")[0]
            lines.append(f"{head} {' | '.join(text)} | {gain:+.2%} | {ceiling:.4f} |")

    def verdict(gains: list, target: float) -> str:
        values = np.array([g for g, _ in gains])
        worst = min(gains, key=lambda g: g[0])
        below = sum(v < -0.01 for v in values)
        text = (
            f"median gain **{np.median(values):+.2%}** (target ≥ {target:+.0%}); worst {worst[0]:+.2%} "
            f"({worst[1].key}); cells more than 1% below the best competitor: {below} of {len(values)}"
        )
        splits = sorted({cell.split for _, cell in gains})
        if len(splits) > 1:
            for split in splits:
                part = np.array([g for g, cell in gains if cell.split == split])
                text += (
                    f"; {split} split: median {np.median(part):+.2%}, "
                    f"{sum(v < -0.01 for v in part)} of {len(part)} more than 1% below"
                )
        return text

    header = "| data set | split | overlap | labelled | seeds |"
    out = [
        "## Local mode (the advertiser serves alone)",
        "",
        f"{header} local MLP | scaled LR | GBDT | VFed-SSD | gain vs best | ceiling |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *lines_local,
        "",
        f"Local mode: {verdict(local_gains, 0.01)}." if local_gains else "",
        "",
        "## Federated mode (the publisher's features where it holds the user)",
        "",
        f"{header} vanilla VFL | pooled LR | pooled GBDT | VFed-SSD | gain vs best | ceiling |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *lines_fed,
        "",
        f"Federated mode: {verdict(fed_gains, 0.02)}." if fed_gains else "",
        "",
    ]
    if spreads:
        worst = max(spreads)
        over = sum(s > 0.02 for s, _ in spreads)
        out.append(
            f"Seed spread of VFed-SSD (std of AUC): largest {worst[0]:.4f} ({worst[1]}); "
            f"above 0.02 in {over} of {len(spreads)} cell-modes."
        )
    audited = [r["label_leakage"] for r in runs if r.get("label_leakage") is not None]
    if audited:
        crossed = [a["accumulated"] for a in audited if a["rows"]]
        worst = max(crossed) if crossed else None
        out.append(
            "Label leakage of VFed-SSD's split training (the best attack's AUC on each row's gradients "
            f"summed over the run): median {np.median(crossed) if crossed else float('nan'):.3f}, "
            f"worst {worst if worst is not None else float('nan'):.3f} over {len(crossed)} runs; "
            f"no gradient crossed at all in {len(audited) - len(crossed)} of {len(audited)} runs."
        )
    ours = [c for c in constant if "VFed-SSD" in c]
    out.append(
        f"Runs with constant scores (std of the scores < 1e-4): VFed-SSD {len(ours)}"
        + (f" ({'; '.join(ours[:5])})" if ours else "")
        + f", competitors {len(constant) - len(ours)}."
    )
    return "\n".join(out) + "\n"


def defence_fields(text: str) -> dict[str, Any]:
    """``--defence`` as the SplitConfig fields it sets (default: the command line's)."""
    if text == "default":
        return {}
    if text == "none":
        return {"freeze_passive": False}
    if text == "freeze-passive":
        return {"freeze_passive": True}
    if text.startswith("calibrated-noise="):
        return {"freeze_passive": False, "noise_multiplier": float(text.split("=", 1)[1])}
    if text.startswith("label-epsilon="):
        return {"freeze_passive": False, "label_epsilon": float(text.split("=", 1)[1])}
    raise SystemExit(
        f"--defence {text!r}: expected default, none, freeze-passive, calibrated-noise=Z or label-epsilon=EPS"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--splits", default=",".join(SPLITS))
    parser.add_argument("--overlaps", default="0.3,0.6")
    parser.add_argument("--labelled", default="0.02,0.05,0.2")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (each on one thread)")
    parser.add_argument("--out", type=Path, default=RESULTS / "vfl_grid.md")
    parser.add_argument("--runs", type=Path, help="JSON Lines of finished runs [default: OUT with .jsonl]")
    parser.add_argument("--summarise-only", action="store_true", help="tabulate the runs file, run nothing")
    parser.add_argument(
        "--development",
        action="store_true",
        help="test on rows drawn from each run's training users only (for choosing settings)",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE", help="override a kvtool config field"
    )
    parser.add_argument(
        "--defence",
        default="default",
        help="label-leakage defence for VFed-SSD's train-split: default, none (a trained publisher "
        "tower), freeze-passive, calibrated-noise=Z or label-epsilon=EPS",
    )
    args = parser.parse_args()
    overrides = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
    defence = defence_fields(args.defence)
    cells = [
        Cell(d, s, float(o), float(lab))
        for d in args.datasets.split(",")
        for s in args.splits.split(",")
        for o in args.overlaps.split(",")
        for lab in args.labelled.split(",")
    ]
    for name in {c.dataset for c in cells}:
        if name not in DATASETS:
            raise SystemExit(f"unknown data set {name!r}: expected one of {', '.join(DATASETS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    runs_path = args.runs or args.out.with_suffix(".jsonl")
    runs_path.parent.mkdir(parents=True, exist_ok=True)
    done = [json.loads(line) for line in runs_path.read_text().splitlines()] if runs_path.exists() else []
    have = {(r["cell"], r["seed"]) for r in done}
    todo = [(c, s) for c in cells for s in seeds if (c.key, s) not in have]
    if todo and not args.summarise_only:
        if args.jobs > 1:
            os.environ["OMP_NUM_THREADS"] = "1"  # one thread per run: the runs fill the cores
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            futures = {
                pool.submit(run_one, c, s, args.development, overrides, defence): (c, s) for c, s in todo
            }
            for future in as_completed(futures):
                try:
                    run = future.result()
                except Exception as error:  # one failed run is reported; the grid goes on
                    cell, seed = futures[future]
                    print(f"FAILED {cell.key} seed {seed}: {error!r}", file=sys.stderr, flush=True)
                    continue
                done.append(run)
                with runs_path.open("a") as stream:
                    stream.write(json.dumps(run) + "\n")
                brief = {m: round(v["auc"], 4) for m, v in run["models"].items()}
                print(json.dumps({"cell": run["cell"], "seed": run["seed"], **brief}), flush=True)
    wanted = {(c.key, s) for c in cells for s in seeds}
    report = summarise([r for r in done if (r["cell"], r["seed"]) in wanted], cells)
    chosen = [r for r in done if (r["cell"], r["seed"]) in wanted]
    compute = sum(r["seconds"] for r in chosen)
    report = (
        f"# VFed-SSD against practitioners' baselines\n\nAUC on the held-out 30% (mean ± std over seeds "
        f"{args.seeds}); the best competitor in bold. Produced by `benchmarks/vfl_grid.py`: "
        f"{len(chosen)} runs, {compute / 60:.0f} min of compute (one core per run).\n\n{report}"
    )
    args.out.write_text(report)
    print(report)


if __name__ == "__main__":
    main()
