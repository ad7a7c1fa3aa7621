from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kedit_vfl import __version__
from kedit_vfl.artifacts import Artifact, make_provenance, save_artifact
from tests.cli.runner import kvtool


def test_version() -> None:
    result = kvtool("--version")
    assert result.exit_code == 0 and __version__ in result.stdout


def test_info_json_shows_kind_config_provenance_and_shapes(tmp_path: Path) -> None:
    artifact = Artifact(
        kind="vfl.mpd",
        tensors={"tower.weight": torch.zeros(2, 5)},
        config={"width": 5},
        provenance=make_provenance("vfl pretrain-mpd", {}, seed=1),
        extra={"party": "both"},
    )
    save_artifact(artifact, tmp_path / "m.safetensors")
    result = kvtool("info", tmp_path / "m.safetensors", "--json")
    assert result.exit_code == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["kind"] == "vfl.mpd" and info["config"] == {"width": 5}
    assert info["tensors"]["tower.weight"]["shape"] == [2, 5]
    assert info["provenance"]["command"] == "vfl pretrain-mpd"
    table = kvtool("info", tmp_path / "m.safetensors")
    assert table.exit_code == 0 and "vfl.mpd" in table.stdout


def test_user_error_is_one_line_and_exit_code_2(monkeypatch) -> None:
    monkeypatch.delenv("KVTOOL_DEBUG")
    result = kvtool("info", "missing.safetensors")
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: missing.safetensors: no such file"
    assert result.stdout == ""


def test_groups_have_help() -> None:
    for group in ("vfl", "edit"):
        result = kvtool(group, "--help")
        assert result.exit_code == 0, result.stderr


def test_the_executable_exits_with_the_command_status(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "kedit_vfl", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and __version__ in done.stdout
    done = subprocess.run([sys.executable, "-m", "kedit_vfl", "info", str(tmp_path / "missing.safetensors")],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 2 and done.stderr.strip().endswith("missing.safetensors: no such file")


@pytest.mark.parametrize(
    "args", [["vfl", "export", "--help"], ["--help"], ["vfl", "--help"], ["vfl", "score", "--help"]]
)
def test_a_closed_pipe_ends_quietly(args: list[str]) -> None:
    """`kvtool ... | true` under `set -o pipefail`: the reader leaves at once; exit 0, no message."""
    command = f"set -o pipefail; {sys.executable} -m kedit_vfl {' '.join(args)} | true"
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True)
    assert done.returncode == 0 and done.stderr == ""
    head = f"set -o pipefail; {sys.executable} -m kedit_vfl {' '.join(args)} | head -c 10"
    done = subprocess.run(["bash", "-c", head], capture_output=True, text=True)
    assert done.returncode == 0 and done.stderr == "" and len(done.stdout) == 10
    lines = f"set -o pipefail; {sys.executable} -m kedit_vfl {' '.join(args)} | head -n 22 > /dev/null"
    done = subprocess.run(["bash", "-c", lines], capture_output=True, text=True)
    assert done.returncode == 0 and done.stderr == ""


def test_help_version_and_info_import_nothing_heavy(tmp_path: Path) -> None:
    """The start-up contract: no torch, Arrow or transformers for these."""
    artifact = Artifact(
        kind="vfl.mpd",
        tensors={"w": torch.zeros(2, 3)},
        config={},
        provenance=make_provenance("test", {}),
    )
    save_artifact(artifact, tmp_path / "m.safetensors")
    for args in (["--version"], ["--help"], ["vfl", "score", "--help"], ["vfl", "serve", "--help"],
                 ["edit", "apply", "--help"], ["info", str(tmp_path / "m.safetensors")]):  # fmt: skip
        script = (
            "import sys\nfrom kedit_vfl import launch\nstatus = launch.run()\n"
            "heavy = [m for m in ('torch', 'pyarrow', 'transformers', 'datasets', 'pandas', 'fastapi',"
            " 'uvicorn', 'prometheus_client')"
            " if m in sys.modules]\n"
            "print('HEAVY', heavy, file=sys.stderr)\nsys.exit(status)"
        )
        done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert "HEAVY []" in done.stderr, (args, done.stderr)


def test_sign_then_trust_through_the_commands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pipeline signs what it trains and refuses what it did not sign, with one line each."""
    monkeypatch.delenv("KVTOOL_DEBUG")
    assert kvtool("sign-keygen", "--out", tmp_path / "ci").exit_code == 0
    assert kvtool("sign-keygen", "--out", tmp_path / "other").exit_code == 0
    again = kvtool("sign-keygen", "--out", tmp_path / "ci")
    assert again.exit_code == 2 and "--force" in again.stderr
    key, pub = tmp_path / "ci" / "signing.key", tmp_path / "ci" / "signing.pub"
    common = ["--epochs", "1", "--quiet"]
    signed = kvtool("vfl", "pretrain-mpd", *common, "--out", tmp_path / "s.safetensors", "--sign-key", key)
    assert signed.exit_code == 0, signed.stderr
    plain = kvtool("vfl", "pretrain-mpd", *common, "--out", tmp_path / "p.safetensors")
    assert plain.exit_code == 0, plain.stderr
    info = json.loads(kvtool("info", tmp_path / "s.safetensors", "--trust", pub, "--json").stdout)
    assert info["signed_by"].startswith("ed25519:SHA256:")
    refused = kvtool("vfl", "train-split", *common, "--init", tmp_path / "p.safetensors", "--trust", pub)
    assert refused.exit_code == 2 and refused.stderr.count("\n") == 1 and "not signed" in refused.stderr
    other = kvtool("info", tmp_path / "s.safetensors", "--trust", tmp_path / "other" / "signing.pub")
    assert other.exit_code == 2 and "not among the --trust keys" in other.stderr
    init, out = tmp_path / "s.safetensors", tmp_path / "t.safetensors"
    trusted = {"KVTOOL_TRUST": str(pub)}
    accepted = kvtool("vfl", "train-split", *common, "--init", init, "--out", out, env=trusted)
    assert accepted.exit_code == 0, accepted.stderr


def test_a_missing_extra_is_named(tmp_path: Path) -> None:
    """A half of kvtool installed without its extra: one line saying what to install."""
    script = (
        "import sys\nsys.modules['pyarrow'] = None\n"
        "sys.argv = ['kvtool', 'vfl', 'make-demo', '--rows', '100', '--out', sys.argv[1]]\n"
        "from kedit_vfl import launch\nsys.exit(launch.run())"
    )
    env = {k: v for k, v in os.environ.items() if k != "KVTOOL_DEBUG"}
    argv = [sys.executable, "-c", script, str(tmp_path / "d")]
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    assert done.returncode == 2
    expected = "needs the 'pyarrow' package: pip install 'kvtool[vfl]'"
    assert done.stderr.strip() == f"error: kvtool vfl make-demo {expected}"
