"""Private id alignment: ``kvtool vfl align``, an ECDH private set intersection (PSI).

Neither party sends an id. The protocol is OpenMined's ECDH-PSI on P-256
(``openmined.psi``; no cryptography is written here), with the active party as the
client and the passive party as the server:

1. handshake: both parties agree on the options and see each other's row count and id
   type (a different id type is refused on both sides).
2. setup: the passive party encrypts its ids under its own key and sends them as a
   compressed set (GCS); the active party cannot decrypt them.
3. requests, in chunks: the active party sends its ids encrypted under its key; the
   passive party encrypts them again under its own and returns them. Only the active
   party learns which of its rows are in the intersection.
4. wire keys: each intersection row is named on the wire by a 64-bit key,
   HMAC-SHA256(session key, id), which only these two parties can compute.
   ``--reveal both`` sends the active party's intersection keys, so the passive party
   learns the intersection (and drops PSI false positives); ``--reveal active-only``
   sends nothing: the passive party keeps the keys of all its rows and later serves
   whichever keys it is asked for (in training, the rows it is asked for still reveal
   the intersection over time; active-only hides it at alignment time and limits what
   scoring reveals).
5. result: both parties exchange a status and the fingerprint of the final key list,
   and only then write their ``vfl.alignment`` artifact.

Every long computation runs while the other party waits; a keepalive every few seconds
keeps its wait within ``--timeout`` however large the tables.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import torch

from kedit_vfl.artifacts import (
    Artifact,
    config_to_dict,
    data_fingerprint,
    load_artifact,
    make_provenance,
    save_artifact,
)
from kedit_vfl.errors import PeerError, UserError
from kedit_vfl.progress import SILENT, Reporter
from kedit_vfl.vfl.channel.protocol import Session, exchange, handshake, peer_rows
from kedit_vfl.vfl.channel.session import read_secret, security_of
from kedit_vfl.vfl.channel.transport import Channel, open_channel
from kedit_vfl.vfl.config import REVEALS as REVEALS
from kedit_vfl.vfl.config import AlignConfig
from kedit_vfl.vfl.data.read import open_table, read_ids

KIND = "vfl.alignment"
LIBRARY = "openmined.psi 2.0.6"
PROTOCOL = "ECDH-PSI, P-256, client=active"
DATA_STRUCTURE = "gcs"
CHUNK = 50_000  # client ids per PSI request: ~6 s of curve work each on one core
POINT_BYTES = 64  # a compressed P-256 point (33 bytes) with protobuf framing, generously
SETUP_BYTES_PER_ID = 32  # a Golomb-compressed set holds log2(n/fpr) + 1.5 bits per id
KEY_MASK = np.int64(0x7FFF_FFFF_FFFF_FFFF)
KEEPALIVE, READY, FAILED = 101, 102, 103

T = TypeVar("T")


@dataclass(frozen=True)
class Alignment:
    """A loaded alignment: this party's row for each wire key."""

    keys: torch.Tensor  # (N,) int64 wire keys
    rows: torch.Tensor  # (N,) int64 own row of each key
    fingerprint: str
    reveal: str
    intersection_size: int | None
    run_id: str


# -- wire keys ------------------------------------------------------------------------------
def wire_keys(ids: pa.ChunkedArray | pa.Array, key: bytes) -> np.ndarray:
    """Non-negative int64 per id: the first 8 bytes of HMAC-SHA256(key, id), top bit cleared."""
    digests = b"".join(hmac.digest(key, str(i).encode(), "sha256")[:8] for i in ids.to_pylist())
    return np.frombuffer(digests, dtype="<i8").astype(np.int64) & KEY_MASK


def id_type_name(kind: pa.DataType) -> str:
    """The id column's Arrow type, with same-valued variants named alike (large_string is
    string, every integer width int64): ids compare as text, so only the family matters."""
    if pa.types.is_integer(kind):
        return "int64"
    if pa.types.is_large_string(kind) or pa.types.is_string_view(kind):
        return "string"
    return str(kind)


