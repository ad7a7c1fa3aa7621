"""Load test of ``kvtool vfl serve``: latency and throughput of the scoring service, local
and federated, and what happens when the publisher is killed mid-run.

Everything runs on this machine's 2 cores over 127.0.0.1: the advertiser's server, the
publisher (federated runs, mutual TLS as in production) and the load generator. The
models come from the real two-party pipeline on the embedded data (``pretrain-mpd``,
``train-split``, ``distill``, each as two processes); the requests are the embedded
test table's rows.

Scenarios (single-row requests at a fixed arrival rate, open loop: a request goes out at
its scheduled time whether or not earlier ones were answered, over a pool of keep-alive
connections; latency is from writing the request to reading the whole answer):

1. local: the distilled student, 500 requests/s.
2. local, batched: rows per second with batches of ``--batch-rows`` rows, a few
   connections sending back to back (closed loop).
3. federated: the split model with the publisher, 200 requests/s, ``--deadline-ms 15``;
   the whole test table is scored once this way and its AUC compared with
   ``kvtool vfl score --mode federated`` (two processes) on the same table.
4. publisher killed: as 3, the publisher killed (SIGKILL) a quarter into the run and
   started again at the middle; every request must succeed, the rows the publisher
   cannot answer go to the local model within the deadline, ``/metrics`` shows the
   fallbacks, and the federated path comes back.

The load generator is a small asyncio HTTP/1.1 client (uvloop): ``--compare-locust
PATH`` also runs scenario 1 with Locust (``FastHttpUser``, from a separate environment)
and reports both clients' figures and CPU time, which is how the asyncio client was
chosen (see the results).

Run: flock /tmp/kvtool-heavy.lock .venv/bin/python benchmarks/vfl_serve_load.py [--seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from kedit_vfl.vfl.channel.identity import generate_identity  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from two_party import KVTOOL, free_port, run_pair  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
DATA = ROOT / "data" / "vfl"
TARGETS = {
    "local": {"rate": 500, "p99_ms": 5.0},
    "local_batched": {"rows_per_s": 2000},
    "federated": {"rate": 200, "p99_ms": 20.0, "deadline_ms": 15.0, "auc_delta": 0.001},
}


def kvtool(*args: Any) -> dict[str, Any]:
    done = subprocess.run(
        [KVTOOL, "vfl", *map(str, args), "--json", "--quiet"], capture_output=True, text=True
    )
    if done.returncode:
        raise SystemExit(f"kvtool vfl {' '.join(map(str, args))} failed: {done.stderr}")
    return json.loads(done.stdout)


def security(identities: Path, party: str) -> list[str]:
    other = "passive" if party == "active" else "active"
    return ["--identity", str(identities / party), "--peer-cert", str(identities / other / "cert.pem")]


def pair(command: str, active: list[Any], passive: list[Any], identities: Path) -> dict[str, Any]:
    """Both parties of one stage as two processes; the active party's result."""
    port = free_port()
    results = run_pair(
        command,
        {"active": active, "passive": passive},
        lambda party: security(identities, party),
        {"active": port, "passive": port},
    )
    return results["active"]


def train(folder: Path, identities: Path, seed: int) -> dict[str, Path]:
    """The two-party pipeline on the embedded data: each party's files."""
    a = {n: folder / f"a_{n}.safetensors" for n in ("mpd", "split", "local")}
    p = {n: folder / f"p_{n}.safetensors" for n in ("mpd", "split")}
    ad, pd, s = (
        ["--active", DATA / "active_train.csv"],
        ["--passive", DATA / "passive_train.csv"],
        ["--seed", seed],
    )
    pair("pretrain-mpd", [*ad, *s, "--out", a["mpd"]], [*pd, *s, "--out", p["mpd"]], identities)
    pair("train-split", [*ad, *s, "--init", a["mpd"], "--out", a["split"]],
         [*pd, *s, "--init", p["mpd"], "--out", p["split"]], identities)  # fmt: skip
    pair("distill", [*ad, *s, "--teacher", a["split"], "--out", a["local"]],
         [*pd, *s, "--teacher", p["split"]], identities)  # fmt: skip
    return {"a_split": a["split"], "p_split": p["split"], "local": a["local"]}


