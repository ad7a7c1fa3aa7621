"""``kvtool vfl serve``: both parties as real processes on 127.0.0.1, driven over real HTTP.

One two-party pipeline (split model and student) is trained once for the module; every
test then starts servers on free ports and talks to them with ``http.client``.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pyarrow.csv as pacsv
import pytest

from kedit_vfl.vfl.data.schema import PartySchema
from kedit_vfl.vfl.models.store import schemas_of
from tests.cli.runner import kvtool, kvtool_json
from tests.cli.vfl.parties import KVTOOL, finish, free_port, run_pair, security_args

EPOCHS = ("--epochs", "2")


@pytest.fixture(scope="module")
def models(tables: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A split model trained by two processes, and the student distilled from it."""
    folder = tmp_path_factory.mktemp("serve_models")
    out = {name: folder / f"{name}.safetensors" for name in ("a_split", "p_split", "local")}
    a_data, p_data = ["--active", tables["active_train"]], ["--passive", tables["passive_train"]]
    stages = [
        run_pair(
            "train-split",
            [*a_data, *EPOCHS, "--out", out["a_split"]],
            [*p_data, *EPOCHS, "--out", out["p_split"]],
        ),
        run_pair(
            "distill",
            [*a_data, *EPOCHS, "--teacher", out["a_split"], "--out", out["local"]],
            [*p_data, "--teacher", out["p_split"]],
        ),
    ]
    for active, passive in stages:
        assert active.code == 0 and passive.code == 0, active.stderr + passive.stderr
    return out


class Server:
    """A ``kvtool vfl serve`` process and an HTTP connection to it."""

    def __init__(self, args: list[Any], port: int | None = None, party: str = "active") -> None:
        self.port = port
        argv = [KVTOOL, "vfl", "serve", "--party", party, *[str(a) for a in args], "--quiet", "--json"]
        if port is not None:
            argv += ["--port", str(port)]
        env = {**os.environ, "KVTOOL_DEBUG": ""}
        self.process = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )

    def request(self, method: str, path: str, body: Any = None, raw: bytes | None = None) -> tuple[int, Any]:
        assert self.port is not None
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        connection.request(method, path, data, {"Content-Type": "application/json"})
        response = connection.getresponse()
        payload = response.read()
        connection.close()
        kind = response.getheader("content-type", "")
        return response.status, json.loads(payload) if kind.startswith(
            "application/json"
        ) else payload.decode()

    def score(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        status, body = self.request("POST", "/score", {"rows": rows})
        assert status == 200, body
        return body

    def wait(self, until: Any = lambda ready: True, timeout: float = 30.0) -> dict[str, Any]:
        """Poll /readyz until it answers and ``until(readiness)`` holds."""
        give_up = time.monotonic() + timeout
        while time.monotonic() < give_up:
            assert self.process.poll() is None, self.process.communicate()[1]
            try:
                status, ready = self.request("GET", "/readyz")
                if status == 200 and until(ready):
                    return ready
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"the server was not ready within {timeout} s")

    def stop(self, sig: int = signal.SIGTERM) -> dict[str, Any]:
        self.process.send_signal(sig)
        done = finish(self.process, timeout=30)
        assert done.code == 0, done.stderr
        return done.json()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate()


