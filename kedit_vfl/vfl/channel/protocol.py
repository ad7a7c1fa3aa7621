"""The two-party protocol: handshake, id alignment, and the request loop.

Everything below runs inside the authenticated, encrypted channel of
:mod:`kedit_vfl.vfl.channel.transport`. After the connection the parties exchange, in order:

1. ``hello``: protocol version, party, command, a random nonce and a fresh X25519 public
   key each. A second active party, another command or another version is refused on
   both sides. The session key (:func:`session_key`) names rows on the wire.
2. ``details``: the run configuration both sides must share (seeds, epochs, sizes...),
   a summary of each table, the run id of the artifacts each side starts from, the
   checkpoints each holds (with ``--resume``), the fingerprint of the alignment each
   uses, and, with ``--secret-file``, an HMAC of both nonces under the shared secret (an
   optional extra check; the secret itself never crosses). Each side checks every field
   and refuses a mismatch, naming it, so both fail the same way.
3. alignment: a private set intersection inside the session (or a ``kvtool vfl align``
   file given as ``--alignment``); only with ``--ids-in-clear`` on both sides do the
   passive party's ids go to the active party. From then on rows are addressed by keys.
4. requests, driven by the active party: ``EMBED`` (row keys -> embeddings), ``STEP``
   (gradients for the embeddings since the last step), ``STEP_EMBED`` (both in one
   message: a training step's gradients ride with the next batch's keys, so a step
   costs one round trip), ``PHASE``, ``SNAPSHOT``, ``RESTORE``, ``CHECKPOINT`` and
   ``FINISH`` (answered with the passive party's result). A request for more than
   ``MAX_ROWS_PER_REQUEST`` rows, an unknown request or one the passive party cannot
   honour ends the run as a protocol error.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import torch

from kedit_vfl.errors import PeerError, UserError
from kedit_vfl.vfl.channel.party import EMBEDDING_DTYPE, KEY_DTYPE, PassiveParty
from kedit_vfl.vfl.channel.transport import Channel
from kedit_vfl.vfl.data.loading import align
from kedit_vfl.vfl.stages.checkpoint import Tag, latest_common

PROTOCOL_VERSION = 2
MAX_ROWS_PER_REQUEST = 65_536  # rows one embedding request may ask for
MAX_TABLE_ROWS = 10**10
MAX_ID_BYTES = 1024  # longest id, as JSON text, accepted from the peer
EMBED, STEP, PHASE, SNAPSHOT, RESTORE, CHECKPOINT, FINISH, STEP_EMBED = range(1, 9)


@dataclass
class Session:
    """An open, checked connection to the other party."""

    channel: Channel
    party: str
    run_id: str  # the same on both sides; stored in both parties' artifacts
    resume_from: Tag | None
    peer: dict[str, Any]  # the other party's table summary
    key: bytes  # a key only these two parties hold (see :func:`session_key`)


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _mac(secret: bytes, nonces: tuple[str, str], party: str) -> str:
    message = f"kvtool-vfl|{PROTOCOL_VERSION}|{party}|{nonces[0]}|{nonces[1]}".encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def exchange(channel: Channel, mine: dict[str, Any], what: str) -> dict[str, Any]:
    """Active sends first, passive answers: no side waits on a send."""
    if channel.party == "active":
        channel.send_json(mine, what)
        return channel.recv_json(what)
    theirs = channel.recv_json(what)
    channel.send_json(mine, what)
    return theirs


def _field(message: dict[str, Any], name: str, kinds: type | tuple[type, ...], what: str, peer: str) -> Any:
    """One field of a peer's message, of the expected type, or a protocol error."""
    value = message.get(name)
    if not isinstance(value, kinds) or isinstance(value, bool) and bool not in _as_tuple(kinds):
        raise PeerError(f"protocol error: the {peer} party's {what} has no valid '{name}'")
    return value


def _as_tuple(kinds: type | tuple[type, ...]) -> tuple[type, ...]:
    return kinds if isinstance(kinds, tuple) else (kinds,)


def _hex(text: str, size: int) -> bool:
    return len(text) == 2 * size and all(c in "0123456789abcdef" for c in text)


