"""Setting up a stage's two sides, whichever way the parties run.

- ``party="both"`` (the in-process simulation): both tables are read here and the
  passive party is a :class:`PassiveParty` called directly.
- ``party="active"``: this process holds the active table; the passive party is a
  :class:`RemotePassive` behind a checked session.
- ``party="passive"``: this process holds the passive table and serves the active
  party's requests until it finishes (:func:`serve_passive`).

The active side of every stage sees the same :class:`PassiveLink` in the first two
cases, so the training code has one path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kedit_vfl.artifacts import Artifact, config_to_dict
from kedit_vfl.errors import UserError
from kedit_vfl.progress import Reporter
from kedit_vfl.vfl.channel.party import (
    PassiveLink,
    PassiveParty,
    PassiveTraining,
    Protection,
    passive_seed,
    warm_up_autograd,
)
from kedit_vfl.vfl.channel.protocol import RemotePassive, Session, align_in_clear, handshake, serve
from kedit_vfl.vfl.channel.transport import Security, open_channel
from kedit_vfl.vfl.data.loading import PartyTable, align_unique, load_party
from kedit_vfl.vfl.data.read import open_table
from kedit_vfl.vfl.data.schema import PartySchema
from kedit_vfl.vfl.models.networks import ModelConfig, Tower
from kedit_vfl.vfl.models.store import load_weights
from kedit_vfl.vfl.privacy.leakage import GradientRecorder
from kedit_vfl.vfl.privacy.received import write_received
from kedit_vfl.vfl.stages.checkpoint import CheckpointStore, checkpoint_dir
from kedit_vfl.vfl.stages.train import single_thread

# Options each party sets for itself; every other option must agree across the parties.
PARTY_LOCAL = {
    "active", "passive", "features_active", "features_passive", "categorical", "id_col", "label_col",
    "out", "device", "init", "teacher", "fallback", "model", "party", "rendezvous", "timeout",
    "secret_file", "resume", "alignment", "identity", "peer_cert", "insecure", "record_received",
}  # fmt: skip


def shared_settings(config: Any, model_config: ModelConfig | None) -> dict[str, Any]:
    """What both parties' configs must agree on (the model sizes in effect included)."""
    settings = config_to_dict(config)
    shared = {k: v for k, v in settings.items() if k not in PARTY_LOCAL}
    if model_config is not None:
        shared["model"] = model_config.to_dict()
    return shared