@pytest.fixture
def servers() -> Any:
    """Started servers, killed at the end of the test whatever happened."""
    started: list[Server] = []

    def start(*args: Any, **kwargs: Any) -> Server:
        server = Server(*args, **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        server.kill()


def request_rows(table: Path, schema: PartySchema) -> list[dict[str, Any]]:
    """The table's rows as a scoring request sends them."""
    read = pacsv.ConvertOptions(strings_can_be_null=True)  # an empty field is missing, as kvtool reads it
    columns = pacsv.read_csv(table, convert_options=read).to_pylist()
    numeric, categorical = set(schema.numeric), set(schema.categorical)
    rows = []
    for record in columns:
        features = {name: record[name] for name in schema.columns}
        for name in categorical:  # the CSV reader may type a category column as numbers; send text
            if features[name] is not None and not isinstance(features[name], str):
                features[name] = str(features[name])
        assert all(isinstance(features[n], (int, float)) or features[n] is None for n in numeric)
        rows.append({"id": str(record["id"]), "features": features})
    return rows


def schema_of(path: Path) -> PartySchema:
    from kedit_vfl.artifacts import load_artifact

    return schemas_of(load_artifact(path))["active"]


def reference_scores(path: Path) -> dict[str, tuple[float, str]]:
    table = pacsv.read_csv(path).to_pylist()
    return {str(r["id"]): (float(r["score"]), r["mode_used"]) for r in table}


def metric(text: str, name: str) -> float:
    """One sample's value from a Prometheus page (``name`` with its labels, as printed)."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


def test_local_mode_matches_score_and_refuses_bad_requests(
    models: dict[Path, Path], tables: dict[str, Path], servers: Any, tmp_path: Path
) -> None:
    port = free_port()
    server = servers(["--model", models["local"], "--max-batch", "300"], port=port)
    ready = server.wait()
    assert ready["kind"] == "vfl.local" and ready["publisher"] == "none"
    rows = request_rows(tables["active_test"], schema_of(models["local"]))
    expected = tmp_path / "local.csv"
    kvtool_json(
        "vfl", "score", "--model", models["local"], "--active", tables["active_test"], "--out", expected
    )
    reference = reference_scores(expected)
    assert 300 < len(rows) <= 600
    batched = server.score(rows[:300])["results"] + server.score(rows[300:])["results"]
    singles = [server.score([row])["results"][0] for row in rows[:20]]
    assert [r["id"] for r in batched] == [row["id"] for row in rows]
    for result in batched + singles:
        assert result["path"] == "local" and result["reason"] == "local-model"
        assert abs(result["score"] - reference[result["id"]][0]) < 1e-6

    good = rows[0]
    features = good["features"]
    numeric = schema_of(models["local"]).numeric[0]
    categorical = schema_of(models["local"]).categorical[0]
    missing = {k: v for k, v in features.items() if k != numeric}

    def one(values: dict[str, Any]) -> dict[str, Any]:
        return {"rows": [{"id": "u", "features": values}]}

    bad = {
        "missing feature": (one(missing), 422, f"missing feature '{numeric}'"),
        "wrong type": (one({**features, numeric: "7"}), 422, "is numeric"),
        "number for a category": (one({**features, categorical: 3}), 422, "is categorical"),
        "unknown column": (one({**features, "zz": 1.0}), 422, "unknown feature 'zz'"),
        "nested value": (one({**features, numeric: [1]}), 422, "must be a number"),
        "oversize batch": ({"rows": [good] * 301}, 413, "at most --max-batch 300"),
        "no rows": ({"rows": []}, 422, "rows"),
        "not an object": ([1, 2], 422, "JSON object"),
        "id not a string": ({"rows": [{"id": 5, "features": features}]}, 422, "row 0: id"),
    }  # fmt: skip
    for name, (body, status, reason) in bad.items():
        got, answer = server.request("POST", "/score", body)
        assert got == status, (name, answer)
        assert reason in answer["detail"] and "\n" not in answer["detail"], (name, answer)
    got, answer = server.request("POST", "/score", raw=b'{"rows": [{"id": "u",')
    assert got == 400 and answer["detail"].startswith("malformed JSON"), answer
    got, answer = server.request("POST", "/score", raw=b"x" * (400 * 16 * 1024))
    assert got == 413 and "larger than" in answer["detail"]
    assert abs(server.score([good])["results"][0]["score"] - batched[0]["score"]) < 1e-6  # still serving

    status, schema = server.request("GET", "/openapi.json")
    assert status == 200 and "/score" in schema["paths"] and "ScoreRequest" in json.dumps(schema)
    assert server.request("GET", "/healthz") == (200, {"status": "ok"})
    status, page = server.request("GET", "/metrics")
    assert status == 200
    assert metric(page, 'kvtool_serve_rows_total{path="local",reason="local-model"}') == len(rows) + 21
    assert metric(page, 'kvtool_serve_requests_total{status="422"}') == 8
    assert metric(page, "kvtool_serve_request_seconds_count") == 23

    summary = server.stop(signal.SIGINT)
    assert summary["requests"] == 23 and summary["rows"] == len(rows) + 21


def _federated_pair(
    servers: Any, models: dict[str, Path], tables: dict[str, Path], deadline_ms: str = "15"
) -> tuple[Server, Server, list[Any]]:
    port, rendezvous = free_port(), f"tcp://127.0.0.1:{free_port()}"
    publisher_args = [
        "--model", models["p_split"], "--passive", tables["passive_test"], "--rendezvous", rendezvous,
        "--timeout", "5", *security_args("passive"),
    ]  # fmt: skip
    advertiser_args = [
        "--model", models["a_split"], "--fallback", models["local"], "--active", tables["active_test"],
        "--rendezvous", rendezvous, "--timeout", "5", "--deadline-ms", deadline_ms, *security_args("active"),
    ]  # fmt: skip
    advertiser = servers(advertiser_args, port=port)
    publisher = servers(publisher_args, party="passive")
    advertiser.wait(lambda ready: ready["publisher"] == "connected")
    return advertiser, publisher, publisher_args


def test_federated_mode_matches_score_then_falls_back_and_resumes(
    models: dict[str, Path], tables: dict[str, Path], servers: Any, tmp_path: Path
) -> None:
    advertiser, publisher, publisher_args = _federated_pair(servers, models, tables, deadline_ms="2000")
    rows = request_rows(tables["active_test"], schema_of(models["a_split"]))
    expected = tmp_path / "federated.csv"
    active, passive = run_pair(
        "score",
        ["--mode", "federated", "--model", models["a_split"], "--fallback", models["local"],
         "--active", tables["active_test"], "--out", expected],
        ["--mode", "federated", "--model", models["p_split"], "--passive", tables["passive_test"]],
    )  # fmt: skip
    assert active.code == 0 and passive.code == 0, active.stderr + passive.stderr
    reference = reference_scores(expected)
    answered = [advertiser.score([row])["results"][0] for row in rows]  # one row per request
    federated = [r for r in answered if r["path"] == "federated"]
    assert len(federated) == sum(mode == "federated" for _, mode in reference.values()) > 50
    for result in answered:
        score, mode = reference[result["id"]]
        assert result["path"] == mode and abs(result["score"] - score) < 1e-5, result
        assert result["reason"] is None if mode == "federated" else result["reason"] == "not-agreed"

    publisher.kill()  # SIGKILL: no goodbye; the next requests find the session broken
    agreed = [row for row, r in zip(rows, answered, strict=True) if r["path"] == "federated"][:40]
    after = [advertiser.score([row])["results"][0] for row in agreed]
    assert all(r["path"] == "local" and r["reason"] == "publisher-down" for r in after[1:]), after
    status, page = advertiser.request("GET", "/metrics")
    assert metric(page, 'kvtool_serve_rows_total{path="local",reason="publisher-down"}') >= 39
    assert metric(page, "kvtool_serve_publisher_connected") == 0
    assert metric(page, "kvtool_serve_fallback_ratio") > 0
    assert advertiser.wait()["publisher"] == "disconnected"

    servers(publisher_args, party="passive")  # the publisher comes back
    advertiser.wait(lambda ready: ready["publisher"] == "connected" and ready["sessions"] == 2)
    again = advertiser.score(agreed)["results"]
    assert all(r["path"] == "federated" for r in again)
    assert all(abs(r["score"] - reference[r["id"]][0]) < 1e-5 for r in again)

    summary = advertiser.stop()
    assert summary["publisher_sessions"] == 2 and summary["rows_federated"] == len(federated) + len(agreed)


def test_a_stalled_publisher_costs_the_deadline_not_the_request(
    models: dict[str, Path], tables: dict[str, Path], servers: Any
) -> None:
    advertiser, publisher, _ = _federated_pair(servers, models, tables, deadline_ms="50")
    rows = request_rows(tables["active_test"], schema_of(models["a_split"]))
    first = [advertiser.score([row])["results"][0] for row in rows[:60]]
    agreed = [row for row, r in zip(rows[:60], first, strict=True) if r["path"] == "federated"]
    assert agreed
    publisher.process.send_signal(signal.SIGSTOP)  # alive, silent
    try:
        for row in agreed[:5]:
            started = time.perf_counter()
            result = advertiser.score([row])["results"][0]
            took = time.perf_counter() - started
            assert result["path"] == "local" and result["reason"] == "deadline", result
            assert took < 1.0  # the 50 ms deadline, not the link's 5 s timeout
    finally:
        publisher.process.send_signal(signal.SIGCONT)
    advertiser.wait(lambda ready: ready["publisher"] == "connected")
    status, page = advertiser.request("GET", "/metrics")
    assert metric(page, 'kvtool_serve_rows_total{path="local",reason="deadline"}') == 5


def test_sighup_reloads_the_model_and_refuses_a_wrong_one(
    models: dict[str, Path], tables: dict[str, Path], servers: Any, tmp_path: Path
) -> None:
    served = tmp_path / "served.safetensors"
    shutil.copy(models["local"], served)
    port = free_port()
    server = servers(["--model", served], port=port)
    before = server.wait()["model"]
    row = request_rows(tables["active_test"], schema_of(models["local"]))[0]
    shutil.copy(models["a_split"], served)  # another kind of model: refused, the old one serves on
    server.process.send_signal(signal.SIGHUP)
    ready = server.wait(lambda ready: ready["reloads"]["refused"] == 1)
    assert ready["model"] == before
    assert server.score([row])["model"] == before
    retrained = tmp_path / "retrained.safetensors"
    kvtool_json("vfl", "train-local", "--active", tables["active_train"], "--epochs", "1", "--out", retrained,
                "--quiet")  # fmt: skip
    shutil.copy(retrained, served)
    server.process.send_signal(signal.SIGHUP)
    ready = server.wait(lambda ready: ready["reloads"]["ok"] == 1)
    assert ready["model"] != before
    assert server.score([row])["model"] == ready["model"]
    assert server.stop()["reloads"] == {"ok": 1, "refused": 1}


def test_bad_command_lines_are_one_line_and_exit_2(models: dict[str, Path], tmp_path: Path) -> None:
    busy = free_port()
    cases = {
        ("--port", "0"): "--port 0",
        ("--deadline-ms", "0"): "--deadline-ms",
        ("--max-batch", "100000"): "--max-batch",
        ("--party", "observer"): "--party observer",
        ("--party", "passive", "--rendezvous", "tcp://127.0.0.1:1", "--insecure"): "--passive",
        ("--model", tmp_path / "absent.safetensors"): "absent.safetensors",
        ("--model", models["a_split"]): "--rendezvous",
        ("--model", models["local"], "--passive", tmp_path / "b.csv"): "--party passive",
        ("--model", models["local"], "--insecure"): "--insecure",
        ("--model", models["local"], "--rendezvous", "tcp://10.1.2.3:5", "--insecure"): "loopback",
    }
    for args, text in cases.items():
        result = kvtool("vfl", "serve", *args, env={"KVTOOL_DEBUG": ""})
        assert result.exit_code == 2, (args, result.stderr)
        assert text in result.stderr and result.stderr.count("\n") == 1, (args, result.stderr)
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", busy))
        taken.listen()
        result = kvtool(
            "vfl", "serve", "--model", models["local"], "--port", str(busy), env={"KVTOOL_DEBUG": ""}
        )
    assert result.exit_code == 2 and "cannot listen" in result.stderr and result.stderr.count("\n") == 1


def test_sigterm_drains_a_request_in_flight(
    models: dict[str, Path], tables: dict[str, Path], servers: Any
) -> None:
    """A request waiting on a stalled publisher when SIGTERM arrives is still answered."""
    import threading

    advertiser, publisher, _ = _federated_pair(servers, models, tables, deadline_ms="1500")
    rows = request_rows(tables["active_test"], schema_of(models["a_split"]))
    first = advertiser.score(rows[:60])["results"]
    agreed = [row for row, r in zip(rows[:60], first, strict=True) if r["path"] == "federated"]
    publisher.process.send_signal(signal.SIGSTOP)
    answers: list[Any] = []
    try:
        waiting = threading.Thread(
            target=lambda: answers.append(advertiser.request("POST", "/score", {"rows": agreed}))
        )
        waiting.start()
        time.sleep(0.4)  # the request now waits on the publisher
        summary = advertiser.stop()  # SIGTERM; returns once the process has exited
        waiting.join(timeout=10)
    finally:
        publisher.process.send_signal(signal.SIGCONT)
    status, body = answers[0]
    assert status == 200 and {r["reason"] for r in body["results"]} == {"deadline"}
    assert summary["requests"] == 2
