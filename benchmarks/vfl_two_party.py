"""Two-party VFed-SSD: AUC parity with the in-process run, bytes on the wire, throughput,
and what the optional protection of embeddings and gradients costs in AUC.

Every run goes through the real CLI. The two-party pipeline runs each stage as two
``kvtool`` processes over 127.0.0.1 on this machine (both parties share its 2 cores);
the in-process pipeline runs the same stages with the same seed in one process.

1. Parity: test AUC of ``score`` in local mode (the distilled student) and federated
   mode (the split model, student fallback), two processes vs one.
2. Traffic: bytes per trained row per epoch of ``pretrain-mpd`` and ``train-split``
   (training requests: row keys, embeddings, gradients, request headers), beside the
   floor (embedding width x 4 bytes x 2 directions + an 8-byte key); with the
   validation requests counted too; and all bytes on the wire (handshake included).
3. Throughput: training rows/s of each stage's training loop, two processes vs one, with
   the channel under mutual TLS (the default), in plaintext (``--insecure``, loopback only),
   and, for reference, the previous release's plaintext gloo transport (measured with
   that release's own benchmark on this machine; ``vfl_two_party_gloo_baseline.json``).
   Bytes on the wire under TLS are counted by a relay between the parties: every byte of
   ciphertext, TLS records and framing included.
4. Protection: federated test AUC of ``train-split`` (in process) with ``--clip``,
   ``--embedding-noise`` and ``--gradient-noise`` settings.

Run: .venv/bin/python benchmarks/vfl_two_party.py [--seed 0] [--skip-protection]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from kedit_vfl.vfl.channel.identity import generate_identity  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from two_party import KVTOOL, free_port, run_pair  # noqa: E402

from tests.relay import Relay  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
DATA = ROOT / "data" / "vfl"
PROTECTION = [
    ("none", []),
    ("clip 1.0", ["--clip", "1.0"]),
    ("embedding noise 0.1", ["--embedding-noise", "0.1"]),
    ("embedding noise 0.5", ["--embedding-noise", "0.5"]),
    ("gradient noise 0.1", ["--gradient-noise", "0.1"]),
    ("gradient noise 1.0", ["--gradient-noise", "1.0"]),
    ("clip 1.0 + both noises 0.1", ["--clip", "1.0", "--embedding-noise", "0.1", "--gradient-noise", "0.1"]),
]


def kvtool(*args: Any) -> dict[str, Any]:
    done = subprocess.run(
        [KVTOOL, "vfl", *map(str, args), "--json", "--quiet"], capture_output=True, text=True
    )
    if done.returncode:
        raise SystemExit(f"kvtool vfl {' '.join(map(str, args))} failed: {done.stderr}")
    return json.loads(done.stdout)


IDENTITIES: Path | None = None


def security(party: str, mode: str) -> list[str]:
    if mode == "insecure":
        return ["--insecure"]
    assert IDENTITIES is not None
    other = "passive" if party == "active" else "active"
    return ["--identity", IDENTITIES / party, "--peer-cert", IDENTITIES / other / "cert.pem"]


def pair(
    command: str, active: list[Any], passive: list[Any], mode: str = "tls", relay: Relay | None = None
) -> tuple[dict, dict, float]:
    """Both parties of one stage as two processes; (active result, passive result, seconds)."""
    port = free_port()
    ports = {"active": port, "passive": relay.start(port) if relay is not None else port}
    start = time.perf_counter()
    try:
        results = run_pair(
            command, {"active": active, "passive": passive}, lambda party: security(party, mode), ports
        )
    finally:
        if relay is not None:
            relay.stop()
    return results["active"], results["passive"], time.perf_counter() - start


def in_process(folder: Path, seed: int) -> dict[str, Any]:
    out = {name: folder / f"one_{name}.safetensors" for name in ("mpd", "split", "local")}
    timings, results = {}, {}
    for stage, args in (
        ("mpd", ["pretrain-mpd", "--out", out["mpd"]]),
        ("split", ["train-split", "--init", out["mpd"], "--out", out["split"]]),
        ("distill", ["distill", "--teacher", out["split"], "--out", out["local"]]),
    ):
        start = time.perf_counter()
        results[stage] = kvtool(*args, "--seed", seed)
        timings[stage] = time.perf_counter() - start
    scores = score(out["split"], out["local"], folder / "one")
    return {"results": results, "seconds": timings, **scores}


def score(split: Path, local: Path, prefix: Path, passive_split: Path | None = None) -> dict[str, Any]:
    test = ["--active", DATA / "active_test.csv"]
    local_auc = kvtool("score", "--model", local, *test, "--out", f"{prefix}_local.csv")["auc"]
    args = ["--mode", "federated", "--model", split, *test, "--fallback", local, "--out", f"{prefix}_fed.csv"]
    if passive_split is None:
        fed = kvtool("score", *args, "--passive", DATA / "passive_test.csv")
    else:
        passive = ["--mode", "federated", "--model", passive_split, "--passive", DATA / "passive_test.csv"]
        fed, _, _ = pair("score", args, passive)
    return {"auc_local": local_auc, "auc_federated": fed["auc"]}


def two_party(folder: Path, seed: int, mode: str = "tls", full: bool = True, count: bool = False) -> dict:
    """The pipeline in two processes; ``full``: distill and score too; ``count``: through a relay."""
    folder = folder / f"{mode}{'_relay' if count else ''}"
    folder.mkdir()
    a = {name: folder / f"a_{name}.safetensors" for name in ("mpd", "split", "local")}
    p = {name: folder / f"p_{name}.safetensors" for name in ("mpd", "split")}
    a_data, p_data, s = (
        ["--active", DATA / "active_train.csv"],
        ["--passive", DATA / "passive_train.csv"],
        ["--seed", seed],
    )
    results, passive, timings = {}, {}, {}
    stages = (
        ("mpd", "pretrain-mpd", [*a_data, *s, "--out", a["mpd"]], [*p_data, *s, "--out", p["mpd"]]),
        ("split", "train-split", [*a_data, *s, "--init", a["mpd"], "--out", a["split"]],
         [*p_data, *s, "--init", p["mpd"], "--out", p["split"]]),
        ("distill", "distill", [*a_data, *s, "--teacher", a["split"], "--out", a["local"]],
         [*p_data, *s, "--teacher", p["split"]]),
    )  # fmt: skip
    on_wire = {}
    for stage, command, active_args, passive_args in stages if full else stages[:2]:
        relay = Relay() if count else None
        results[stage], passive[stage], timings[stage] = pair(command, active_args, passive_args, mode, relay)
        if relay is not None:
            on_wire[stage] = sum(len(b) for b in relay.recorded.values())
    scores = score(a["split"], a["local"], folder / "two", passive_split=p["split"]) if full else {}
    return {"results": results, "passive": passive, "seconds": timings, "on_wire": on_wire, **scores}


def protection(folder: Path, seed: int) -> list[dict[str, Any]]:
    mpd = folder / "one_mpd.safetensors"
    rows = []
    for name, options in PROTECTION:
        split = folder / f"prot_{len(rows)}.safetensors"
        kvtool("train-split", "--init", mpd, "--seed", seed, *options, "--out", split)
        fed = kvtool("score", "--mode", "federated", "--model", split, "--out", folder / "prot.csv")
        rows.append({"setting": name, "options": " ".join(options), "auc_federated": fed["auc"]})
    return rows


def report(
    one: dict, two: dict, plain: dict, counted: dict, baseline: dict, guarded: list[dict], seed: int
) -> str:
    lines = [f"### Two parties vs one process: embedded data, seed {seed}", ""]
    lines += [
        "| deployment mode | in-process AUC | two-process AUC | difference |",
        "| --- | --- | --- | --- |",
    ]
    for mode in ("local", "federated"):
        x, y = one[f"auc_{mode}"], two[f"auc_{mode}"]
        lines.append(f"| {mode} | {x:.4f} | {y:.4f} | {abs(x - y):.1e} |")
    lines += [
        "",
        "| stage | floor B/row | train B/row (ratio) | with validation B/row | payload bytes, both ways "
        "| TLS bytes on the wire (relay) | previous gloo payload bytes | TLS / previous |",
    ]
    lines += ["| --- | --- | --- | --- | --- | --- | --- | --- |"]
    old = baseline.get("two_party", {}).get("results", {})
    for stage in ("mpd", "split"):
        t = two["results"][stage]["traffic"]
        floor, train = t["floor_bytes_per_row"], t["bytes_per_trained_row"]
        wire = t["wire"]["bytes_sent"] + t["wire"]["bytes_received"]
        tls = counted["on_wire"][stage]
        previous = old.get(stage, {}).get("traffic", {}).get("wire")
        prev = previous["bytes_sent"] + previous["bytes_received"] if previous else None
        lines.append(
            f"| {stage} | {floor} | {train:.1f} ({train / floor:.3f}x) | "
            f"{t['bytes_per_trained_row_with_evaluation']:.1f} | {wire:,} | {tls:,} | "
            + (f"{prev:,} | {tls / prev:.3f}x |" if prev else "n/a | n/a |")
        )
    lines += [
        "",
        "| stage | in-process rows/s | two-process TLS rows/s | ratio | two-process --insecure rows/s "
        "| previous gloo rows/s | TLS / previous gloo | wall s (one / TLS) |",
    ]
    lines += ["| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for stage in ("mpd", "split"):
        x, y = one["results"][stage]["train_rows_per_s"], two["results"][stage]["train_rows_per_s"]
        z = plain["results"][stage]["train_rows_per_s"]
        g = old.get(stage, {}).get("train_rows_per_s")
        lines.append(
            f"| {stage} | {x:,.0f} | {y:,.0f} | {y / x:.2f}x | {z:,.0f} | "
            + (f"{g:,.0f} | {y / g:.2f}x | " if g else "n/a | n/a | ")
            + f"{one['seconds'][stage]:.1f} / {two['seconds'][stage]:.1f} |"
        )
    if guarded:
        base = guarded[0]["auc_federated"]
        lines += [
            "",
            "| protection (train-split, in process) | federated AUC | change |",
            "| --- | --- | --- |",
        ]
        for row in guarded:
            change = (row["auc_federated"] - base) / base * 100
            lines.append(f"| {row['setting']} | {row['auc_federated']:.4f} | {change:+.2f}% |")
    lines += ["", "Both parties share this machine's 2 cores in the two-process runs."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-protection", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        os.environ["KVTOOL_RUNS"] = str(folder / "runs")
        global IDENTITIES
        IDENTITIES = folder / "identities"
        for party in ("active", "passive"):
            generate_identity(IDENTITIES / party, party)
        one = in_process(folder, args.seed)
        two = two_party(folder, args.seed)
        plain = two_party(folder, args.seed, "insecure", full=False)
        counted = two_party(folder, args.seed, full=False, count=True)
        guarded = [] if args.skip_protection else protection(folder, args.seed)
    baseline_file = RESULTS / "vfl_two_party_gloo_baseline.json"
    baseline = json.loads(baseline_file.read_text()) if baseline_file.is_file() else {}
    text = report(one, two, plain, counted, baseline, guarded, args.seed)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "vfl_two_party.md").write_text(text)
    raw = {"in_process": one, "two_party": two, "insecure": plain, "relay": counted, "protection": guarded}
    (RESULTS / "vfl_two_party.json").write_text(json.dumps(raw, indent=1, default=str))


if __name__ == "__main__":
    main()