# -- the test table as requests ----------------------------------------------------------------
def request_rows(schema: Any) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """The test table's rows as requests send them, and the labels by id."""
    import pyarrow.csv as pacsv

    table = pacsv.read_csv(
        DATA / "active_test.csv", convert_options=pacsv.ConvertOptions(strings_can_be_null=True)
    ).to_pylist()
    rows, labels = [], {}
    for record in table:
        features = {name: record[name] for name in schema.columns}
        for name in schema.categorical:
            if features[name] is not None and not isinstance(features[name], str):
                features[name] = str(features[name])
        rows.append({"id": str(record["id"]), "features": features})
        if record.get("y") is not None:
            labels[str(record["id"])] = float(record["y"])
    return rows, labels


# -- the load generator ------------------------------------------------------------------------
class Client:
    """Keep-alive HTTP/1.1 connections to one server; a request takes a free one."""

    def __init__(self, port: int, connections: int) -> None:
        self.port, self.size = port, connections
        self.free: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()

    async def open(self) -> None:
        for _ in range(self.size):
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.free.put_nowait((reader, writer))

    async def close(self) -> None:
        while not self.free.empty():
            _, writer = self.free.get_nowait()
            writer.close()

    async def post(self, body: bytes) -> tuple[int, bytes, float]:
        """(status, body, seconds from writing the request to the answer's last byte)."""
        reader, writer = await self.free.get()
        head = (
            f"POST /score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        started = time.perf_counter()
        writer.write(head + body)
        status_line = await reader.readline()
        length = 0
        while True:
            line = await reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        payload = await reader.readexactly(length)
        took = time.perf_counter() - started
        self.free.put_nowait((reader, writer))
        return int(status_line.split()[1]), payload, took


async def open_loop(
    port: int,
    bodies: list[bytes],
    rate: float,
    seconds: float,
    at: dict[float, Callable[[], None]] | None = None,
) -> dict[str, Any]:
    """Send ``rate`` requests/s for ``seconds`` (cycling ``bodies``); every answer's record.

    ``at``: actions to run at those offsets into the run (killing the publisher...).
    """
    client = Client(port, connections=64)
    await client.open()
    loop = asyncio.get_running_loop()
    records: list[dict[str, Any]] = []
    lags: list[float] = []
    pending = sorted((at or {}).items())
    n = int(rate * seconds)

    async def one(i: int, due: float) -> None:
        lags.append(time.perf_counter() - due)
        try:
            status, payload, took = await client.post(bodies[i % len(bodies)])
        except (OSError, asyncio.IncompleteReadError) as exc:
            records.append({"i": i, "t": due - start, "status": 0, "error": str(exc)})
            return
        record = {"i": i, "t": due - start, "status": status, "seconds": took}
        if status == 200:
            record["results"] = json.loads(payload)["results"]
        records.append(record)

    cpu = time.process_time()
    start = time.perf_counter()
    tasks = []
    for i in range(n):
        due = start + i / rate
        while pending and pending[0][0] <= due - start:
            action = pending.pop(0)[1]
            await loop.run_in_executor(None, action)
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i, due)))
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - start
    await client.close()
    records.sort(key=lambda r: r["i"])
    return {"records": records, "wall": wall, "client_cpu": time.process_time() - cpu, "lag": lags}


async def closed_loop(port: int, bodies: list[bytes], connections: int, seconds: float) -> dict[str, Any]:
    """``connections`` clients each sending the next request as soon as the last is answered."""
    client = Client(port, connections)
    await client.open()
    stop = time.perf_counter() + seconds
    done: list[tuple[int, float]] = []

    async def worker(k: int) -> None:
        i = k
        while time.perf_counter() < stop:
            status, payload, took = await client.post(bodies[i % len(bodies)])
            assert status == 200, payload[:200]
            done.append((len(json.loads(payload)["results"]), took))
            i += connections

    start = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(connections)))
    wall = time.perf_counter() - start
    await client.close()
    return {
        "rows": sum(n for n, _ in done),
        "requests": len(done),
        "wall": wall,
        "latencies": [t for _, t in done],
    }


