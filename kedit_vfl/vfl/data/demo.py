"""A seeded CTR-like two-party data set, for the demo, the tests and larger experiments.

Every user has latent factors: some shared (seen, noisily, by both parties), some only
the advertiser sees, some only the publisher sees. The click depends on all three, so
the publisher's features carry real signal, and the shared factors are what Matched
Pair Detection can learn from unlabelled overlapped rows.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from kedit_vfl.errors import UserError
from kedit_vfl.paths import cache_dir, embedded_data_dir
from kedit_vfl.vfl.config import DemoConfig

FILES = ("active_train.csv", "passive_train.csv", "active_test.csv", "passive_test.csv")


class _Buckets:
    """Equal-mass buckets of a score, mapped through a random permutation so order
    carries no hint. The edges and the permutation come from the first chunk and serve
    every later one, so a large set cuts everywhere at the same places."""

    def __init__(self, names: list[str]) -> None:
        self.names = np.asarray(names, dtype=object)
        self.edges: np.ndarray | None = None
        self.codes: np.ndarray | None = None

    def __call__(self, score: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if self.edges is None:
            n = len(self.names)
            self.edges = np.quantile(score, np.linspace(0, 1, n + 1)[1:-1])
            self.codes = rng.permutation(n)
        assert self.codes is not None
        return self.names[self.codes[np.digitize(score, self.edges)]]


def _with_missing(values: np.ndarray, share: float, rng: np.random.Generator) -> pa.Array:
    return pa.array(values, mask=rng.random(len(values)) < share)


def iter_chunks(config: DemoConfig) -> Iterator[dict[str, pa.Table]]:
    """The four tables (active/passive x train/test), ``shard_rows`` users at a time.

    The first chunk draws from ``default_rng(seed)`` in the order this generator always
    has (a set of one chunk is the same as before sharding existed) and fixes what all
    chunks share: the feature weights and the category buckets. Every later chunk draws
    from its own seeded stream, so memory stays bounded whatever ``rows`` is, and the
    same config always gives the same tables.
    """
    weights: dict[str, np.ndarray] = {}
    buckets = {
        "ad": _Buckets([f"ad_{i:02d}" for i in range(12)]),
        "device": _Buckets(["ios", "android", "desktop", "tv"]),
        "site": _Buckets([f"site_{i:02d}" for i in range(16)]),
        "region": _Buckets([f"r{i}" for i in range(10)]),
        **{f"{k}_cat{j}": _Buckets([f"{k}{j}_{i:02d}" for i in range(20)])
           for j in range(config.categorical_extra) for k in ("a", "b")},
    }  # fmt: skip
    total_passive_only = int(round(config.rows * config.passive_only))
    digits = max(7, len(str(config.rows + total_passive_only - 1)))
    offset = 0
    for chunk, start in enumerate(range(0, config.rows, config.shard_rows)):
        stop = min(start + config.shard_rows, config.rows)
        rng = np.random.default_rng(config.seed if chunk == 0 else [config.seed, 11, chunk])
        po_start = int(round(start * config.passive_only))
        po_stop = total_passive_only if stop == config.rows else int(round(stop * config.passive_only))
        n_users = stop - start
        n = n_users + po_stop - po_start
        shared, own_a, own_b = rng.normal(size=(n, 4)), rng.normal(size=(n, 3)), rng.normal(size=(n, 3))
        num_a = _noisy_mix(weights, "a", config.numeric_active, shared, own_a, rng)
        num_b = _noisy_mix(weights, "b", config.numeric_passive, shared, own_b, rng)
        ad = buckets["ad"](own_a[:, 0] + 0.6 * shared[:, 0] + 0.4 * rng.normal(size=n), rng)
        device = buckets["device"](own_a[:, 1] - 0.5 * shared[:, 1] + 0.6 * rng.normal(size=n), rng)
        site = buckets["site"](own_b[:, 0] + 0.6 * shared[:, 2] + 0.4 * rng.normal(size=n), rng)
        region = buckets["region"](own_b[:, 1] + 0.6 * rng.normal(size=n), rng)
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
        numbers = (offset + rng.permutation(n)).astype(str)
        ids = np.char.add("u", np.char.zfill(numbers, digits)).astype(object)
        offset += n
        extra = {}
        side_rng = np.random.default_rng([config.seed, 13, chunk])  # extra columns: their own stream
        for j in range(config.categorical_extra):
            for key, own in (("a", own_a), ("b", own_b)):
                mix = own @ side_rng.normal(size=3) + 0.5 * shared[:, j % 4] + 0.5 * side_rng.normal(size=n)
                extra[f"{key}_cat{j}"] = buckets[f"{key}_cat{j}"](mix, side_rng)
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


def _noisy_mix(
    weights: dict[str, np.ndarray],
    key: str,
    n_cols: int,
    shared: np.ndarray,
    own: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """Features as noisy linear views of the shared and own factors (weights fixed by the first chunk)."""
    mix = np.concatenate([shared, own], axis=1)  # (n, 4 + 3)
    if key not in weights:
        weights[key] = rng.normal(size=(mix.shape[1], n_cols)) / np.sqrt(mix.shape[1])
    return mix @ weights[key] + 0.5 * rng.normal(size=(len(mix), n_cols))


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
                    pq.write_table(
                        table, target, row_group_size=1 << 17
                    )  # readers decode a row group at a time
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
        # Outside a source checkout (a wheel install) the tables are not shipped: say so once.
        print(f"building the embedded demo tables into {cached} (first use)", file=sys.stderr)
        write_demo(DemoConfig(out=cached))
    return cached


def embedded(name: str) -> Path:
    """One of the embedded demo tables, by file name."""
    return embedded_vfl_dir() / name