def fingerprint(sorted_keys: np.ndarray) -> str:
    """sha256 of the sorted key list as little-endian int64."""
    return hashlib.sha256(np.ascontiguousarray(sorted_keys, dtype="<i8").tobytes()).hexdigest()


def _unique(keys: np.ndarray, party: str) -> None:
    if len(np.unique(keys)) != len(keys):
        raise UserError(
            f"two of the {party} party's ids got the same 64-bit wire key (about 1 in 10^7 per "
            "10^6 ids); run the alignment again (a new session draws new keys)"
        )


# -- the PSI steps, on plain lists (the wire comes later) -------------------------------------
def _psi() -> Any:
    import private_set_intersection.python as psi

    return psi


def new_server() -> Any:
    return _psi().server.CreateWithNewKey(True)


def new_client() -> Any:
    return _psi().client.CreateWithNewKey(True)


def server_setup(server: Any, items: list[str], client_rows: int, fpr: float) -> bytes:
    """The server's encrypted set, compressed (GCS) for ``client_rows`` client ids in all."""
    psi = _psi()
    return server.CreateSetupMessage(fpr, client_rows, items, psi.DataStructure.GCS).SerializeToString()


def client_request(client: Any, items: list[str]) -> bytes:
    return client.CreateRequest(items).SerializeToString()


def server_answer(server: Any, request: bytes) -> bytes:
    message = _psi().Request()
    message.ParseFromString(request)
    return server.ProcessRequest(message).SerializeToString()


def parse_setup(setup: bytes) -> Any:
    message = _psi().ServerSetup()
    message.ParseFromString(setup)
    return message


def client_intersection(client: Any, setup: Any, response: bytes) -> np.ndarray:
    """Indices (into the request's items, ascending) of the client ids the server holds."""
    message = _psi().Response()
    message.ParseFromString(response)
    return np.sort(np.asarray(client.GetIntersection(setup, message), dtype=np.int64))


def chunks(n: int, size: int = CHUNK) -> list[tuple[int, int]]:
    return [(start, min(start + size, n)) for start in range(0, n, size)]


def _setup_limit(rows: int) -> int:
    return (1 << 20) + SETUP_BYTES_PER_ID * rows


def _parsed(parse: Callable[[bytes], T], message: bytes, what: str) -> T:
    """A PSI message parsed by the library; a malformed one is the peer's fault."""
    from google.protobuf.message import Error as ProtobufError

    try:
        return parse(message)
    except (ValueError, RuntimeError, TypeError, ProtobufError) as exc:
        raise PeerError(f"protocol error: the other party sent a malformed PSI {what}") from exc


def _parsed_answer(client: Any, setup: Any, response: bytes, asked: int) -> np.ndarray:
    hits = _parsed(lambda r: client_intersection(client, setup, r), response, "answer")
    if len(hits) and (hits[0] < 0 or hits[-1] >= asked):
        raise PeerError("protocol error: the PSI answer names rows outside the request")
    return hits


# -- waiting without timing out -------------------------------------------------------------
def _work(channel: Channel, fn: Callable[[], T]) -> T:
    """Run ``fn`` while the other party waits in :func:`_wait`, sending it a keepalive every
    few seconds; a user error here is passed on, so both parties stop with the same reason."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the calling thread below
            box["error"] = exc

    channel.flush("queued messages")  # what was said before the work must not wait for it
    thread = threading.Thread(target=target, daemon=True, name="kvtool-align-work")
    thread.start()
    interval = max(0.1, min(5.0, channel.timeout / 4))
    while True:
        thread.join(interval)
        if not thread.is_alive():
            break
        channel.send(torch.tensor([KEEPALIVE, 0, 0, 0], dtype=torch.int64), "keepalive")
        channel.flush("keepalive")
    if "error" in box:
        if isinstance(box["error"], UserError):
            channel.send(torch.tensor([FAILED, 0, 0, 0], dtype=torch.int64), "status")
            channel.send_json({"error": str(box["error"])}, "error")
            channel.flush("error")
        raise box["error"]
    channel.send(torch.tensor([READY, 0, 0, 0], dtype=torch.int64), "status")
    return box["value"]


def _wait(channel: Channel, what: str) -> None:
    """Wait for the other party's :func:`_work`; each keepalive restarts the timeout."""
    while True:
        op = int(channel.recv((4,), torch.int64, what)[0])
        if op == READY:
            return
        if op == FAILED:
            error = channel.recv_json("error")
            raise UserError(f"the {channel.peer_party} party refused: {str(error.get('error'))[:300]}")
        if op != KEEPALIVE:
            raise PeerError(f"protocol error: unexpected message {op} from the {channel.peer_party} party")


