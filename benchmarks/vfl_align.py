"""Private alignment benchmark: ``kvtool vfl align`` time and bytes on the wire.

Two real processes on 127.0.0.1 (the active party as PSI client, the passive party as
server), each holding ``n`` ids, half of them shared. Beside the measured bytes stands
what the protocol itself needs: two compressed P-256 points (33 bytes each) per active
id, one in the request and one in the answer, plus the passive party's encoded set
(a Golomb-compressed set of about log2(n_active / fpr) + 1.5 bits per passive id).

Both parties authenticate each other (mutual TLS 1.3, pinned certificates, as in
production); the bytes counted are the channel's frames inside TLS. Beside each size stands
the previous release's time (plaintext gloo transport, ``vfl_align_gloo_baseline.json``,
measured with that release's own benchmark on the same machine).

Run: .venv/bin/python benchmarks/vfl_align.py [--sizes 100000 1000000] [--fpr 1e-9]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KVTOOL = str(Path(sys.executable).parent / "kvtool")
POINT = 33  # bytes: a compressed P-256 point
sys.path.insert(0, str(ROOT))
from kedit_vfl.vfl.channel.identity import generate_identity  # noqa: E402


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_tables(n: int, folder: Path) -> tuple[Path, Path]:
    """n ids per side, n/2 of them shared."""
    half = n // 2
    active, passive = folder / "active.csv", folder / "passive.csv"
    active.write_text("id\n" + "".join(f"u{i:012d}\n" for i in range(n)))
    passive.write_text("id\n" + "".join(f"u{i:012d}\n" for i in range(half, half + n)))
    return active, passive


def protocol_floor(n_active: int, n_passive: int, fpr: float) -> dict[str, int]:
    gcs = math.ceil(n_passive * (math.log2(n_active / fpr) + 1.5) / 8)
    return {"to_passive": POINT * n_active, "to_active": POINT * n_active + gcs, "gcs": gcs}


def run_pair(active: Path, passive: Path, folder: Path, fpr: float, timeout: float) -> dict:
    port = free_port()
    env = {**os.environ, "KVTOOL_RUNS": str(folder / "runs")}
    common = ["vfl", "align", "--rendezvous", f"tcp://127.0.0.1:{port}", "--fpr", str(fpr)]
    common += ["--timeout", str(timeout), "--json"]
    for party in ("active", "passive"):
        generate_identity(folder / "identities" / party, party)
    started = time.perf_counter()
    procs = {}
    for party, table in (("active", active), ("passive", passive)):
        out = folder / f"{party}.safetensors"
        other = "passive" if party == "active" else "active"
        args = [KVTOOL, *common, "--party", party, "--table", str(table), "--out", str(out)]
        args += ["--identity", str(folder / "identities" / party)]
        args += ["--peer-cert", str(folder / "identities" / other / "cert.pem")]
        procs[party] = subprocess.Popen(
            args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        time.sleep(0.5)
    results = {}
    for party, proc in procs.items():
        stdout, stderr = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"{party} party failed ({proc.returncode}): {stderr.strip()}")
        results[party] = json.loads(stdout)
    results["wall_seconds"] = round(time.perf_counter() - started, 1)
    return results


def measure(n: int, fpr: float, timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="kvtool-align-bench-") as tmp:
        folder = Path(tmp)
        active, passive = write_tables(n, folder)
        run = run_pair(active, passive, folder, fpr, timeout)
    floor = protocol_floor(n, n, fpr)
    wire = run["active"]["traffic"]
    assert run["active"]["fingerprint"] == run["passive"]["fingerprint"]
    return {
        "ids_per_side": n,
        "overlap": run["active"]["intersection_size"],
        "wall_seconds": run["wall_seconds"],
        "active_seconds": run["active"]["seconds"],
        "passive_seconds": run["passive"]["seconds"],
        "bytes_to_passive": wire["bytes_sent"],
        "bytes_to_active": wire["bytes_received"],
        "floor_to_passive": floor["to_passive"],
        "floor_to_active": floor["to_active"],
        "overhead": round(
            (wire["bytes_sent"] + wire["bytes_received"]) / (floor["to_passive"] + floor["to_active"]), 3
        ),
    }


def table(rows: list[dict], fpr: float) -> str:
    lines = [
        f"# `kvtool vfl align`: ECDH-PSI (openmined.psi 2.0.6, P-256, GCS, fpr {fpr:g}), 50% overlap",
        "",
        f"Two processes on one machine ({os.cpu_count()} cores), `--reveal both`, default `--timeout 60`.",
        "Floor: 33 bytes per active id each way (request and answer points) plus the passive",
        "party's Golomb-compressed set (log2(n_active/fpr) + 1.5 bits per passive id). The measured",
        "bytes also hold protobuf framing (2 bytes per point), the 8-byte wire key of each intersection",
        "row sent to the passive party (`--reveal both`), its 1-byte answer, keepalives and the handshake.",
        "Both parties authenticated (mutual TLS 1.3). Previous: the release before TLS (plaintext gloo),",
        "its own benchmark run on this machine the same day (`vfl_align_gloo_baseline.json`).",
        "",
        "| ids per side | overlap | wall s (TLS) | previous wall s (gloo) | ratio "
        "| MB to passive (floor) | MB to active (floor) | bytes / floor |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    baseline_file = ROOT / "benchmarks" / "results" / "vfl_align_gloo_baseline.json"
    baseline = json.loads(baseline_file.read_text()) if baseline_file.is_file() else []
    before = {b["ids_per_side"]: b["wall_seconds"] for b in baseline}
    for r in rows:
        old = before.get(r["ids_per_side"])
        then = f"{old:.1f} | {r['wall_seconds'] / old:.2f}x" if old else "n/a | n/a"
        lines.append(
            f"| {r['ids_per_side']:,} | {r['overlap']:,} | {r['wall_seconds']:.1f} | {then} "
            f"| {r['bytes_to_passive'] / 1e6:.2f} ({r['floor_to_passive'] / 1e6:.2f}) "
            f"| {r['bytes_to_active'] / 1e6:.2f} ({r['floor_to_active'] / 1e6:.2f}) | {r['overhead']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--fpr", type=float, default=1e-9)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "vfl_align.md")
    args = parser.parse_args()
    rows = []
    for n in args.sizes:
        rows.append(measure(n, args.fpr, args.timeout))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    text = table(rows, args.fpr)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
