"""Small two-party tables and one trained pipeline, shared by the VFL command tests."""

from __future__ import annotations

from pathlib import Path

import pyarrow.csv as pacsv
import pytest

from kedit_vfl.vfl.data.demo import DemoConfig, generate
from tests.cli.runner import kvtool

FAST = ("--epochs", "3", "--quiet")


@pytest.fixture(scope="session")
def tables(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """active/passive x train/test CSV tables of a 1,000-user demo set (30% labelled)."""
    folder = tmp_path_factory.mktemp("vfl_tables")
    paths = {}
    for name, table in generate(DemoConfig(rows=2000, seed=3, labelled=0.6)).items():
        paths[name.removesuffix(".csv")] = folder / name
        pacsv.write_csv(table, folder / name)
    return paths


@pytest.fixture(scope="session")
def trained(tables: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """mpd -> split -> local artifacts, trained through the real commands."""
    folder = tmp_path_factory.mktemp("vfl_models")
    data = ("--active", tables["active_train"], "--passive", tables["passive_train"])
    out = {name: folder / f"{name}.safetensors" for name in ("mpd", "split", "local")}
    steps = [
        ("pretrain-mpd", *data, "--out", out["mpd"]),
        ("train-split", *data, "--init", out["mpd"], "--out", out["split"]),
        ("distill", *data, "--teacher", out["split"], "--out", out["local"]),
    ]
    for step in steps:
        result = kvtool("vfl", *step, *FAST)
        assert result.exit_code == 0, result.stderr
    return out