# -- the two parties ----------------------------------------------------------------------
def _run_active(session: Session, ids: pa.ChunkedArray, config: AlignConfig, reporter: Reporter) -> dict:
    channel, items = session.channel, ids.to_pylist()
    client = new_client()
    _wait(channel, "the passive party's PSI setup")
    setup = _parsed(parse_setup, channel.recv_bytes("PSI setup", _setup_limit(peer_rows(session))), "setup")
    found = []
    parts = chunks(len(items))
    with reporter.task("private set intersection", total=len(items)) as task:
        for start, stop in parts:
            request = _work(channel, lambda s=start, e=stop: client_request(client, items[s:e]))
            channel.send_bytes(request, "PSI request")
            _wait(channel, "the passive party's PSI answer")
            response = channel.recv_bytes("PSI answer", 1024 + POINT_BYTES * (stop - start))
            hits = _work(channel, lambda r=response, n=stop - start: _parsed_answer(client, setup, r, n))
            found.append(hits + start)
            task.advance(stop - start)
    rows = np.concatenate(found) if found else np.zeros(0, dtype=np.int64)  # ascending
    keys = _work(channel, lambda: _checked_keys(ids.take(pa.array(rows)), session.key, "active"))
    if config.reveal == "both":
        order = np.argsort(keys, kind="stable")
        channel.send(torch.tensor([len(keys)], dtype=torch.int64), "intersection size")
        channel.send(torch.from_numpy(keys[order]), "intersection keys")
        _wait(channel, "the passive party's check of the keys")
        held = channel.recv((len(keys),), torch.bool, "held keys").numpy()
        keep = np.sort(order[held])
        rows, keys = rows[keep], keys[keep]
    else:
        _wait(channel, "the passive party's wire keys")
    return {"rows": rows, "keys": keys, "fingerprint": fingerprint(np.sort(keys)), "size": len(keys)}


def _checked_keys(ids: pa.ChunkedArray | pa.Array, key: bytes, party: str) -> np.ndarray:
    keys = wire_keys(ids, key)
    _unique(keys, party)
    return keys


def _run_passive(session: Session, ids: pa.ChunkedArray, config: AlignConfig, reporter: Reporter) -> dict:
    channel, items = session.channel, ids.to_pylist()
    server = new_server()
    client_rows = peer_rows(session)
    setup = _work(channel, lambda: server_setup(server, items, client_rows, config.fpr))
    channel.send_bytes(setup, "PSI setup")
    with reporter.task("answering PSI requests", total=client_rows) as task:
        for start, stop in chunks(client_rows):
            _wait(channel, "the active party's PSI request")
            request = channel.recv_bytes("PSI request", 1024 + POINT_BYTES * (stop - start))
            answer = _work(channel, lambda r=request: _parsed(partial(server_answer, server), r, "request"))
            channel.send_bytes(answer, "PSI answer")
            _wait(channel, "the active party's intersection")
            task.advance(stop - start)
    _wait(channel, "the active party's wire keys")
    if config.reveal == "both":
        (n,) = channel.recv((1,), torch.int64, "intersection size").tolist()
        if not 0 <= n <= client_rows:
            raise PeerError(f"protocol error: the active party announced {n:,} intersection keys")
        sent = channel.recv((n,), torch.int64, "intersection keys").numpy()
        if n > 1 and not bool((np.diff(sent) > 0).all()):
            raise PeerError("protocol error: the active party's intersection keys are not sorted and unique")
    own = _work(channel, lambda: _checked_keys(ids, session.key, "passive"))
    order = np.argsort(own, kind="stable")
    sorted_own = own[order]
    if config.reveal == "active-only":
        return {"rows": order, "keys": sorted_own, "fingerprint": None, "size": None}
    where = np.searchsorted(sorted_own, sent).clip(max=max(len(own) - 1, 0))
    held = sorted_own[where] == sent
    channel.send(torch.from_numpy(held), "held keys")
    keys = sent[held]
    return {"rows": order[where[held]], "keys": keys, "fingerprint": fingerprint(keys), "size": len(keys)}


