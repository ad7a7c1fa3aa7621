"""A seeded CTR-like two-party data set, for the demo, the tests and larger experiments.

Every user has latent factors: some shared (seen, noisily, by both parties), some only
the advertiser sees, some only the publisher sees. The click depends on all three, so
the publisher's features carry real signal, and the shared factors are what Matched
Pair Detection can learn from unlabelled overlapped rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from kedit_vfl.artifacts import atomic_write
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


def _bucket(score: np.ndarray, n: int, names: list[str], rng: np.random.Generator) -> np.ndarray:
    """Quantile buckets of a score, mapped through a random permutation so order carries no hint."""
    edges = np.quantile(score, np.linspace(0, 1, n + 1)[1:-1])
    codes = rng.permutation(n)[np.digitize(score, edges)]
    return np.asarray(names, dtype=object)[codes]


def _with_missing(values: np.ndarray, share: float, rng: np.random.Generator) -> pa.Array:
    return pa.array(values, mask=rng.random(len(values)) < share)


def generate(config: DemoConfig) -> dict[str, pa.Table]:
    """The four tables: active/passive x train/test."""
    rng = np.random.default_rng(config.seed)
    n_passive_only = int(round(config.rows * config.passive_only))
    n = config.rows + n_passive_only
    shared, own_a, own_b = rng.normal(size=(n, 4)), rng.normal(size=(n, 3)), rng.normal(size=(n, 3))

    def noisy_mix(n_cols: int, own: np.ndarray) -> np.ndarray:
        mix = np.concatenate([shared, own], axis=1)  # (n, 4 + 3)
        weights = rng.normal(size=(mix.shape[1], n_cols)) / np.sqrt(mix.shape[1])
        return mix @ weights + 0.5 * rng.normal(size=(n, n_cols))

    num_a, num_b = noisy_mix(6, own_a), noisy_mix(5, own_b)
    ad = _bucket(
        own_a[:, 0] + 0.6 * shared[:, 0] + 0.4 * rng.normal(size=n),
        12,
        [f"ad_{i:02d}" for i in range(12)],
        rng,
    )
    device = _bucket(
        own_a[:, 1] - 0.5 * shared[:, 1] + 0.6 * rng.normal(size=n),
        4,
        ["ios", "android", "desktop", "tv"],
        rng,
    )
    site = _bucket(
        own_b[:, 0] + 0.6 * shared[:, 2] + 0.4 * rng.normal(size=n),
        16,
        [f"site_{i:02d}" for i in range(16)],
        rng,
    )
    region = _bucket(own_b[:, 1] + 0.6 * rng.normal(size=n), 10, [f"r{i}" for i in range(10)], rng)
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
    ids = np.asarray([f"u{i:07d}" for i in rng.permutation(n)], dtype=object)

    def active(rows: np.ndarray, labelled: np.ndarray) -> pa.Table:
        columns = {"id": pa.array(ids[rows]), "y": pa.array(label[rows], mask=~labelled)}
        for j in range(num_a.shape[1]):
            columns[f"a_num{j}"] = _with_missing(np.round(num_a[rows, j], 4), 0.01, rng)
        columns["ad_category"] = pa.array(ad[rows])
        columns["device"] = _with_missing(device[rows], 0.01, rng)
        return pa.table(columns)

    def passive(rows: np.ndarray) -> pa.Table:
        columns = {"id": pa.array(ids[rows])}
        for j in range(num_b.shape[1]):
            columns[f"p_num{j}"] = _with_missing(np.round(num_b[rows, j], 4), 0.01, rng)
        columns["site_category"] = pa.array(site[rows])
        columns["region"] = _with_missing(region[rows], 0.01, rng)
        return pa.table(columns)

    users = np.arange(config.rows)
    is_test = rng.random(config.rows) < config.test_fraction
    overlap = rng.random(config.rows) < config.overlap
    labelled = rng.random(config.rows) < config.labelled
    train, test = users[~is_test], users[is_test]
    passive_only = np.arange(config.rows, n)
    return {
        "active_train.csv": active(train, labelled[train]),
        "passive_train.csv": passive(np.concatenate([train[overlap[train]], passive_only])),
        "active_test.csv": active(test, np.ones(len(test), dtype=bool)),
        "passive_test.csv": passive(test[overlap[test]]),
    }


def write_demo(config: DemoConfig) -> dict[str, int]:
    """Write the four CSV tables (atomically each); return their row counts."""
    counts = {}
    for name, table in generate(config).items():
        atomic_write(config.out / name, lambda tmp, t=table: pacsv.write_csv(t, tmp))
        counts[name] = table.num_rows
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