def arun(coro: Any) -> Any:
    """Run a coroutine on uvloop (less client CPU per request than the default loop)."""
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarise(run: dict[str, Any], deadline_ms: float | None = None) -> dict[str, Any]:
    records = run["records"]
    ok = [r for r in records if r["status"] == 200]
    latencies = [r["seconds"] * 1000 for r in ok]
    paths: dict[str, int] = {}
    for r in ok:
        for result in r["results"]:
            key = result["path"] if result["path"] == "federated" else f"local ({result['reason']})"
            paths[key] = paths.get(key, 0) + 1
    summary = {
        "requests": len(records),
        "failed": len(records) - len(ok),
        "requests_per_s": round(len(ok) / run["wall"], 1),
        "p50_ms": round(quantile(latencies, 0.50), 3),
        "p99_ms": round(quantile(latencies, 0.99), 3),
        "max_ms": round(max(latencies), 3) if latencies else None,
        "mean_ms": round(statistics.fmean(latencies), 3) if latencies else None,
        "paths": paths,
        "client_cpu_s": round(run["client_cpu"], 2),
        "client_lag_p99_ms": round(quantile(run["lag"], 0.99) * 1000, 3),
    }
    if deadline_ms is not None:
        fallback = [
            r["seconds"] * 1000
            for r in ok
            if any(x["reason"] in ("deadline", "publisher-down") for x in r["results"])
        ]
        summary["fallback_requests"] = len(fallback)
        summary["fallback_p99_ms"] = round(quantile(fallback, 0.99), 3) if fallback else None
        summary["fallback_max_ms"] = round(max(fallback), 3) if fallback else None
        summary["within_deadline"] = round(
            sum(t <= deadline_ms for t in latencies) / max(len(latencies), 1), 5
        )
    return summary


# -- the servers ---------------------------------------------------------------------------------
def get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_ready(
    port: int, process: subprocess.Popen, until: Callable[[dict], bool], timeout: float = 120
) -> dict:
    give_up = time.monotonic() + timeout
    while time.monotonic() < give_up:
        if process.poll() is not None:
            raise SystemExit(f"the server stopped: {process.communicate()[1]}")
        try:
            status, body = get(port, "/readyz")
            ready = json.loads(body)
            if status == 200 and until(ready):
                return ready
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit("the server did not become ready")


def start(args: list[Any]) -> subprocess.Popen:
    argv = [KVTOOL, "vfl", "serve", *map(str, args), "--json", "--quiet"]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def stop(process: subprocess.Popen) -> dict[str, Any]:
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=60)
    if process.returncode:
        raise SystemExit(f"the server failed: {err}")
    return json.loads(out)


def metrics(port: int) -> dict[str, float]:
    _, page = get(port, "/metrics")
    values = {}
    for line in page.decode().splitlines():
        if line.startswith("kvtool_serve_") and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def auc(labels: dict[str, float], scores: dict[str, float]) -> float:
    from sklearn.metrics import roc_auc_score

    ids = [i for i in scores if i in labels]
    return float(roc_auc_score([labels[i] for i in ids], [scores[i] for i in ids]))


# -- locust, for the choice of load generator -----------------------------------------------------
LOCUSTFILE = """
import json, os, itertools
from locust import constant_throughput, task
from locust.contrib.fasthttp import FastHttpUser

BODIES = [b.encode() for b in json.load(open(os.environ["KVTOOL_BODIES"]))]
NEXT = itertools.count()

class Scorer(FastHttpUser):
    wait_time = constant_throughput(float(os.environ["KVTOOL_USER_RATE"]))

    @task
    def score(self):
        body = BODIES[next(NEXT) % len(BODIES)]
        self.client.post("/score", data=body, headers={"Content-Type": "application/json"})
"""


def locust_run(
    locust: Path, port: int, bodies: list[bytes], rate: float, seconds: float, folder: Path
) -> dict:
    users = 25
    (folder / "locustfile.py").write_text(LOCUSTFILE)
    (folder / "bodies.json").write_text(json.dumps([b.decode() for b in bodies]))
    env = {**os.environ, "KVTOOL_BODIES": str(folder / "bodies.json")}
    env["KVTOOL_USER_RATE"] = str(rate / users)
    argv = [str(locust), "-f", str(folder / "locustfile.py"), "--headless", "-u", str(users),
            "-r", str(users), "-t", f"{int(seconds)}s", "--host", f"http://127.0.0.1:{port}",
            "--csv", str(folder / "locust"), "--only-summary", "--loglevel", "ERROR"]  # fmt: skip
    before = os.times()
    subprocess.run(argv, env=env, capture_output=True, text=True, timeout=seconds + 120)
    after = os.times()
    import csv

    with open(folder / "locust_stats.csv") as stats:
        total = [row for row in csv.DictReader(stats) if row["Name"] == "Aggregated"][0]
    return {
        "requests": int(total["Request Count"]),
        "failed": int(total["Failure Count"]),
        "requests_per_s": round(float(total["Requests/s"]), 1),
        "p50_ms": float(total["50%"]),
        "p99_ms": float(total["99%"]),
        "client_cpu_s": round((after.children_user + after.children_system)
                              - (before.children_user + before.children_system), 2),
    }  # fmt: skip


