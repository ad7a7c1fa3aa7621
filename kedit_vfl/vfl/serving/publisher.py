"""The publisher's side of ``kvtool vfl serve``: answer the advertiser's embedding
requests for agreed ids, for as long as it runs.

It connects to the advertiser's ``--rendezvous`` exactly as federated ``kvtool vfl score``
does (mutual TLS, handshake, private set intersection of the two tables), then answers
embedding requests until the advertiser ends the session, after which it connects again.
It answers nothing but scoring requests: a training request, a step or more than
``MAX_ROWS_PER_REQUEST`` rows end the session as a protocol error. A key outside the
agreed overlap gets zeros (as in ``score``), so an answer never says whether the
publisher holds a user beyond the overlap. An empty request is the advertiser's
keepalive on an idle link.
"""

from __future__ import annotations

import signal
import time
from typing import Any

from kedit_vfl.errors import PeerError
from kedit_vfl.progress import Reporter
from kedit_vfl.vfl.channel.party import EMBEDDING_DTYPE, KEY_DTYPE, PassiveParty, PassiveTraining
from kedit_vfl.vfl.channel.protocol import EMBED, FINISH, MAX_ROWS_PER_REQUEST
from kedit_vfl.vfl.channel.session import connect, passive_tower
from kedit_vfl.vfl.channel.transport import Channel
from kedit_vfl.vfl.config import ServeConfig, default_output
from kedit_vfl.vfl.data.loading import load_party
from kedit_vfl.vfl.models.store import SPLIT, load_for_party, model_config_of, run_id_of, schemas_of
from kedit_vfl.vfl.serving.link import COMMAND
from kedit_vfl.vfl.stages.distill import serving_protection
from kedit_vfl.vfl.stages.train import single_thread

RETRY_SECONDS = 0.5


class _Stop(BaseException):
    """SIGTERM or SIGINT: leave the request loop wherever it waits."""


def answer(channel: Channel, party: PassiveParty) -> None:
    """Answer embedding requests until the advertiser ends the session."""
    while True:
        op, a, b, _ = channel.recv_header()
        if op == FINISH:
            return
        if op != EMBED or b != 0:
            raise PeerError(f"protocol error: request {op} (training {b}) sent to a serving publisher")
        if not 0 <= a <= MAX_ROWS_PER_REQUEST:
            raise PeerError(
                f"protocol error: the active party asked for {a:,} rows in one request (at most "
                f"{MAX_ROWS_PER_REQUEST:,})"
            )
        if a == 0:  # keepalive
            continue
        keys = channel.recv((a,), KEY_DTYPE, "row keys")
        channel.send(party.embed(keys, False).to(EMBEDDING_DTYPE), "embeddings")
        channel.flush("embeddings")


def serve_publisher(config: ServeConfig, reporter: Reporter) -> dict[str, Any]:
    """Serve embeddings session after session until SIGTERM or SIGINT."""
    import torch

    from kedit_vfl.seeding import resolve_device

    started = time.perf_counter()
    torch.set_num_threads(1)
    device = resolve_device(config.device)
    path = config.model or default_output("split_passive.safetensors")  # train-split's passive default
    artifact = load_for_party(path, SPLIT, "passive", "--model")
    sizes = model_config_of(artifact)
    assert config.passive is not None
    table = load_party(
        config.passive, "passive", config.id_col, config.label_col, schema=schemas_of(artifact)["passive"],
        warn=reporter.warn,
    )  # fmt: skip
    tower = passive_tower(table.schema, sizes, 0, artifact)
    shared = {"model": sizes.to_dict(), "ids_in_clear": config.ids_in_clear}
    summary = {"party": "passive", "model": str(artifact.path), "sessions": 0, "rows_embedded": 0}

    def stop(*_: Any) -> None:
        raise _Stop

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            try:
                session, rows, keys = connect(
                    config, COMMAND, table, shared, run_id_of(artifact), None, reporter
                )
            except PeerError as exc:
                if "could not reach" not in str(exc):
                    reporter.warn(str(exc))
                time.sleep(RETRY_SECONDS)
                continue
            summary["sessions"] += 1
            reporter.log(
                f"session {summary['sessions']}: {len(rows):,} agreed ids; answering embedding requests"
            )
            party = PassiveParty(
                table.rows,
                rows,
                tower,
                0,
                serving_protection(artifact),
                PassiveTraining(),
                None,
                device,
                keys=keys,
            )
            try:
                with single_thread():
                    answer(session.channel, party)
                reporter.log("the advertiser ended the session; waiting for the next one")
            except PeerError as exc:
                reporter.warn(f"session {summary['sessions']} ended: {exc}; connecting again")
            finally:
                summary["rows_embedded"] += party.rows_embedded
                session.channel.close()
    except _Stop:
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    summary["seconds"] = round(time.perf_counter() - started, 3)
    return summary
