"""Which secure transport for the two-party channel: Python's ``ssl`` (TLS 1.3) or gRPC.

Both with mutual TLS and the same pinned self-signed certificates (``kvtool vfl keygen``),
on 127.0.0.1, each side in its own process. Two message shapes of the VFL protocol:

- a training step: the active party sends 128 row keys and 128 x 32 float gradients
  (17 KB), the passive party answers 128 x 32 float embeddings (16 KB);
- a scoring request: 4,096 row keys (32 KB) out, 4,096 x 32 floats (512 KB) back.

Reported: round trips per second (one request and its answer) and the plain-TCP figure
beside them. gRPC runs one bidirectional stream of raw bytes (no protobuf encoding cost
counted against it). grpcio is not a kvtool dependency: ``pip install grpcio`` to rerun.

Run: .venv/bin/python benchmarks/vfl_transport_choice.py [--seconds 5]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import socket
import ssl
import struct
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SHAPES = {"training step (17 KB -> 16 KB)": (128 * 8 + 128 * 32 * 4, 128 * 32 * 4),
          "scoring request (32 KB -> 512 KB)": (4096 * 8, 4096 * 32 * 4)}  # fmt: skip


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _contexts(folder: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    for ctx, me, peer in ((server, "a", "p"), (client, "p", "a")):
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_cert_chain(folder / me / "cert.pem", folder / me / "key.pem")
        ctx.load_verify_locations(folder / peer / "cert.pem")
        ctx.verify_mode = ssl.CERT_REQUIRED
    client.check_hostname = False
    return server, client


def _read(sock: socket.socket, n: int, buffer: bytearray) -> None:
    view, got = memoryview(buffer)[:n], 0
    while got < n:
        k = sock.recv_into(view[got:])
        if not k:
            raise ConnectionError("closed")
        got += k


def _socket_server(port: int, folder: str, tls: bool, answer: int, ready: mp.Event) -> None:
    listener = socket.create_server(("127.0.0.1", port))
    ready.set()
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if tls:
        conn = _contexts(Path(folder))[0].wrap_socket(conn, server_side=True)
    reply, buffer = b"\0" * answer, bytearray(1 << 20)
    try:
        while True:
            _read(conn, 4, buffer)
            (n,) = struct.unpack(">I", buffer[:4])
            _read(conn, n, buffer)
            conn.sendall(struct.pack(">I", answer) + reply)
    except (ConnectionError, ssl.SSLError, OSError):
        return


def _socket_client(port: int, folder: Path, tls: bool, request: int, answer: int, seconds: float) -> float:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if tls:
        sock = _contexts(folder)[1].wrap_socket(sock)
    payload, buffer = struct.pack(">I", request) + b"\1" * request, bytearray(1 << 20)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        sock.sendall(payload)
        _read(sock, 4, buffer)
        _read(sock, answer, buffer)
        count += 1
    rate = count / (time.perf_counter() - start)
    sock.close()
    return rate


def _grpc_server(port: int, folder: str, answer: int, ready: mp.Event) -> None:
    from concurrent import futures

    import grpc

    root = Path(folder)
    reply = b"\0" * answer

    def exchange(requests, context):  # noqa: ANN001 - grpc's generic handler signature
        for _ in requests:
            yield reply

    handler = grpc.method_handlers_generic_handler(
        "kvtool.Bench", {"Exchange": grpc.stream_stream_rpc_method_handler(exchange)}
    )
    options = [("grpc.max_receive_message_length", 8 << 20), ("grpc.max_send_message_length", 8 << 20)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=options)
    server.add_generic_rpc_handlers((handler,))
    credentials = grpc.ssl_server_credentials(
        [((root / "a" / "key.pem").read_bytes(), (root / "a" / "cert.pem").read_bytes())],
        root_certificates=(root / "p" / "cert.pem").read_bytes(),
        require_client_auth=True,
    )
    server.add_secure_port(f"127.0.0.1:{port}", credentials)
    server.start()
    ready.set()
    server.wait_for_termination(timeout=120)


def _grpc_client(port: int, folder: Path, request: int, seconds: float) -> float:
    import queue

    import grpc

    credentials = grpc.ssl_channel_credentials(
        root_certificates=(folder / "a" / "cert.pem").read_bytes(),
        private_key=(folder / "p" / "key.pem").read_bytes(),
        certificate_chain=(folder / "p" / "cert.pem").read_bytes(),
    )
    options = [
        ("grpc.ssl_target_name_override", "kvtool active"),
        ("grpc.max_receive_message_length", 8 << 20),
    ]
    channel = grpc.secure_channel(f"127.0.0.1:{port}", credentials, options=options)
    call = channel.stream_stream("/kvtool.Bench/Exchange")
    outbox: queue.Queue = queue.Queue()
    answers = call(iter(outbox.get, None))
    payload, count, start = b"\1" * request, 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        outbox.put(payload)
        next(answers)
        count += 1
    rate = count / (time.perf_counter() - start)
    outbox.put(None)
    channel.close()
    return rate


def measure(seconds: float) -> list[dict]:
    from kedit_vfl.vfl.channel.identity import generate_identity

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        generate_identity(folder / "a", "active")
        generate_identity(folder / "p", "passive")
        for shape, (request, answer) in SHAPES.items():
            row = {"shape": shape}
            for name, tls in (("plain TCP", False), ("ssl TLS 1.3", True)):
                port, ready = _free_port(), mp.Event()
                server = mp.Process(target=_socket_server, args=(port, str(folder), tls, answer, ready))
                server.start()
                ready.wait(10)
                row[name] = _socket_client(port, folder, tls, request, answer, seconds)
                server.join(10)
            try:
                import grpc  # noqa: F401
            except ImportError:
                row["gRPC mutual TLS"] = None
            else:
                port, ready = _free_port(), mp.Event()
                server = mp.Process(target=_grpc_server, args=(port, str(folder), answer, ready), daemon=True)
                server.start()
                ready.wait(10)
                row["gRPC mutual TLS"] = _grpc_client(port, folder, request, seconds)
                server.terminate()
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    rows = measure(args.seconds)
    names = ["plain TCP", "ssl TLS 1.3", "gRPC mutual TLS"]
    lines = [
        "### Secure transport: round trips per second on 127.0.0.1 (2 cores, one process per side)",
        "",
        "| message shape | " + " | ".join(names) + " | ssl / plain | gRPC / plain |",
        "| --- | " + " | ".join("---:" for _ in names) + " | ---: | ---: |",
    ]
    for row in rows:
        cells = [f"{row[n]:,.0f}" if row[n] else "n/a" for n in names]
        ratio_ssl = row["ssl TLS 1.3"] / row["plain TCP"]
        ratio_grpc = f"{row['gRPC mutual TLS'] / row['plain TCP']:.2f}x" if row["gRPC mutual TLS"] else "n/a"
        lines.append(f"| {row['shape']} | " + " | ".join(cells) + f" | {ratio_ssl:.2f}x | {ratio_grpc} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "vfl_transport_choice.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "vfl_transport_choice.json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