# -- the scenarios ---------------------------------------------------------------------------------
def run(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    from kedit_vfl.artifacts import load_artifact
    from kedit_vfl.vfl.models.store import schemas_of

    identities = folder / "identities"
    for party in ("active", "passive"):
        generate_identity(identities / party, party)
    print("training the two-party pipeline on the embedded data...", file=sys.stderr)
    models = train(folder, identities, args.seed)
    schema = schemas_of(load_artifact(models["a_split"]))["active"]
    rows, labels = request_rows(schema)
    singles = [json.dumps({"rows": [row]}).encode() for row in rows]
    batches = [
        json.dumps({"rows": rows[i : i + args.batch_rows]}).encode()
        for i in range(0, len(rows), args.batch_rows)
    ]
    out: dict[str, Any] = {"rows_in_test_table": len(rows), "seconds_per_run": args.seconds}

    # 1-2: local
    port = free_port()
    server = start(["--model", models["local"], "--port", port])
    wait_ready(port, server, lambda r: True)
    arun(open_loop(port, singles, 200, 2))  # warm-up
    print("local, 500 requests/s...", file=sys.stderr)
    out["local"] = summarise(arun(open_loop(port, singles, TARGETS["local"]["rate"], args.seconds)))
    print("local, batched...", file=sys.stderr)
    batched = arun(closed_loop(port, batches, connections=4, seconds=args.seconds / 2))
    out["local_batched"] = {
        "batch_rows": args.batch_rows,
        "connections": 4,
        "requests": batched["requests"],
        "rows": batched["rows"],
        "rows_per_s": round(batched["rows"] / batched["wall"], 1),
        "max_ms": round(max(batched["latencies"]) * 1000, 3),
        "requests_per_s": round(batched["requests"] / batched["wall"], 1),
        "p50_ms": round(quantile([t * 1000 for t in batched["latencies"]], 0.5), 3),
        "p99_ms": round(quantile([t * 1000 for t in batched["latencies"]], 0.99), 3),
    }
    if args.compare_locust:
        print("local, 500 requests/s, with Locust...", file=sys.stderr)
        out["client_choice"] = {
            "asyncio": out["local"],
            "locust": locust_run(args.compare_locust, port, singles, 500, args.seconds, folder),
        }
    stop(server)

    # reference: vfl score --mode federated in two processes
    print("vfl score --mode federated (reference)...", file=sys.stderr)
    reference = pair(
        "score",
        ["--mode", "federated", "--model", models["a_split"], "--fallback", models["local"],
         "--active", DATA / "active_test.csv", "--out", folder / "reference.csv"],
        ["--mode", "federated", "--model", models["p_split"], "--passive", DATA / "passive_test.csv"],
        identities,
    )  # fmt: skip
    out["reference"] = {k: reference[k] for k in ("auc", "rows", "rows_federated", "rows_local_fallback")}

    # 3-4: federated
    deadline = TARGETS["federated"]["deadline_ms"]
    # the overlap, aligned once (PSI) for the servers that reconnect without a new PSI
    aligned = {"active": folder / "a_align.safetensors", "passive": folder / "p_align.safetensors"}
    pair("align", ["--table", DATA / "active_test.csv", "--out", aligned["active"]],
         ["--table", DATA / "passive_test.csv", "--out", aligned["passive"]], identities)  # fmt: skip
    scenarios = {"federated": False, "publisher_killed": True, "publisher_killed_psi": False}
    for scenario, with_alignment in scenarios.items():
        port, rendezvous = free_port(), f"tcp://127.0.0.1:{free_port()}"
        align = {party: ["--alignment", path] if with_alignment else [] for party, path in aligned.items()}
        advertiser = start(
            ["--model", models["a_split"], "--fallback", models["local"],
             "--active", DATA / "active_test.csv", "--port", port, "--rendezvous", rendezvous,
             "--deadline-ms", deadline, *align["active"], *security(identities, "active")]
        )  # fmt: skip
        publisher_args = [
            "--party", "passive", "--model", models["p_split"], "--passive", DATA / "passive_test.csv",
            "--rendezvous", rendezvous, *align["passive"], *security(identities, "passive"),
        ]  # fmt: skip
        publishers = [start(publisher_args)]
        wait_ready(port, advertiser, lambda r: r["publisher"] == "connected")
        arun(open_loop(port, singles, 100, 2))  # warm-up
        rate = TARGETS["federated"]["rate"]
        seconds = len(rows) / rate if scenario == "federated" else args.seconds
        events: dict[str, float] = {}

        def kill(events: dict[str, float] = events, publishers: list = publishers) -> None:
            publishers[0].kill()
            publishers[0].communicate()
            events["killed"] = time.perf_counter()

        def revive(
            events: dict[str, float] = events, publishers: list = publishers, args: list = publisher_args
        ):
            publishers.append(start(args))
            events["restarted"] = time.perf_counter()

        actions = {seconds / 4: kill, seconds / 2: revive} if scenario != "federated" else {}
        print(f"{scenario}, {rate} requests/s for {seconds:.0f} s...", file=sys.stderr)
        result = arun(open_loop(port, singles, rate, seconds, actions))
        summary = summarise(result, deadline)
        page = metrics(port)
        summary["metrics"] = {
            k: v for k, v in page.items()
            if k.startswith(("kvtool_serve_rows_total", "kvtool_serve_fallback_ratio",
                             "kvtool_serve_publisher_sessions_total", "kvtool_serve_publisher_connected"))
        }  # fmt: skip
        if scenario == "federated":
            served = {
                r["results"][0]["id"]: r["results"][0]["score"]
                for r in result["records"]
                if r["status"] == 200
            }
            summary["auc_served"] = auc(labels, served)
            summary["auc_reference"] = reference["auc"]
            summary["auc_delta"] = abs(summary["auc_served"] - reference["auc"])
        else:
            last_quarter = [r for r in result["records"] if r["status"] == 200 and r["t"] >= 0.75 * seconds]
            resumed = sum(x["path"] == "federated" for r in last_quarter for x in r["results"])
            summary["federated_rows_last_quarter"] = resumed
            summary["ready_after"] = json.loads(get(port, "/readyz")[1])
        summary["server"] = stop(advertiser)
        for publisher in publishers:
            if publisher.poll() is None:
                publisher.send_signal(signal.SIGTERM)
                publisher.communicate(timeout=30)
        out[scenario] = summary
    return out


def verdicts(out: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(target, measured, met?) for the results table."""
    local, batched, fed, killed, psi = (
        out["local"],
        out["local_batched"],
        out["federated"],
        out["publisher_killed"],
        out["publisher_killed_psi"],
    )
    counted = killed["metrics"]
    ratio = counted.get("kvtool_serve_fallback_ratio", float("nan"))
    down = counted.get('kvtool_serve_rows_total{path="local",reason="publisher-down"}', 0)
    late = counted.get('kvtool_serve_rows_total{path="local",reason="deadline"}', 0)
    rows = [
        ("local: p99 <= 5 ms at 500 requests/s",
         f"p99 {local['p99_ms']:.2f} ms (p50 {local['p50_ms']:.2f}) at {local['requests_per_s']:.0f} "
         f"requests/s, {local['failed']} failed", local["p99_ms"] <= 5.0 and local["requests_per_s"] >= 490),
        (f"local, batched ({batched['batch_rows']} rows a request): >= 2,000 rows/s",
         f"{batched['rows_per_s']:,.0f} rows/s (p99 {batched['p99_ms']:.1f} ms a request)",
         batched["rows_per_s"] >= 2000),
        ("federated: p99 <= 20 ms at 200 requests/s, --deadline-ms 15",
         f"p99 {fed['p99_ms']:.2f} ms (p50 {fed['p50_ms']:.2f}) at {fed['requests_per_s']:.0f} requests/s, "
         f"{fed['failed']} failed", fed["p99_ms"] <= 20.0 and fed["requests_per_s"] >= 195),
        ("federated: served AUC = vfl score --mode federated (within 0.001)",
         f"{fed['auc_served']:.4f} vs {fed['auc_reference']:.4f} (difference {fed['auc_delta']:.1e})",
         fed["auc_delta"] <= 0.001),
        ("publisher killed: no failed request",
         f"{killed['failed']} failed of {killed['requests']:,}", killed["failed"] == 0),
        ("publisher killed: rows the publisher could not answer served locally within the deadline",
         f"{killed['fallback_requests']:,} fallback requests, p99 {killed['fallback_p99_ms']:.2f} ms, "
         f"max {killed['fallback_max_ms']:.2f} ms; {100 * killed['within_deadline']:.2f}% of all requests "
         "within 15 ms (servers given --alignment)",
         killed["fallback_max_ms"] is not None and killed["fallback_max_ms"] <= 15.0),
        ("the same, the overlap found by PSI at each reconnection (no --alignment)",
         f"{psi['fallback_requests']:,} fallback requests, p99 {psi['fallback_p99_ms']:.2f} ms, "
         f"max {psi['fallback_max_ms']:.2f} ms; all requests p99 {psi['p99_ms']:.2f} ms, "
         f"{100 * psi['within_deadline']:.2f}% within 15 ms",
         psi["fallback_max_ms"] is not None and psi["fallback_max_ms"] <= 15.0),
        ("publisher killed: fallback visible in /metrics",
         f"fallback ratio {ratio:.3f} at the end; publisher-down rows {down:,.0f}, deadline rows {late:,.0f}",
         down + late > 0),
        ("publisher killed: federated path resumes when it returns",
         f"{killed['federated_rows_last_quarter']:,} federated rows in the last quarter; "
         f"{killed['metrics'].get('kvtool_serve_publisher_sessions_total', 0):.0f} sessions",
         killed["federated_rows_last_quarter"] > 0),
    ]  # fmt: skip
    return [(target, measured, "yes" if met else "**no**") for target, measured, met in rows]


def report(out: dict[str, Any]) -> str:
    lines = [
        f"### kvtool vfl serve under load: embedded test table ({out['rows_in_test_table']:,} rows), "
        "2 cores, loopback",
        "",
        "| scenario | requests | requests/s | p50 ms | p99 ms | max ms | failed | rows by path |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    scenarios = (
        ("local", "local, 500/s"),
        ("federated", "federated, 200/s, deadline 15 ms"),
        ("publisher_killed", "federated, 200/s, publisher killed at 1/4, back at 1/2 (--alignment)"),
        ("publisher_killed_psi", "the same, PSI at each connection"),
    )
    for name, label in scenarios:
        s = out[name]
        paths = ", ".join(f"{k} {v:,}" for k, v in sorted(s["paths"].items()))
        lines.append(
            f"| {label} | {s['requests']:,} | {s['requests_per_s']:.0f} | {s['p50_ms']:.2f} "
            f"| {s['p99_ms']:.2f} | {s['max_ms']:.2f} | {s['failed']} | {paths} |"
        )
    b = out["local_batched"]
    lines.append(
        f"| local, {b['batch_rows']} rows a request, {b['connections']} connections back to back "
        f"| {b['requests']:,} | {b['requests_per_s']:.0f} ({b['rows_per_s']:,.0f} rows/s) "
        f"| {b['p50_ms']:.2f} | {b['p99_ms']:.2f} | {b['max_ms']:.2f} | 0 | local {b['rows']:,} |"
    )
    lines += ["", "| target | measured | met |", "| --- | --- | --- |"]
    lines += [f"| {t} | {m} | {ok} |" for t, m, ok in verdicts(out)]
    if "client_choice" in out:
        a, loc = out["client_choice"]["asyncio"], out["client_choice"]["locust"]
        lines += [
            "",
            "Load generator, same scenario (local, 500 requests/s) on the same 2 cores:",
            "",
            "| client | requests/s | p50 ms | p99 ms | client CPU s |",
            "| --- | --- | --- | --- | --- |",
            f"| asyncio (this script) | {a['requests_per_s']:.0f} | {a['p50_ms']:.2f} | {a['p99_ms']:.2f} "
            f"| {a['client_cpu_s']:.1f} |",
            f"| Locust FastHttpUser (25 users) | {loc['requests_per_s']:.0f} | {loc['p50_ms']:g} | "
            f"{loc['p99_ms']:g} | {loc['client_cpu_s']:.1f} |",
        ]
    lines += [
        "",
        "Latency is measured by the client, from writing a request to reading its whole answer, with the "
        "server, the publisher and the client sharing the machine's 2 cores.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each timed run")
    parser.add_argument("--batch-rows", type=int, default=256)
    parser.add_argument("--compare-locust", type=Path, default=None, help="a locust executable")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["KVTOOL_RUNS"] = str(Path(tmp) / "runs")
        out = run(args, Path(tmp))
    text = report(out)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "vfl_serve.md").write_text(text)
    (RESULTS / "vfl_serve.json").write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
