"""Typed configs, one field per command-line option, checked when built.

Each config is stored in the artifact it produces, so ``kvtool info`` shows exactly
how an artifact was made and the next stage can rebuild its model.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field
from pathlib import Path
from typing import Any

from kedit_vfl.errors import UserError
from kedit_vfl.paths import runs_dir
from kedit_vfl.vfl.channel.security import Security, check_security, parse_rendezvous

DEFAULT_ROWS = 20_000  # embedded demo data
DEFAULT_SEED = 0

MODES = ("local", "federated")
REVEALS = ("both", "active-only")
FORMATS = ("onnx",)
MIN_OPSET, MAX_OPSET, DEFAULT_OPSET = 13, 20, 17
PARTIES = ("both", "active", "passive")
OBJECTIVES = ("infonce", "bce")


def embedded(name: str) -> Path:
    """One of the embedded demo tables (built on first use where not shipped)."""
    from kedit_vfl.vfl.data.demo import embedded as embedded_table

    return embedded_table(name)


def default(config: type, name: str) -> Any:
    """A config field's default, for the command line: one source for every default."""
    found = config.__dataclass_fields__[name]
    if found.default is not MISSING:
        return found.default
    raise TypeError(f"{config.__name__}.{name} has no plain default")


def default_output(name: str) -> Path:
    """Where a bare command writes (and the next bare command reads)."""
    return runs_dir() / "vfl" / name


def _positive(owner: object, *names: str) -> None:
    for name in names:
        if getattr(owner, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} {getattr(owner, name)}: must be positive")