def _finish(channel: Channel, result: dict[str, Any], reveal: str) -> str:
    """Both parties say whether they succeeded and compare fingerprints before writing."""
    me, peer = channel.party, channel.peer_party
    error = None
    if result["size"] == 0:
        error = "no id appears in both parties' tables; the parties must key the same users"
    mine = {"ok": error is None, "error": error, "fingerprint": result["fingerprint"]}
    theirs = exchange(channel, mine, "alignment result")
    if error is not None:
        raise UserError(error)
    if not theirs.get("ok"):
        raise UserError(f"the {peer} party refused: {str(theirs.get('error'))[:300]}")
    needs_theirs = reveal == "both" or me == "passive"
    if needs_theirs and not (isinstance(theirs.get("fingerprint"), str) and _hex64(theirs["fingerprint"])):
        raise PeerError(f"protocol error: the {peer} party sent no valid alignment fingerprint")
    if reveal == "active-only":
        return result["fingerprint"] if me == "active" else str(theirs["fingerprint"])
    if theirs["fingerprint"] != result["fingerprint"]:
        raise PeerError(
            f"the parties' alignments differ ({me} {result['fingerprint'][:12]}, {peer} "
            f"{str(theirs['fingerprint'])[:12]}); nothing was written, run the alignment again"
        )
    return result["fingerprint"]


