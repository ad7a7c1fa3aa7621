"""A seeded CTR-like two-party data set, for the demo, the tests and larger experiments.

Every user has latent factors: some shared (seen, noisily, by both parties), some only
the advertiser sees, some only the publisher sees. The click depends on all three, so
the publisher's features carry real signal, and the shared factors are what Matched
Pair Detection can learn from unlabelled overlapped rows.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from kedit_vfl.errors import UserError
from kedit_vfl.paths import cache_dir, embedded_data_dir

FILES = ("active_train.csv", "passive_train.csv", "active_test.csv", "passive_test.csv")
DEFAULT_ROWS = 20_000
DEFAULT_SEED = 0


@dataclass(frozen=True)
class DemoConfig:
    """What ``kvtool vfl make-demo`` generates."""

    rows: int = DEFAULT_ROWS
    seed: int = DEFAULT_SEED
    overlap: float = 0.5
    labelled: float = 0.1
    test_fraction: float = 0.2
    passive_only: float = 0.1
    out: Path = Path("data/vfl")
    file_format: str = "csv"
    shard_rows: int = 1_000_000
    numeric_active: int = 6
    numeric_passive: int = 5
    categorical_extra: int = 0  # more categorical columns, this many per party

    def __post_init__(self) -> None:
        if self.rows < 50:
            raise UserError(f"--rows {self.rows}: need at least 50 rows")
        for name in ("overlap", "labelled", "test_fraction", "passive_only"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise UserError(f"--{name.replace('_', '-')} {value}: expected a fraction between 0 and 1")
        if not 0.0 < self.test_fraction < 1.0:
            raise UserError(
                f"--test-fraction {self.test_fraction}: expected a fraction strictly between 0 and 1"
            )
        if self.file_format not in ("csv", "parquet"):
            raise UserError(f"--format {self.file_format}: expected csv or parquet")
        if self.shard_rows < 1000:
            raise UserError(f"--shard-rows {self.shard_rows}: need at least 1000")
        if min(self.numeric_active, self.numeric_passive, self.categorical_extra) < 0:
            raise UserError(
                "--numeric-active, --numeric-passive and --categorical-extra must not be negative"
            )


def _bucket(score: np.ndarray, std: float, names: list[str], codes: np.ndarray) -> np.ndarray:
    """Equal-mass buckets of a normal score (edges from its known spread, so every chunk
    of a large set cuts at the same places), mapped through ``codes`` so order carries no hint."""
    n = len(names)
    edges = np.array([NormalDist(0.0, std).inv_cdf(q) for q in np.linspace(0, 1, n + 1)[1:-1]])
    return np.asarray(names, dtype=object)[codes[np.digitize(score, edges)]]


def _with_missing(values: np.ndarray, share: float, rng: np.random.Generator) -> pa.Array:
    return pa.array(values, mask=rng.random(len(values)) < share)


def _user_ids(index: np.ndarray, total: int) -> np.ndarray:
    """Distinct, scrambled ids for global user numbers (a bijection modulo a power of ten)."""
    digits = max(7, len(str(total)))
    scrambled = (index.astype(np.int64) * 7919 + 12345) % (10**digits)
    return np.char.add("u", np.char.zfill(scrambled.astype(str), digits)).astype(object)


def iter_chunks(config: DemoConfig) -> Iterator[dict[str, pa.Table]]:
    """The four tables (active/passive x train/test), ``shard_rows`` users at a time.

    Every chunk draws from its own seeded stream; the shared parts (feature weights,
    bucket codes) come from one stream for the whole set, so memory stays bounded
    whatever ``rows`` is and the same config always gives the same tables.
    """
    shared_rng = np.random.default_rng([config.seed, 7])
    n_latent = 4 + 3
    weights_a = shared_rng.normal(size=(n_latent, config.numeric_active)) / np.sqrt(n_latent)
    weights_b = shared_rng.normal(size=(n_latent, config.numeric_passive)) / np.sqrt(n_latent)
    codes = {k: shared_rng.permutation(k) for k in (4, 10, 12, 16, 20)}
    extra_weights = shared_rng.normal(size=(2, max(config.categorical_extra, 1), 3))
    total_passive_only = int(round(config.rows * config.passive_only))
    total = config.rows + total_passive_only
    for chunk, start in enumerate(range(0, config.rows, config.shard_rows)):
        stop = min(start + config.shard_rows, config.rows)
        rng = np.random.default_rng([config.seed, 11, chunk])
        po_start = int(round(start * config.passive_only))
        po_stop = total_passive_only if stop == config.rows else int(round(stop * config.passive_only))
        index = np.concatenate([np.arange(start, stop), config.rows + np.arange(po_start, po_stop)])
        n, n_users = len(index), stop - start
        shared, own_a, own_b = rng.normal(size=(n, 4)), rng.normal(size=(n, 3)), rng.normal(size=(n, 3))
        num_a = np.concatenate([shared, own_a], axis=1) @ weights_a + 0.5 * rng.normal(
            size=(n, config.numeric_active)
        )
        num_b = np.concatenate([shared, own_b], axis=1) @ weights_b + 0.5 * rng.normal(
            size=(n, config.numeric_passive)
        )
        spread = float(np.sqrt(1 + 0.36 + 0.16))
        ad = _bucket(own_a[:, 0] + 0.6 * shared[:, 0] + 0.4 * rng.normal(size=n), spread,
                     [f"ad_{i:02d}" for i in range(12)], codes[12])  # fmt: skip
        device = _bucket(own_a[:, 1] - 0.5 * shared[:, 1] + 0.6 * rng.normal(size=n), float(np.sqrt(1.61)),
                         ["ios", "android", "desktop", "tv"], codes[4])  # fmt: skip
        site = _bucket(own_b[:, 0] + 0.6 * shared[:, 2] + 0.4 * rng.normal(size=n), spread,
                       [f"site_{i:02d}" for i in range(16)], codes[16])  # fmt: skip
        region = _bucket(own_b[:, 1] + 0.6 * rng.normal(size=n), float(np.sqrt(1.36)),
                         [f"r{i}" for i in range(10)], codes[10])  # fmt: skip
        extra = {}
        for j in range(config.categorical_extra):
            for side, own, key in ((0, own_a, "a"), (1, own_b, "b")):
                mix = own @ extra_weights[side, j] + 0.5 * shared[:, j % 4] + 0.5 * rng.normal(size=n)
                spread_j = float(np.sqrt((extra_weights[side, j] ** 2).sum() + 0.5))
                extra[f"{key}_cat{j}"] = _bucket(
                    mix, spread_j, [f"{key}{j}_{i:02d}" for i in range(20)], codes[20]
                )
        logit = (
            0.9 * shared[:, 0]
            - 0.7 * shared[:, 1]
            + 0.6 * shared[:, 2] * shared[:, 3]
            + 0.8 * own_a[:, 0]
            + 0.4 * own_a[:, 1] ** 2
            + 1.0 * own_b[:, 0]
            - 0.8 * own_b[:, 1]
            + 0.6 * own_b[:, 2] * own_a[:, 2]
            - 2.3
        )
        label = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int64)
        ids = _user_ids(index, total)

        arrays = {"ids": ids, "label": label, "num_a": num_a, "num_b": num_b, "ad_category": ad,
                  "device": device, "site_category": site, "region": region, **extra}  # fmt: skip
        users = np.arange(n_users)
        is_test = rng.random(n_users) < config.test_fraction
        overlap = rng.random(n_users) < config.overlap
        labelled = rng.random(n_users) < config.labelled
        train, test = users[~is_test], users[is_test]
        passive_only = np.arange(n_users, n)
        yield {
            "active_train": _active_table(arrays, train, labelled[train], config, rng),
            "passive_train": _passive_table(
                arrays, np.concatenate([train[overlap[train]], passive_only]), config, rng
            ),
            "active_test": _active_table(arrays, test, np.ones(len(test), dtype=bool), config, rng),
            "passive_test": _passive_table(arrays, test[overlap[test]], config, rng),
        }


def _active_table(
    arrays: dict[str, np.ndarray],
    rows: np.ndarray,
    labelled: np.ndarray,
    config: DemoConfig,
    rng: np.random.Generator,
) -> pa.Table:
    columns = {"id": pa.array(arrays["ids"][rows]), "y": pa.array(arrays["label"][rows], mask=~labelled)}
    for j in range(config.numeric_active):
        columns[f"a_num{j}"] = _with_missing(np.round(arrays["num_a"][rows, j], 4), 0.01, rng)
    columns["ad_category"] = pa.array(arrays["ad_category"][rows])
    columns["device"] = _with_missing(arrays["device"][rows], 0.01, rng)
    for j in range(config.categorical_extra):
        columns[f"a_cat{j}"] = pa.array(arrays[f"a_cat{j}"][rows])
    return pa.table(columns)


def _passive_table(
    arrays: dict[str, np.ndarray], rows: np.ndarray, config: DemoConfig, rng: np.random.Generator
) -> pa.Table:
    columns = {"id": pa.array(arrays["ids"][rows])}
    for j in range(config.numeric_passive):
        columns[f"p_num{j}"] = _with_missing(np.round(arrays["num_b"][rows, j], 4), 0.01, rng)
    columns["site_category"] = pa.array(arrays["site_category"][rows])
    columns["region"] = _with_missing(arrays["region"][rows], 0.01, rng)
    for j in range(config.categorical_extra):
        columns[f"b_cat{j}"] = pa.array(arrays[f"b_cat{j}"][rows])
    return pa.table(columns)


def generate(config: DemoConfig) -> dict[str, pa.Table]:
    """The four tables in memory, keyed by CSV file name (small sets: tests, the demo)."""
    parts: dict[str, list[pa.Table]] = {}
    for chunk in iter_chunks(config):
        for name, table in chunk.items():
            parts.setdefault(name, []).append(table)
    return {f"{name}.csv": pa.concat_tables(tables) for name, tables in parts.items()}


def write_demo(config: DemoConfig) -> dict[str, int]:
    """Write the four tables, chunk by chunk, in bounded memory; return their row counts.

    One chunk gives four files (``active_train.csv`` ...); more give four folders of
    shards (``active_train/part-00000.parquet`` ...), which every command reads as one
    table. Everything is written to a scratch folder first and moved in at the end.
    """
    ext = "." + config.file_format
    try:
        config.out.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".make-demo-", dir=config.out))
    except OSError as exc:
        raise UserError(f"{config.out}: cannot write here ({exc.strerror})") from exc
    sharded = config.rows > config.shard_rows
    counts: dict[str, int] = {}
    try:
        for number, chunk in enumerate(iter_chunks(config)):
            for name, table in chunk.items():
                target = scratch / name / f"part-{number:05d}{ext}" if sharded else scratch / f"{name}{ext}"
                target.parent.mkdir(parents=True, exist_ok=True)
                if config.file_format == "parquet":
                    pq.write_table(table, target)
                else:
                    pacsv.write_csv(table, target)
                counts[f"{name}{'' if sharded else ext}"] = (
                    counts.get(f"{name}{'' if sharded else ext}", 0) + table.num_rows
                )
        for entry in scratch.iterdir():
            final = config.out / entry.name
            if final.is_dir():
                shutil.rmtree(final)
            elif final.exists():
                final.unlink()
            entry.rename(final)
    except OSError as exc:
        raise UserError(
            f"{config.out}: could not write the demo tables ({exc.strerror}); is the disk full?"
        ) from exc
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return counts


def embedded_vfl_dir() -> Path:
    """The shipped demo tables; regenerated from their seed into the cache if absent."""
    shipped = embedded_data_dir() / "vfl"
    if all((shipped / f).is_file() for f in FILES):
        return shipped
    cached = cache_dir() / "data" / "vfl"
    if not all((cached / f).is_file() for f in FILES):
        write_demo(DemoConfig(out=cached))
    return cached


def embedded(name: str) -> Path:
    """One of the embedded demo tables, by file name."""
    return embedded_vfl_dir() / name