def _fraction(owner: object, name: str, low: float = 0.0, high: float = 1.0) -> None:
    value = getattr(owner, name)
    if not low <= value <= high:
        raise UserError(f"--{name.replace('_', '-')} {value}: expected a value between {low} and {high}")


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of the networks (stored in every artifact, so the next stage rebuilds them)."""

    emb_dim: int = 8
    hidden: int = 64
    out_dim: int = 32
    head_hidden: int = 32
    dropout: float = 0.1
    # Wide and deep: a linear path beside every MLP (tower input -> embedding, embedding
    # -> logit), so the model contains a linear model of its inputs, as click-through-rate
    # models do; it is what holds with few labels. Artifacts made before it read False.
    wide: bool = True

    def __post_init__(self) -> None:
        for name in ("emb_dim", "hidden", "out_dim", "head_hidden"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be a positive integer")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"--dropout {self.dropout}: expected a value in [0, 1)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Protection:
    """Optional defences of what crosses, against label inference from gradients.

    ``clip`` bounds the L2 norm of each row's embedding and of each row's own gradient
    (the gradient of that row's loss, i.e. batch size x the batch-mean gradient);
    ``embedding_noise`` and ``gradient_noise`` add Gaussian noise of that standard
    deviation to every element, during training. The clip also applies when scoring, as
    it is part of the function the model learned; noise does not.
    """

    clip: float = 0.0
    embedding_noise: float = 0.0
    gradient_noise: float = 0.0

    def __post_init__(self) -> None:
        for name in ("clip", "embedding_noise", "gradient_noise"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)}: must not be negative")

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class DemoConfig:
    """What ``kvtool vfl make-demo`` generates."""

    rows: int = DEFAULT_ROWS
    seed: int = DEFAULT_SEED
    overlap: float = 0.5
    labelled: float = 0.1
    test_fraction: float = 0.2
    passive_only: float = 0.1
    out: Path = Path("vfl_demo")
    file_format: str = "csv"
    shard_rows: int = 1_000_000
    numeric_active: int = 6
    numeric_passive: int = 5
    categorical_extra: int = 0  # more categorical columns, this many per party

    def __post_init__(self) -> None:
        if self.rows < 50:
            raise UserError(f"--rows {self.rows}: need at least 50 rows")
        for name in ("overlap", "labelled", "test_fraction", "passive_only"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise UserError(f"--{name.replace('_', '-')} {value}: expected a fraction between 0 and 1")
        if not 0.0 < self.test_fraction < 1.0:
            raise UserError(
                f"--test-fraction {self.test_fraction}: expected a fraction strictly between 0 and 1"
            )
        if self.file_format not in ("csv", "parquet"):
            raise UserError(f"--format {self.file_format}: expected csv or parquet")
        if self.shard_rows < 1000:
            raise UserError(f"--shard-rows {self.shard_rows}: need at least 1000")
        if min(self.numeric_active, self.numeric_passive, self.categorical_extra) < 0:
            raise UserError(
                "--numeric-active, --numeric-passive and --categorical-extra must not be negative"
            )


def _check_party(owner: TrainOptions | ScoreConfig) -> None:
    party, rendezvous = owner.party, owner.rendezvous
    if party not in PARTIES:
        raise UserError(f"--party {party}: expected active or passive (or leave it out to run both here)")
    if party != "both" and not rendezvous:
        raise UserError(f"--party {party} needs --rendezvous tcp://HOST:PORT (the active party's address)")
    if party == "both" and rendezvous:
        raise UserError("--rendezvous needs --party active or --party passive")
    if owner.timeout <= 0:
        raise UserError(f"--timeout {owner.timeout}: must be positive")
    if party == "both" and owner.secret_file is not None:
        raise UserError("--secret-file is for two-party runs (with --party)")
    if party == "both" and owner.alignment is not None:
        raise UserError(
            "--alignment is for two-party runs (with --party); in one process the tables are joined"
        )
    if party == "both":
        given = [
            flag
            for flag, value in (
                ("--identity", owner.identity),
                ("--peer-cert", owner.peer_cert),
                ("--insecure", owner.insecure),
                ("--ids-in-clear", owner.ids_in_clear),
            )
            if value
        ]
        if given:
            raise UserError(f"{', '.join(given)}: for two-party runs (with --party)")
    if party != "both":
        check_security(
            Security(owner.identity, owner.peer_cert, owner.insecure), parse_rendezvous(str(rendezvous))
        )
    if owner.ids_in_clear and owner.alignment is not None:
        raise UserError(
            "--ids-in-clear and --alignment exclude each other: the alignment already holds the overlap"
        )


@dataclass(frozen=True)
class TrainOptions:
    """What every training command shares: the two tables, their columns, the loop."""

    active: Path = field(default_factory=lambda: embedded("active_train.csv"))
    passive: Path = field(default_factory=lambda: embedded("passive_train.csv"))
    id_col: str = "id"
    label_col: str = "y"
    features_active: tuple[str, ...] = ()
    features_passive: tuple[str, ...] = ()
    categorical: tuple[str, ...] = ()
    epochs: int = 100
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    patience: int = 10
    # An epoch is at least this many rows (whole shuffled passes), so that a small
    # labelled set gets as many optimiser steps between evaluations as a large one:
    # counted in passes, 10 epochs of patience are 20 steps on 500 rows and stop training
    # before it starts.
    min_epoch_rows: int = 4096
    val_fraction: float = 0.2
    seed: int = 0
    device: str = "auto"
    party: str = "both"  # both = the in-process simulation
    rendezvous: str | None = None
    timeout: float = 60.0
    secret_file: Path | None = None
    resume: bool = False
    alignment: Path | None = None
    identity: Path | None = None  # this party's folder from ``kvtool vfl keygen``
    peer_cert: Path | None = None  # the other party's certificate, pinned
    insecure: bool = False  # plaintext, unauthenticated: loopback addresses only
    ids_in_clear: bool = False  # align by sending the passive party's ids (both parties must agree)

    def __post_init__(self) -> None:
        _check_party(self)
        _positive(self, "epochs", "batch_size", "lr", "patience", "min_epoch_rows")
        if self.weight_decay < 0:
            raise UserError(f"--weight-decay {self.weight_decay}: must not be negative")
        _fraction(self, "val_fraction", 0.0, 0.9)


@dataclass(frozen=True)
class MPDConfig(TrainOptions):
    """``pretrain-mpd``: Matched Pair Detection on the overlapped rows (labels unused)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    negatives: int = 16
    objective: str = "infonce"
    mpd_temperature: float = 0.2
    epochs: int = 30
    batch_size: int = 512
    lr: float = 1e-3
    patience: int = 5
    out: Path = field(default_factory=lambda: default_output("mpd.safetensors"))

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive(self, "negatives", "mpd_temperature")
        if self.negatives >= self.batch_size:
            raise UserError(
                f"--negatives {self.negatives}: must be smaller than --batch-size {self.batch_size}"
            )
        if self.objective not in OBJECTIVES:
            raise UserError(f"--objective {self.objective}: expected one of {', '.join(OBJECTIVES)}")


@dataclass(frozen=True)
class SplitConfig(TrainOptions):
    """``train-split``: the local + federated model on the labelled overlapped rows."""

    init: Path | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    aux_weight: float = 0.5
    mpd_weight: float = 0.0
    init_lr_scale: float = 0.3
    self_train_weight: float = 1.0
    # Train the local branch alone first (its own early stopping, on every labelled row),
    # then hold it and train only what the publisher's features add: the federated model
    # then starts from the best local model instead of a compromise with the federated
    # head, which overfits first when labelled overlapped rows are few.
    local_first: bool = True
    # Run the label-leakage attacks on the gradients the publisher receives (in one
    # process only: the audit needs the labels and what crossed on one machine).
    audit: bool = False
    # Defences against label inference (see the threat model): the publisher's tower held
    # as MPD left it, so no gradient crosses (the default: measured to cost at most 0.4%
    # AUC, while a trained tower's gradients give every label away), and randomised
    # response on the labels the federated part learns from (epsilon-label DP; 0 = off).
    freeze_passive: bool = True
    label_epsilon: float = 0.0
    # Calibrated gradient perturbation (with --train-passive): clip each row's gradient at
    # this quantile of the observed norms and add noise scaled for every time a row is
    # sent in the run (see kedit_vfl.vfl.privacy.leakage.CalibratedNoise); 0 = off.
    noise_multiplier: float = 0.0
    clip_quantile: float = 0.5
    # Keep what the publisher received (per user: the first gradient, their sum, the
    # count) in this Parquet file on the publisher's side, for ``kvtool vfl audit``.
    record_received: Path | None = None
    clip: float = 0.0
    embedding_noise: float = 0.0
    gradient_noise: float = 0.0
    batch_size: int = 128
    out: Path = field(default_factory=lambda: default_output("split.safetensors"))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.aux_weight < 0 or self.mpd_weight < 0 or self.self_train_weight < 0:
            raise UserError("--aux-weight, --mpd-weight and --self-train-weight must not be negative")
        _positive(self, "init_lr_scale")
        if self.mpd_weight > 0 and self.init is None:
            raise UserError("--mpd-weight needs --init (the matching head comes from pretrain-mpd)")
        if self.noise_multiplier < 0:
            raise UserError(f"--noise-multiplier {self.noise_multiplier}: must not be negative (0 = off)")
        _fraction(self, "clip_quantile", 0.01, 1.0)
        if self.label_epsilon < 0:
            raise UserError(f"--label-epsilon {self.label_epsilon}: must not be negative (0 = off)")
        if self.freeze_passive and self.mpd_weight > 0:
            raise UserError(
                "--mpd-weight trains the publisher's tower, which is frozen by default: add --train-passive"
            )
        if self.audit and self.party != "both":
            raise UserError(
                "--audit runs in one process (both tables here): it needs the labels and what the "
                "publisher receives on one machine"
            )
        if self.record_received is not None and self.party == "active":
            raise UserError(
                "--record-received is for the publisher's side (--party passive, or one process): "
                "the gradients are received there"
            )
        self.protection  # noqa: B018 - validates the three options

    @property
    def protection(self) -> Protection:
        return Protection(self.clip, self.embedding_noise, self.gradient_noise)


@dataclass(frozen=True)
class DistillConfig(TrainOptions):
    """``distill``: SplitKD from the split teacher into a local student, over all active rows."""

    teacher: Path | None = field(default_factory=lambda: default_output("split.safetensors"))
    model: ModelConfig = field(default_factory=ModelConfig)  # only used without a teacher
    temperature: float = 1.0
    kd_weight: float = 0.5
    kd_local_rows: bool = False
    batch_size: int = 256
    # Record what reaches the publisher (only embedding requests: no gradient is sent in
    # distillation) and report the attacks' figures, with the teacher's own audit.
    audit: bool = False
    out: Path = field(default_factory=lambda: default_output("local.safetensors"))

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive(self, "temperature")
        _fraction(self, "kd_weight")
        if self.teacher is None and self.kd_weight > 0:
            raise UserError("--kd-weight > 0 needs a --teacher")
        if self.audit and self.party != "both":
            raise UserError(
                "--audit runs in one process (both tables here): it needs the labels and what the "
                "publisher receives on one machine"
            )

    @property
    def command(self) -> str:
        return "distill"


@dataclass(frozen=True)
class LocalConfig(DistillConfig):
    """``train-local``: the advertiser's model on its own labelled rows, no partner at all.

    The same tower, scaling and training as the distilled student (``distill`` without a
    teacher), so a user can see what federating adds before federating.
    """

    teacher: Path | None = None
    kd_weight: float = 0.0
    out: Path = field(default_factory=lambda: default_output("own.safetensors"))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.teacher is not None or self.party != "both":
            raise UserError("train-local uses the advertiser's table alone: no --teacher and no --party")

    @property
    def command(self) -> str:
        return "train-local"


@dataclass(frozen=True)
class ScoreConfig:
    """``score``: one model over a table, locally or with the publisher's features."""

    model: Path | None = None
    active: Path = field(default_factory=lambda: embedded("active_test.csv"))
    passive: Path | None = None
    mode: str = "local"
    fallback: Path | None = None
    id_col: str = "id"
    label_col: str = "y"
    batch_size: int = 4096  # rows per forward pass and per request for the publisher's embeddings
    device: str = "auto"
    out: Path | None = None  # "-": the scores go to stdout
    json_lines: bool = False  # with out "-": JSON Lines instead of CSV
    party: str = "both"
    rendezvous: str | None = None
    timeout: float = 60.0
    secret_file: Path | None = None
    alignment: Path | None = None
    identity: Path | None = None  # this party's folder from ``kvtool vfl keygen``
    peer_cert: Path | None = None  # the other party's certificate, pinned
    insecure: bool = False  # plaintext, unauthenticated: loopback addresses only
    ids_in_clear: bool = False  # align by sending the passive party's ids (both parties must agree)

    def __post_init__(self) -> None:
        _check_party(self)
        if self.party != "both" and self.mode != "federated":
            raise UserError("--party is for --mode federated (local mode needs no publisher)")
        if self.party == "passive" and self.passive is None:
            raise UserError("--party passive needs --passive (the publisher's table)")
        if self.party == "passive" and self.model is None:
            raise UserError("--party passive needs --model (the passive party's vfl.split artifact)")
        if self.mode not in MODES:
            raise UserError(f"--mode {self.mode}: expected local or federated")
        _positive(self, "batch_size")
        if self.json_lines and not self.to_stdout:
            raise UserError(
                "--json-lines is for --out - (scores on stdout); a file's format follows its name"
            )

    @property
    def to_stdout(self) -> bool:
        return self.out is not None and str(self.out) == "-"


SERVE_PARTIES = ("active", "passive")
HEARTBEAT_SECONDS = 1.0  # the advertiser's keepalive to an idle publisher link
MAX_SERVE_BATCH = 65_536  # rows per HTTP request at most: one embedding request's limit


@dataclass(frozen=True)
class ServeConfig:
    """``serve``: score requests over HTTP (the advertiser), or answer the advertiser's
    embedding requests (the publisher, ``party="passive"``)."""

    model: Path | None = None
    party: str = "active"
    host: str = "127.0.0.1"  # the HTTP address; 0.0.0.0 exposes it beyond this machine
    port: int = 8080
    fallback: Path | None = None  # vfl.local model for rows the publisher does not answer
    # The advertiser's users that may be scored federated: their ids are aligned with the
    # publisher's (private set intersection) at every connection. The publisher's table.
    active: Path = field(default_factory=lambda: embedded("active_test.csv"))
    passive: Path | None = None
    id_col: str = "id"
    label_col: str = "y"
    deadline_ms: float = 15.0  # a row the publisher has not answered by then is scored locally
    max_batch: int = 1024  # rows per HTTP request
    drain_seconds: float = 10.0  # on SIGTERM/SIGINT, how long in-flight requests may finish
    device: str = "cpu"  # single rows: the CPU answers sooner than a GPU round trip
    rendezvous: str | None = None
    timeout: float = 10.0  # the publisher link: connecting, and each answer before it counts as down
    secret_file: Path | None = None
    alignment: Path | None = None
    identity: Path | None = None
    peer_cert: Path | None = None
    insecure: bool = False
    ids_in_clear: bool = False

    def __post_init__(self) -> None:
        if self.party not in SERVE_PARTIES:
            raise UserError(
                f"--party {self.party}: expected active (the advertiser) or passive (the publisher)"
            )
        if not 1 <= self.port <= 65535:
            raise UserError(f"--port {self.port}: expected a port between 1 and 65535")
        _positive(self, "deadline_ms", "max_batch", "drain_seconds", "timeout")
        if self.timeout < 2 * HEARTBEAT_SECONDS:
            raise UserError(
                f"--timeout {self.timeout}: must be at least {2 * HEARTBEAT_SECONDS:g} s "
                f"(an idle link carries a keepalive every {HEARTBEAT_SECONDS:g} s)"
            )
        if self.max_batch > MAX_SERVE_BATCH:
            raise UserError(f"--max-batch {self.max_batch}: at most {MAX_SERVE_BATCH:,} rows per request")
        if self.party == "active" and self.passive is not None:
            raise UserError("--passive is the publisher's table: give it to the publisher's --party passive")
        if self.party == "passive":
            if self.rendezvous is None:
                raise UserError(
                    "--party passive needs --rendezvous tcp://HOST:PORT (the advertiser's address)"
                )
            if self.passive is None:
                raise UserError("--party passive needs --passive (the publisher's table)")
            if self.fallback is not None:
                raise UserError("--fallback is the advertiser's (--party active) local model")
        if self.rendezvous is not None:
            check_security(
                Security(self.identity, self.peer_cert, self.insecure), parse_rendezvous(self.rendezvous)
            )
        else:
            given = [
                flag
                for flag, value in (
                    ("--identity", self.identity),
                    ("--peer-cert", self.peer_cert),
                    ("--insecure", self.insecure),
                    ("--ids-in-clear", self.ids_in_clear),
                    ("--alignment", self.alignment),
                    ("--secret-file", self.secret_file),
                )
                if value
            ]
            if given:
                raise UserError(f"{', '.join(given)}: for a link to the publisher (with --rendezvous)")
        if self.ids_in_clear and self.alignment is not None:
            raise UserError(
                "--ids-in-clear and --alignment exclude each other: the alignment already holds the overlap"
            )


@dataclass(frozen=True)
class AuditConfig:
    """``audit``: the publisher's record of received gradients, and optionally labels to
    score the attacks with (see :mod:`kedit_vfl.vfl.privacy.audit`)."""

    record: Path
    labels: Path | None = None
    id_col: str = "id"
    label_col: str = "y"
    scores: Path | None = None  # per-user attack scores, CSV
    seed: int = 0  # the noise reference's draw


@dataclass(frozen=True)
class AlignConfig:
    """``kvtool vfl align``: one party of a private id alignment."""

    party: str | None = None
    rendezvous: str | None = None
    table: Path | None = None
    id_col: str = "id"
    reveal: str = "both"
    fpr: float = 1e-9
    secret_file: Path | None = None
    timeout: float = 60.0
    deadline: float = 3600.0
    identity: Path | None = None
    peer_cert: Path | None = None
    insecure: bool = False
    out: Path | None = None

    def __post_init__(self) -> None:
        if self.party not in ("active", "passive"):
            raise UserError(
                f"--party {self.party}: expected active or passive (align always runs two parties)"
            )
        if not self.rendezvous:
            raise UserError("--rendezvous is required: tcp://HOST:PORT, where the active party listens")
        if self.table is None:
            raise UserError("--table is required: this party's table (CSV, Parquet or JSONL)")
        if self.reveal not in REVEALS:
            raise UserError(f"--reveal {self.reveal}: expected one of {', '.join(REVEALS)}")
        if not 0 < self.fpr <= 0.01:
            raise UserError(f"--fpr {self.fpr}: must be in (0, 0.01]")
        if self.timeout <= 0:
            raise UserError(f"--timeout {self.timeout}: must be positive")
        check_security(
            Security(self.identity, self.peer_cert, self.insecure), parse_rendezvous(self.rendezvous)
        )
        if self.deadline < self.timeout:
            raise UserError(f"--deadline {self.deadline}: must be at least --timeout ({self.timeout})")

    @property
    def output(self) -> Path:
        return (
            Path(self.out) if self.out is not None else default_output(f"alignment_{self.party}.safetensors")
        )


@dataclass(frozen=True)
class ExportConfig:
    """``export``: one local-mode model to one ONNX file and its JSON sidecar."""

    model: Path | None = None
    format: str = "onnx"
    out: Path | None = None
    opset: int = DEFAULT_OPSET
    verify_rows: int = 1000
    table: Path | None = None
    id_col: str = "id"

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise UserError(f"--format {self.format}: expected one of {', '.join(FORMATS)}")
        if not MIN_OPSET <= self.opset <= MAX_OPSET:
            raise UserError(f"--opset {self.opset}: expected a value between {MIN_OPSET} and {MAX_OPSET}")
        if self.verify_rows < 1:
            raise UserError(f"--verify-rows {self.verify_rows}: must be positive")

    @property
    def model_path(self) -> Path:
        return self.model if self.model is not None else default_output("local.safetensors")

    @property
    def out_path(self) -> Path:
        return self.out if self.out is not None else default_output("local.onnx")