def _hex64(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def private_overlap(
    session: Session, ids: pa.ChunkedArray, reporter: Reporter | None = None, fpr: float = 1e-9
) -> tuple[torch.Tensor, torch.Tensor]:
    """The overlap of a two-party run, by the same PSI as ``kvtool vfl align --reveal both``
    inside the run's own session: this party's row and the wire key of each overlap row."""
    options = AlignConfig(
        party=session.party, rendezvous="tcp://127.0.0.1:1", table=Path("."), fpr=fpr, insecure=True
    )  # only .fpr and .reveal are read: the session is already open
    run = _run_active if session.party == "active" else _run_passive
    result = run(session, ids, options, reporter or SILENT)
    _finish(session.channel, result, "both")
    order = np.ascontiguousarray(result["rows"], dtype=np.int64)
    return torch.from_numpy(order), torch.from_numpy(np.ascontiguousarray(result["keys"], dtype=np.int64))


def align(config: AlignConfig, reporter: Reporter = SILENT) -> dict[str, Any]:
    """Run this party's side of the private alignment and write its ``vfl.alignment`` artifact."""
    started = time.perf_counter()
    source = open_table(config.table, config.party)
    source.require_column(config.id_col, "id")
    table = source.read_all([config.id_col])  # only the ids: the features are not needed here
    ids = read_ids(table, config.id_col, config.table)
    id_type = id_type_name(table[config.id_col].type)
    shared = {
        "reveal": config.reveal,
        "fpr": config.fpr,
        "psi_library": LIBRARY,
        "data_structure": DATA_STRUCTURE,
    }
    secret = read_secret(config.secret_file)
    reporter.log(
        f"{config.party} party: {len(ids):,} ids; waiting for the other party at {config.rendezvous}"
    )
    channel = open_channel(
        config.party,
        config.rendezvous,
        config.timeout,
        security_of(config),
        hint="nothing was written; start both parties again",
        deadline=config.deadline,
    )
    try:
        session = handshake(
            channel, "align", shared, {"rows": len(ids), "id_type": id_type}, secret, None, None
        )
        types = {config.party: id_type, channel.peer_party: session.peer.get("id_type")}
        if types["active"] != types["passive"]:
            raise UserError(
                f"the parties' id columns have different types (active {types['active']}, passive "
                f"{types['passive']}); convert one so both key users the same way"
            )
        reporter.log(
            f"connected to the {channel.peer_party} party (run {session.run_id}, "
            f"{session.peer.get('rows'):,} rows there); running the private set intersection"
        )
        run = _run_active if config.party == "active" else _run_passive
        result = run(session, ids, config, reporter)
        final = _finish(channel, result, config.reveal)
        traffic = channel.traffic()
    finally:
        channel.close()
    artifact = Artifact(
        kind=KIND,
        tensors={
            "keys": torch.from_numpy(np.ascontiguousarray(result["keys"], dtype=np.int64)),
            "rows": torch.from_numpy(np.ascontiguousarray(result["rows"], dtype=np.int64)),
        },
        config=config_to_dict(config),
        provenance=make_provenance(
            "vfl align", config_to_dict(config), data=data_fingerprint([config.table])
        ),
        extra={
            "party": config.party,
            "reveal": config.reveal,
            "intersection_size": result["size"],
            "fingerprint": final,
            "library": LIBRARY,
            "protocol": PROTOCOL,
            "data_structure": DATA_STRUCTURE,
            "fpr": config.fpr,
            "id_col": config.id_col,
            "table_rows": len(ids),
            "table": data_fingerprint([config.table]),
            "run_id": session.run_id,
        },
    )
    save_artifact(artifact, config.output)
    return {
        "party": config.party,
        "rows": len(ids),
        "intersection_size": result["size"],
        "fingerprint": final,
        "run_id": session.run_id,
        "seconds": round(time.perf_counter() - started, 2),
        "out": str(config.output),
        "traffic": traffic,
    }


@dataclass(frozen=True)
class AlignmentRecord:
    """What an alignment artifact's ``extra`` must hold (checked on load)."""

    party: str
    reveal: str
    fingerprint: str
    table: dict[str, str]
    intersection_size: int | None = None
    run_id: str = ""


def load_alignment(path: str | Path, party: str, table_path: str | Path) -> Alignment:
    """This party's alignment for this table; refuse the other party's or another table's,
    and a file whose record or keys are not what ``kvtool vfl align`` writes."""
    import dataclasses

    from kedit_vfl.metadata import typed

    artifact = load_artifact(path, KIND)
    known = {f.name for f in dataclasses.fields(AlignmentRecord)}
    record = typed(
        AlignmentRecord, {k: v for k, v in artifact.extra.items() if k in known}, str(path), "extra"
    )
    if record.party != party:
        raise UserError(
            f"{path}: this is the {record.party[:20]} party's alignment; the {party} party needs its own"
        )
    if record.reveal not in REVEALS:
        raise UserError(f"{path}: artifact metadata is malformed (reveal {record.reveal[:20]!r})")
    if sorted(data_fingerprint([table_path]).values()) != sorted(record.table.values()):
        raise UserError(
            f"{path}: computed for a different table than {table_path}; run 'kvtool vfl align' again"
        )
    keys, rows = artifact.tensors.get("keys"), artifact.tensors.get("rows")
    if (
        keys is None
        or rows is None
        or keys.dtype != torch.int64
        or rows.dtype != torch.int64
        or keys.dim() != 1
        or keys.shape != rows.shape
        or (len(keys) > 1 and party == "passive" and not bool((keys[1:] > keys[:-1]).all()))
        or (len(rows) and bool((rows < 0).any()))
    ):
        raise UserError(f"{path}: the alignment's keys and rows are malformed; run 'kvtool vfl align' again")
    return Alignment(
        keys=keys,
        rows=rows,
        fingerprint=record.fingerprint,
        reveal=record.reveal,
        intersection_size=record.intersection_size,
        run_id=record.run_id,
    )