def read_secret(path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        secret = Path(path).read_bytes().strip()
    except OSError as exc:
        raise UserError(f"--secret-file {path}: cannot read it ({exc.strerror})") from exc
    if not secret:
        raise UserError(f"--secret-file {path}: the file is empty")
    return secret


def table_summary(table: PartyTable, id_col: str) -> dict[str, Any]:
    """What each party tells the other about its table: size and id column, no values."""
    return {"rows": len(table.rows), "id_col": id_col, "columns": len(table.schema.columns)}


def passive_tower(
    schema: PartySchema, model_config: ModelConfig, seed: int, init: Artifact | None = None
) -> Tower:
    """The passive party's tower, initialised from its own random stream (or ``init``)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(passive_seed(seed))
        tower = Tower(schema, model_config)
    if init is not None:
        load_weights(init, tower, "tower_b")
    return tower


def security_of(config: Any) -> Security:
    """How this party authenticates itself and its peer, from a command's config."""
    return Security(
        identity=getattr(config, "identity", None),
        peer_cert=getattr(config, "peer_cert", None),
        insecure=bool(getattr(config, "insecure", False)),
    )


RESUMABLE = ("pretrain-mpd", "train-split")  # the commands with --resume


def fault_hint(command: str) -> str:
    """What a peer fault message tells the user to do next: only flags the command has."""
    if command in RESUMABLE:
        return "restart both parties with --resume to continue from the last common checkpoint"
    return "start both parties again"


def connect(
    config: Any,
    command: str,
    table: PartyTable,
    shared: dict[str, Any],
    partner: str | None,
    store: CheckpointStore | None,
    reporter: Reporter | None = None,
) -> tuple[Session, torch.Tensor, torch.Tensor | None]:
    """Connect, authenticate, handshake and align.

    Returns the session, this party's row for each overlap position, and the wire key of
    each (None: the key is the position itself). No id crosses in the clear unless both
    parties ask for it (``--ids-in-clear``): with ``config.alignment`` (from ``kvtool vfl
    align``) rows and keys come from that file, otherwise the parties run the same private
    set intersection here, revealing the overlap to both and nothing else.
    """
    from kedit_vfl.vfl.channel.alignment import load_alignment, private_overlap  # PSI loads only when used

    alignment = None
    if getattr(config, "alignment", None) is not None:
        alignment = load_alignment(config.alignment, config.party, table.path)
        if alignment.reveal != "both":
            raise UserError(
                f"--alignment {config.alignment}: made with --reveal {alignment.reveal}; the passive party "
                "could not restrict what it serves to the overlap it does not know. Align with --reveal both"
            )
    secret = read_secret(config.secret_file)
    channel = open_channel(
        config.party, config.rendezvous, config.timeout, security_of(config), hint=fault_hint(command)
    )
    try:
        session = handshake(
            channel,
            command,
            shared,
            table_summary(table, config.id_col),
            secret,
            store.tags() if (store is not None and config.resume) else None,
            partner,
            alignment.fingerprint if alignment is not None else None,
        )
        if alignment is not None:
            return session, alignment.rows, alignment.keys
        if getattr(config, "ids_in_clear", False):
            return session, align_in_clear(session, table.rows.ids), None
        rows, keys = private_overlap(session, table.rows.ids, reporter)
        return session, rows, keys
    except BaseException:
        channel.close()
        raise


@dataclass
class ActiveSide:
    """What the active side of a stage works with."""

    table: PartyTable
    link: PassiveLink
    rows_a: torch.Tensor  # (N_overlap,) active row of each overlap position
    passive_schema: PartySchema | None  # in-process only: stored in the "both" artifact
    session: Session | None
    passive: PassiveParty | None  # in-process only

    @property
    def run_id(self) -> str | None:
        return self.session.run_id if self.session is not None else None

    @property
    def resume_from(self) -> tuple[int, int] | None:
        return self.session.resume_from if self.session is not None else None

    def close(self) -> None:
        if self.session is not None:
            self.session.channel.close()

    def artifact_parts(
        self, modules: dict[str, Any], active_path: Path, passive_path: Path | None
    ) -> tuple[dict[str, Any], dict[str, PartySchema], list[Path]]:
        """What this stage's artifact holds: in one process both parties' parts (the
        passive tower and schema too), in a two-party run the active party's alone."""
        modules, schemas, paths = dict(modules), {"active": self.table.schema}, [active_path]
        if self.passive is not None and self.passive_schema is not None and passive_path is not None:
            modules["tower_b"] = self.passive.tower
            schemas["passive"] = self.passive_schema
            paths.append(passive_path)
        return modules, schemas, paths

    def clear_checkpoints(self, store: CheckpointStore) -> None:
        """The run finished: its checkpoints (and, in one process, the passive party's) go."""
        store.clear()
        if self.passive is not None and self.passive.checkpoints is not None:
            self.passive.checkpoints.clear()

    def traffic(self) -> dict[str, Any]:
        summary = self.link.traffic.summary()
        if self.session is not None:
            summary["wire"] = self.session.channel.traffic()
        return summary


def open_active(
    config: Any,
    command: str,
    table: PartyTable,
    *,
    model_config: ModelConfig,
    passive_schema: PartySchema | None,
    passive_init: Artifact | None,
    partner: str | None,
    protection: Protection,
    training: PassiveTraining,
    store: CheckpointStore | None,
    device: torch.device,
    passive_path: Path | None = None,
    shared: dict[str, Any] | None = None,
    check_beside_join: bool = False,
) -> ActiveSide:
    """The active side of a stage: a link to the passive party in this process or remote.

    ``shared`` is what the parties must agree on (default: every option but the
    party-local ones, see :func:`shared_settings`).
    """
    if config.party == "active":
        shared = shared if shared is not None else shared_settings(config, model_config)
        session, rows_a, keys = connect(config, command, table, shared, partner, store)
        remote = RemotePassive(session.channel, model_config.out_dim)
        link = PassiveLink(remote, protection, getattr(config, "seed", 0), device, wire_keys=keys)
        return ActiveSide(table, link, rows_a, None, session, None)
    passive = load_party(
        passive_path or config.passive,
        "passive",
        config.id_col,
        config.label_col,
        getattr(config, "features_passive", None),
        getattr(config, "categorical", ()),
        schema=passive_schema,
        unique_ids=False,
    )
    declared = getattr(config, "categorical", ())
    if declared:
        known = set(open_table(table.path, "active").column_names) | set(
            open_table(passive.path, "passive").column_names
        )
        undeclared = [c for c in declared if c not in known]
        if undeclared:
            raise UserError(f"--categorical names columns no table has: {', '.join(undeclared)}")
    rows_a, rows_b = align_unique(
        table.rows.ids, passive.rows.ids, config.id_col, passive.path, beside=check_beside_join
    )
    if len(rows_a) == 0:
        raise UserError(
            f"{table.path} and {passive.path}: no id appears in both tables (id column '{config.id_col}'); "
            "the parties must key the same users"
        )
    seed = getattr(config, "seed", 0)  # scoring has no seed: nothing random happens there
    tower = passive_tower(passive.schema, model_config, seed, passive_init)
    passive_store = None
    if store is not None:
        passive_store = CheckpointStore(store.directory.with_name(store.directory.name + ".passive"))
    party = PassiveParty(passive.rows, rows_b, tower, seed, protection, training, passive_store, device)
    link = PassiveLink(party, protection, seed, device)
    return ActiveSide(table, link, rows_a, passive.schema, None, party)


def resume_tag_in_process(config: Any, store: CheckpointStore | None) -> tuple[int, int] | None:
    """With ``--resume`` in one process: the latest checkpoint both sides saved."""
    if store is None or not config.resume:
        return None
    passive = CheckpointStore(store.directory.with_name(store.directory.name + ".passive"))
    common = sorted(set(store.tags()) & set(passive.tags()))
    if not common:
        raise UserError(f"--resume: no checkpoint in {store.directory}; start without --resume")
    return common[-1]


def serve_passive(
    config: Any,
    command: str,
    table: PartyTable,
    tower: Tower,
    *,
    model_config: ModelConfig | None,
    partner: str | None,
    protection: Protection,
    training: PassiveTraining,
    resumable: bool,
    save: Callable[[PassiveParty, Session], dict[str, Any]] | None,
    reporter: Reporter,
    device: torch.device,
    shared: dict[str, Any] | None = None,
    record: Path | None = None,
) -> dict[str, Any]:
    """Run the passive party of a stage to the end; ``save`` writes its artifact; with
    ``record``, what it received is kept there (:mod:`kedit_vfl.vfl.privacy.received`)."""
    store = CheckpointStore(checkpoint_dir(config.out)) if resumable else None
    shared = shared if shared is not None else shared_settings(config, model_config)
    warm_up_autograd()
    session, rows, keys = connect(config, command, table, shared, partner, store, reporter)
    with session.channel as channel:
        seed = getattr(config, "seed", 0)
        party = PassiveParty(table.rows, rows, tower, seed, protection, training, store, device, keys=keys)
        if session.resume_from is not None:
            party.resume(session.resume_from)
            if record is not None:
                reporter.warn("--record-received keeps what arrives from the resumed point on")
        if record is not None:
            party.recorder = GradientRecorder(len(rows), party.width)
        reporter.log(f"connected to the active party: {len(rows)} overlapping rows; serving its requests")
        with reporter.task("serving the active party", total=None), single_thread():
            serve(channel, party)  # one thread throughout: switching thread counts per request costs ms
        recorded: dict[str, Any] = {}
        if record is not None and party.recorder is not None:
            positions = torch.arange(len(rows))
            meta = {"run_id": session.run_id, "command": command, "rows_overlapped": len(rows)}
            users = write_received(record, party.recorder, party.ids_at(positions), meta)
            recorded = {"record_received": str(record), "rows_recorded": users}
        try:
            saved = save(party, session) if save is not None else {}
        except UserError as exc:
            channel.send_json({"ok": False, "error": str(exc)}, "result")
            raise
        channel.send_json({"ok": True, **saved}, "result")
        if store is not None:
            store.clear()
        return {
            "party": "passive",
            "run_id": session.run_id,
            "rows": len(table.rows),
            "rows_overlapped": len(rows),
            "rows_embedded": party.rows_embedded,
            "resumed_from": list(session.resume_from) if session.resume_from else None,
            **saved,
            **recorded,
            "traffic": channel.traffic(),
        }