def session_key(private: Any, peer_public_hex: str, nonces: tuple[str, str], secret: bytes | None) -> bytes:
    """A key only the two connected parties hold: X25519 between fresh keys exchanged inside
    the authenticated channel, through HKDF-SHA256 over both nonces (and the shared secret)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    shared = private.exchange(X25519PublicKey.from_public_bytes(bytes.fromhex(peer_public_hex)))
    return HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=f"{nonces[0]}|{nonces[1]}".encode(),
        info=b"kvtool-vfl session key v2|" + (secret or b""),
    ).derive(shared)


def handshake(
    channel: Channel,
    command: str,
    shared: dict[str, Any],
    summary: dict[str, Any],
    secret: bytes | None,
    checkpoints: list[Tag] | None,
    partner: str | None,
    alignment: str | None = None,
) -> Session:
    """Agree on everything before the first row crosses; refuse any mismatch on both sides.

    ``partner`` is the run id of the artifact this party starts from, ``alignment`` the
    fingerprint of the private alignment it uses (``kvtool vfl align``), if any. Every
    field the peer sends is checked for type and size before it is used.
    """
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    me, peer = channel.party, channel.peer_party
    private = X25519PrivateKey.generate()
    public = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()
    hello = {
        "protocol": PROTOCOL_VERSION,
        "party": me,
        "command": command,
        "nonce": secrets.token_hex(16),
        "exchange": public,
    }
    theirs = exchange(channel, hello, "handshake")
    if theirs.get("protocol") != PROTOCOL_VERSION:
        raise PeerError(
            f"the {peer} party speaks protocol version {str(theirs.get('protocol'))[:20]}, "
            f"this one {PROTOCOL_VERSION}; run the same kvtool version on both sides"
        )
    if theirs.get("party") != peer:
        raise UserError(
            f"both processes were started with --party {me}; start the other one with --party {peer}"
        )
    if theirs.get("command") != command:
        raise UserError(
            f"the {peer} party runs 'kvtool vfl {str(theirs.get('command'))[:40]}', this one "
            f"'kvtool vfl {command}'; both parties must run the same command"
        )
    nonce = _field(theirs, "nonce", str, "handshake", peer)
    peer_public = _field(theirs, "exchange", str, "handshake", peer)
    if not _hex(nonce, 16) or not _hex(peer_public, 32):
        raise PeerError(f"protocol error: the {peer} party's handshake is malformed")
    nonces = (hello["nonce"], nonce) if me == "active" else (nonce, hello["nonce"])
    details = {
        "shared": shared,
        "summary": summary,
        "mac": _mac(secret, nonces, me) if secret is not None else None,
        "resume": [list(t) for t in checkpoints] if checkpoints is not None else None,
        "partner": partner,
        "alignment": alignment,
    }
    other = exchange(channel, details, "run details")
    other_shared = _field(other, "shared", dict, "run details", peer)
    _field(other, "summary", dict, "run details", peer)
    for name in ("mac", "partner", "alignment"):
        if other.get(name) is not None:
            _field(other, name, str, "run details", peer)
    other_resume = other.get("resume")
    if other_resume is not None and not (
        isinstance(other_resume, list)
        and len(other_resume) <= 1000
        and all(isinstance(t, list) and len(t) == 2 and all(type(x) is int for x in t) for t in other_resume)
    ):
        raise PeerError(f"protocol error: the {peer} party's run details have no valid 'resume'")
    problems = []
    if (secret is None) != (other["mac"] is None):
        who = me if secret is not None else peer
        problems.append(f"the {who} party requires a shared secret (--secret-file) and the other gave none")
    elif secret is not None and not hmac.compare_digest(other["mac"], _mac(secret, nonces, peer)):
        problems.append("the parties' shared secrets (--secret-file) differ")
    keys = sorted(set(shared) | set(other_shared))
    differ = [k for k in keys if shared.get(k) != other_shared.get(k)]
    if differ:
        shown = ", ".join(
            f"{_option(k)} ({me} {shared.get(k)!r}, {peer} {str(other_shared.get(k))[:60]!r})"
            for k in differ[:6]
        )
        problems.append(f"the parties disagree on {shown}")
    if partner != other.get("partner"):
        if partner is None or other.get("partner") is None:
            who = me if partner is not None else peer
            problems.append(f"only the {who} party starts from a two-party artifact of an earlier stage")
        else:
            problems.append(
                "the parties start from artifacts of different two-party runs "
                f"(run {partner} here, {other['partner'][:16]} there); use the pair one run wrote"
            )
    if alignment != other.get("alignment"):
        if alignment is None or other.get("alignment") is None:
            who = me if alignment is not None else peer
            problems.append(f"only the {who} party was given an alignment (--alignment)")
        else:
            problems.append(
                f"the parties' alignments differ (fingerprint {alignment[:12]}... here, "
                f"{other['alignment'][:12]}... there); "
                "give each party its file from the same 'kvtool vfl align' run"
            )
    resume_from = None
    if (checkpoints is None) != (other_resume is None):
        who = me if checkpoints is not None else peer
        problems.append(f"only the {who} party was started with --resume")
    elif checkpoints is not None:
        resume_from = latest_common(checkpoints, [tuple(t) for t in other_resume])
        if resume_from is None:
            problems.append("--resume: the parties hold no checkpoint in common; start both without --resume")
    if problems:
        raise UserError("two-party handshake refused: " + "; ".join(problems))
    channel.flush("run details")  # the peer must not wait for this side's next message to get them
    run_id = hashlib.sha256(f"{nonces[0]}|{nonces[1]}".encode()).hexdigest()[:16]
    key = session_key(private, peer_public, nonces, secret)
    return Session(channel, me, run_id, resume_from, other["summary"], key)


def peer_rows(session: Session) -> int:
    """The row count the peer declared, checked: it sizes what may be received later."""
    rows = session.peer.get("rows")
    if not isinstance(rows, int) or isinstance(rows, bool) or not 0 <= rows <= MAX_TABLE_ROWS:
        raise PeerError(f"protocol error: the {session.channel.peer_party} party declared no valid row count")
    return rows


def align_in_clear(session: Session, ids: pa.ChunkedArray) -> torch.Tensor:
    """The overlap, found by sending the passive party's ids to the active party.

    Only with ``--ids-in-clear`` on both sides: the active party then learns every user
    of the passive party. Returns this party's own row for each overlap position (in the
    active party's row order).
    """
    channel, what = session.channel, "ids for alignment"
    if session.party == "passive":
        channel.send_json({"ids": ids.cast(pa.string()).to_pylist()}, what)
        (n,) = channel.recv((1,), torch.int64, what).tolist()
        if not 0 <= n <= len(ids):
            raise PeerError(f"protocol error: the active party announced {n} overlap rows of {len(ids)}")
        rows = channel.recv((n,), torch.int64, what)
        if n and bool(((rows < 0) | (rows >= len(ids))).any()):
            raise PeerError("protocol error: the active party named rows this table does not have")
    else:
        declared = peer_rows(session)
        message = channel.recv_json(what, at_most=1024 + declared * (MAX_ID_BYTES + 4))
        received = message.get("ids")
        if (
            not isinstance(received, list)
            or len(received) != declared
            or not all(isinstance(i, str) for i in received)
        ):
            raise PeerError(f"protocol error: the passive party sent malformed {what}")
        peer_ids = pa.chunked_array([pa.array(received, pa.string())])
        rows, peer_rows_ = align(ids, peer_ids)
        channel.send(torch.tensor([len(rows)], dtype=torch.int64), what)
        channel.send(peer_rows_, what)
        n = len(rows)
    if n == 0:
        raise UserError("no id appears in both parties' tables; the parties must key the same users")
    return rows


class RemotePassive:
    """The passive party over the wire (the active party's :class:`Endpoint`).

    A step's gradients are held back until the next request, and travel with the next
    batch's keys when that request is an embedding (``STEP_EMBED``): per training step
    one header, one payload and one answer cross.
    """

    def __init__(self, channel: Channel, width: int) -> None:
        self.channel, self.width = channel, width
        self.result: dict[str, Any] = {}
        self.held: list[torch.Tensor] | None = None

    def _flush(self) -> None:
        if self.held is not None:
            self.channel.send_header(STEP, len(self.held))
            if self.held:
                self.channel.send(
                    torch.cat([g.reshape(-1) for g in self.held]).to(EMBEDDING_DTYPE), "gradients"
                )
            self.held = None

    def embed(self, keys: torch.Tensor, train: bool) -> torch.Tensor:
        keys = keys.to(KEY_DTYPE)
        if self.held is not None:
            grads = torch.cat([g.reshape(-1) for g in self.held]).to(EMBEDDING_DTYPE) if self.held else None
            self.channel.send_header(STEP_EMBED, len(keys), int(train), len(self.held))
            parts = ([grads.numpy().tobytes()] if grads is not None else []) + [keys.numpy().tobytes()]
            self.channel.send(
                torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.uint8), "gradients and row keys"
            )
            self.held = None
        else:
            self.channel.send_header(EMBED, len(keys), int(train))
            self.channel.send(keys, "row keys")
        return self.channel.recv((len(keys), self.width), EMBEDDING_DTYPE, "embeddings")

    def step(self, grads: list[torch.Tensor]) -> None:
        self.held = [g.detach().cpu() for g in grads]

    def phase(self, index: int) -> None:
        self._flush()
        self.channel.send_header(PHASE, index)

    def snapshot(self) -> None:
        self._flush()
        self.channel.send_header(SNAPSHOT)

    def restore(self) -> None:
        self._flush()
        self.channel.send_header(RESTORE)

    def checkpoint(self, tag: Tag) -> None:
        """Ask the passive party to save its checkpoint, and wait until it has: a tag is
        common to both parties only once both have written it."""
        self._flush()
        self.channel.send_header(CHECKPOINT, *tag)
        self.channel.recv((1,), torch.int64, "checkpoint confirmation")

    def finish(self) -> None:
        self._flush()
        self.channel.send_header(FINISH)
        self.result = self.channel.recv_json("the passive party's result")
        if not self.result.get("ok"):
            raise PeerError(f"the passive party failed at the end: {self.result.get('error')}")


def _split_gradients(flat: torch.Tensor, pending: list[torch.Tensor]) -> list[torch.Tensor]:
    sizes = [h.numel() for h in pending]
    return [part.view_as(h) for part, h in zip(flat.split(sizes), pending, strict=True)]


def serve(channel: Channel, party: PassiveParty) -> None:
    """Answer the active party's requests until it says ``FINISH``.

    A request this party cannot honour (a row outside the agreement, a step before a
    phase) is the peer's fault: it ends the run with a protocol error, never a traceback.
    """
    try:
        _serve(channel, party)
    except UserError as exc:
        raise PeerError(f"protocol error: {exc}") from exc


def _serve(channel: Channel, party: PassiveParty) -> None:
    while True:
        op, a, b, c = channel.recv_header()
        if op in (EMBED, STEP_EMBED) and not 0 <= a <= MAX_ROWS_PER_REQUEST:
            raise PeerError(
                f"protocol error: the active party asked for {a:,} rows in one request "
                f"(at most {MAX_ROWS_PER_REQUEST:,})"
            )
        if op in (STEP, STEP_EMBED):
            announced = a if op == STEP else c
            if announced != len(party.pending):
                raise PeerError(
                    f"protocol error: {announced} gradients announced for {len(party.pending)} embeddings"
                )
            floats = sum(h.numel() for h in party.pending)
            if op == STEP:
                flat = channel.recv((floats,), EMBEDDING_DTYPE, "gradients")
                party.step(_split_gradients(flat, party.pending))
                continue
            size = floats * EMBEDDING_DTYPE.itemsize
            payload = channel.recv((size + a * KEY_DTYPE.itemsize,), torch.uint8, "gradients and row keys")
            flat = payload[:size].clone().view(EMBEDDING_DTYPE) if floats else torch.zeros(0)
            party.step(_split_gradients(flat, party.pending))
            keys = payload[size:].clone().view(KEY_DTYPE)  # an aligned copy
            channel.send(party.embed(keys, bool(b)).to(EMBEDDING_DTYPE), "embeddings")
        elif op == EMBED:
            keys = channel.recv((a,), KEY_DTYPE, "row keys")
            channel.send(party.embed(keys, bool(b)).to(EMBEDDING_DTYPE), "embeddings")
        elif op == PHASE:
            party.phase(a)
        elif op == SNAPSHOT:
            party.snapshot()
        elif op == RESTORE:
            party.restore()
        elif op == CHECKPOINT:
            party.checkpoint((a, b))
            channel.send(torch.ones(1, dtype=torch.int64), "checkpoint saved")
        elif op == FINISH:
            party.finish()
            return
        else:
            raise PeerError(f"protocol error: unknown request {op} from the active party")
