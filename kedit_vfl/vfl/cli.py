"""``kvtool vfl``: the VFed-SSD commands. Each parses, builds a config, calls one function, renders."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from kedit_vfl.console import (
    DeviceOption,
    JsonOption,
    QuietOption,
    RichReporter,
    SeedOption,
    SignKeyOption,
    TrustOption,
    chained,
    emit_json,
    print_kv,
)
from kedit_vfl.signing import use_signing
from kedit_vfl.vfl.config import (
    AlignConfig,
    AuditConfig,
    DemoConfig,
    DistillConfig,
    ExportConfig,
    LocalConfig,
    ModelConfig,
    MPDConfig,
    ScoreConfig,
    ServeConfig,
    SplitConfig,
    TrainOptions,
    default,
    default_output,
)

app = typer.Typer(
    help=(
        "Vertical federated learning (VFed-SSD): MPD pretraining, split training, distillation, scoring.\n\n"
        "Example: kvtool vfl pretrain-mpd && kvtool vfl train-split --init runs/vfl/mpd.safetensors "
        "&& kvtool vfl distill && kvtool vfl score --mode federated"
    ),
    no_args_is_help=True,
)

ActiveOption = Annotated[
    Optional[Path],
    typer.Option(
        "--active", help="Active party's table (CSV/Parquet/JSONL file or folder). [default: embedded demo]"
    ),
]
PassiveOption = Annotated[
    Optional[Path],
    typer.Option("--passive", help="Passive party's table (file or folder). [default: embedded demo]"),
]
IdColOption = Annotated[
    str, typer.Option("--id-col", help="Column with the user id both parties key rows by.")
]
LabelColOption = Annotated[
    str, typer.Option("--label-col", help="Active table's label column (0/1, empty = unlabelled).")
]
FeaturesActiveOption = Annotated[
    str,
    typer.Option("--features-active", help="Comma-separated active feature columns. [default: all others]"),
]
FeaturesPassiveOption = Annotated[
    str,
    typer.Option("--features-passive", help="Comma-separated passive feature columns. [default: all others]"),
]
CategoricalOption = Annotated[
    str,
    typer.Option("--categorical", help="Comma-separated columns to treat as categorical (text is inferred)."),
]
OutOption = Annotated[
    Optional[Path], typer.Option("--out", help="Where to write the artifact. [default: runs/vfl/...]")
]
EpochsOption = Annotated[
    Optional[int], typer.Option("--epochs", help="Most epochs (early stopping picks the best).")
]
BatchOption = Annotated[Optional[int], typer.Option("--batch-size", help="Rows per training step.")]
LrOption = Annotated[Optional[float], typer.Option("--lr", help="AdamW learning rate.")]
PatienceOption = Annotated[
    Optional[int], typer.Option("--patience", help="Stop after this many epochs without gain.")
]
MinEpochRowsOption = Annotated[
    Optional[int],
    typer.Option(
        "--min-epoch-rows",
        help="Rows per epoch at least (whole shuffled passes), so small labelled sets get enough steps "
        f"between evaluations. [default: {default(TrainOptions, 'min_epoch_rows')}]",
    ),
]
WideOption = Annotated[
    bool,
    typer.Option(
        "--wide/--no-wide", help="A linear path beside each MLP (wide and deep), what holds with few labels."
    ),
]
ValOption = Annotated[
    float,
    typer.Option("--val-fraction", help="Share of labelled rows held out (by id) to pick the best epoch."),
]
HiddenOption = Annotated[int, typer.Option("--hidden", help="Hidden width of each party's tower.")]
EmbDimOption = Annotated[int, typer.Option("--out-dim", help="Size of each tower's output embedding.")]
CategoryDimOption = Annotated[
    int, typer.Option("--emb-dim", help="Embedding size of each categorical column.")
]
HeadHiddenOption = Annotated[int, typer.Option("--head-hidden", help="Hidden width of the heads.")]
DropoutOption = Annotated[float, typer.Option("--dropout", help="Dropout rate in the towers and heads.")]
WeightDecayOption = Annotated[Optional[float], typer.Option("--weight-decay", help="AdamW weight decay.")]


PartyOption = Annotated[
    Optional[str],
    typer.Option(
        "--party",
        help="Run one party of a two-party run: active (advertiser, holds labels) or passive (publisher). "
        "[default: both parties in this process]",
        show_default=False,
    ),
]
RendezvousOption = Annotated[
    Optional[str],
    typer.Option(
        "--rendezvous",
        help="tcp://HOST:PORT: the active party listens there, the passive party connects to it.",
    ),
]
TimeoutOption = Annotated[
    float,
    typer.Option("--timeout", help="Seconds to wait for the other party (connecting, and each answer)."),
]
SecretOption = Annotated[
    Optional[Path],
    typer.Option(
        "--secret-file",
        help="Optional extra check: a secret both parties must hold (never sent; checked inside TLS).",
    ),
]
IdentityOption = Annotated[
    Optional[Path],
    typer.Option("--identity", help="This party's folder from 'kvtool vfl keygen' (key.pem and cert.pem)."),
]
PeerCertOption = Annotated[
    Optional[Path],
    typer.Option(
        "--peer-cert",
        help="The other party's cert.pem: the only peer this party accepts (mutual TLS, pinned).",
    ),
]
InsecureOption = Annotated[
    bool,
    typer.Option(
        "--insecure",
        help="No TLS and no authentication: allowed only on a loopback address, for tests on one machine.",
    ),
]
IdsInClearOption = Annotated[
    bool,
    typer.Option(
        "--ids-in-clear",
        help="Find the overlap by sending the passive party's ids to the active party (both must give it). "
        "Default: a private set intersection, or --alignment.",
    ),
]
AlignmentOption = Annotated[
    Optional[Path],
    typer.Option(
        "--alignment",
        help="This party's file from 'kvtool vfl align' (private set intersection): no id crosses. "
        "Without it, the passive party's ids are sent to the active party to find the overlap.",
    ),
]
ResumeOption = Annotated[
    bool,
    typer.Option("--resume", help="Continue from the last checkpoint (two-party: the last one both hold)."),
]


def _party_options(
    party: str | None,
    rendezvous: str | None,
    timeout: float,
    secret_file: Path | None,
    alignment: Path | None,
    **more: Any,
) -> dict[str, Any]:
    return {
        "party": party or "both",
        "rendezvous": rendezvous,
        "timeout": timeout,
        "secret_file": secret_file,
        "alignment": alignment,
        **more,
    }


def _security_options(
    identity: Path | None, peer_cert: Path | None, insecure: bool, ids_in_clear: bool
) -> dict[str, Any]:
    return {"identity": identity, "peer_cert": peer_cert, "insecure": insecure, "ids_in_clear": ids_in_clear}


def _model(
    hidden: int, out_dim: int, emb_dim: int, head_hidden: int, dropout: float, wide: bool
) -> ModelConfig:
    """The network sizes given on the command line (training commands without --init)."""
    return ModelConfig(
        hidden=hidden, out_dim=out_dim, emb_dim=emb_dim, head_hidden=head_hidden, dropout=dropout, wide=wide
    )


def _out_for(out: Path | None, party: str | None, name: str) -> dict[str, Path]:
    """The passive party's default output gets its own name, so both can share a folder."""
    if out is not None:
        return {"out": out}
    if party == "passive":
        return {"out": default_output(f"{name}_passive.safetensors")}
    return {}


def _columns(text: str) -> tuple[str, ...]:
    return tuple(c.strip() for c in text.split(",") if c.strip())


def _given(**options: Any) -> dict[str, Any]:
    """Only the options the user set, so that each config keeps its own defaults."""
    return {k: v for k, v in options.items() if v is not None}


def _data_options(
    active: Path | None, passive: Path | None, id_col: str, label_col: str, fa: str, fp: str, categorical: str
) -> dict[str, Any]:
    return _given(
        active=active,
        passive=passive,
        id_col=id_col,
        label_col=label_col,
        features_active=_columns(fa),
        features_passive=_columns(fp),
        categorical=_columns(categorical),
    )


def _render(title: str, result: dict[str, Any], json_output: bool, stream: Any = None) -> None:
    """The command's summary: a table, or one JSON object; on stdout unless ``stream``."""
    if json_output:
        emit_json(result, stream)
        return
    shown = {k: v for k, v in result.items() if k != "traffic"}
    traffic = result.get("traffic")
    if traffic and "bytes_to_passive" in traffic:
        shown["traffic active -> passive"] = f"{traffic['bytes_to_passive']:,} bytes"
        shown["traffic passive -> active"] = f"{traffic['bytes_to_active']:,} bytes"
        if traffic.get("bytes_per_trained_row") is not None:
            shown["bytes per trained row"] = (
                f"{traffic['bytes_per_trained_row']:.1f} (floor {traffic['floor_bytes_per_row']}; "
                f"{traffic['bytes_per_trained_row_with_evaluation']:.1f} with validation requests)"
            )
        if "wire" in traffic:
            shown["on the wire (all messages)"] = (
                f"{traffic['wire']['bytes_sent']:,} sent, {traffic['wire']['bytes_received']:,} received"
            )
    elif traffic:  # the passive party counts its own wire
        shown["on the wire (all messages)"] = (
            f"{traffic['bytes_sent']:,} sent, {traffic['bytes_received']:,} received"
        )
    print_kv(title, shown, stream)


@app.command("make-demo")
def make_demo(
    rows: Annotated[int, typer.Option("--rows", help="Users to generate (train + test).")] = default(
        DemoConfig, "rows"
    ),
    seed: SeedOption = default(DemoConfig, "seed"),
    out: Annotated[Path, typer.Option("--out", help="Folder for the four tables.")] = default(
        DemoConfig, "out"
    ),
    overlap: Annotated[
        float, typer.Option("--overlap", help="Share of users the publisher also holds.")
    ] = default(DemoConfig, "overlap"),
    labelled: Annotated[
        float, typer.Option("--labelled", help="Share of training users with a label.")
    ] = default(DemoConfig, "labelled"),
    test_fraction: Annotated[
        float, typer.Option("--test-fraction", help="Share of users in the test split.")
    ] = default(DemoConfig, "test_fraction"),
    passive_only: Annotated[
        float, typer.Option("--passive-only", help="Share of users only the publisher holds.")
    ] = default(DemoConfig, "passive_only"),
    file_format: Annotated[str, typer.Option("--format", help="csv or parquet.")] = default(
        DemoConfig, "file_format"
    ),
    shard_rows: Annotated[
        int,
        typer.Option("--shard-rows", help="Users per shard; more users give folders of shards."),
    ] = default(DemoConfig, "shard_rows"),
    numeric_active: Annotated[
        int, typer.Option("--numeric-active", help="Active numeric columns.")
    ] = default(DemoConfig, "numeric_active"),
    numeric_passive: Annotated[
        int, typer.Option("--numeric-passive", help="Passive numeric columns.")
    ] = default(DemoConfig, "numeric_passive"),
    categorical_extra: Annotated[
        int, typer.Option("--categorical-extra", help="Extra categorical columns per party (20 levels).")
    ] = default(DemoConfig, "categorical_extra"),
    json_output: JsonOption = False,
) -> None:
    """Generate a CTR-like two-party data set (active/passive x train/test tables).

    Any size, in bounded memory: shard by shard, straight to CSV or Parquet.

    Example: kvtool vfl make-demo --rows 10000000 --format parquet --numeric-active 16 --numeric-passive 14
    --categorical-extra 3 --out big_demo
    """
    config = DemoConfig(
        rows=rows,
        seed=seed,
        overlap=overlap,
        labelled=labelled,
        test_fraction=test_fraction,
        passive_only=passive_only,
        out=out,
        file_format=file_format,
        shard_rows=shard_rows,
        numeric_active=numeric_active,
        numeric_passive=numeric_passive,
        categorical_extra=categorical_extra,
    )
    from kedit_vfl.vfl.data.demo import write_demo

    counts = write_demo(config)
    _render("demo data", {"out": str(out), **{f"rows/{k}": v for k, v in counts.items()}}, json_output)


@app.command("pretrain-mpd")
def pretrain_mpd_command(
    active: ActiveOption = None,
    passive: PassiveOption = None,
    id_col: IdColOption = default(MPDConfig, "id_col"),
    label_col: LabelColOption = default(MPDConfig, "label_col"),
    features_active: FeaturesActiveOption = "",
    features_passive: FeaturesPassiveOption = "",
    categorical: CategoricalOption = "",
    negatives: Annotated[
        int, typer.Option("--negatives", "-k", help="Negative pairs per positive (derangements).")
    ] = default(MPDConfig, "negatives"),
    objective: Annotated[
        str, typer.Option("--objective", help="infonce (softmax over 1+k pairs) or bce (each pair alone).")
    ] = default(MPDConfig, "objective"),
    mpd_temperature: Annotated[
        float, typer.Option("--mpd-temperature", help="Scale of the pair scores.")
    ] = default(MPDConfig, "mpd_temperature"),
    hidden: HiddenOption = default(ModelConfig, "hidden"),
    out_dim: EmbDimOption = default(ModelConfig, "out_dim"),
    emb_dim: CategoryDimOption = default(ModelConfig, "emb_dim"),
    head_hidden: HeadHiddenOption = default(ModelConfig, "head_hidden"),
    dropout: DropoutOption = default(ModelConfig, "dropout"),
    wide: WideOption = default(ModelConfig, "wide"),
    weight_decay: WeightDecayOption = None,
    epochs: EpochsOption = None,
    batch_size: BatchOption = None,
    lr: LrOption = None,
    patience: PatienceOption = None,
    min_epoch_rows: MinEpochRowsOption = None,
    val_fraction: ValOption = default(MPDConfig, "val_fraction"),
    seed: SeedOption = default(MPDConfig, "seed"),
    device: DeviceOption = default(MPDConfig, "device"),
    out: OutOption = None,
    party: PartyOption = None,
    rendezvous: RendezvousOption = None,
    timeout: TimeoutOption = default(MPDConfig, "timeout"),
    secret_file: SecretOption = None,
    alignment: AlignmentOption = None,
    identity: IdentityOption = None,
    peer_cert: PeerCertOption = None,
    insecure: InsecureOption = default(MPDConfig, "insecure"),
    ids_in_clear: IdsInClearOption = default(MPDConfig, "ids_in_clear"),
    resume: ResumeOption = default(MPDConfig, "resume"),
    json_output: JsonOption = False,
    quiet: QuietOption = False,
    sign_key: SignKeyOption = None,
    trust: TrustOption = None,
) -> None:
    """Pretrain both towers with Matched Pair Detection on the overlapped rows (labels unused).

    Example: kvtool vfl pretrain-mpd --active a.csv --passive b.csv --negatives 16 --out mpd.safetensors

    Two parties: kvtool vfl pretrain-mpd --party active --active a.csv --rendezvous tcp://0.0.0.0:29500
    and, on the publisher's host, kvtool vfl pretrain-mpd --party passive --passive b.csv
    --rendezvous tcp://ADVERTISER_HOST:29500
    """
    use_signing(sign_key, trust)
    from kedit_vfl.vfl.stages.mpd import pretrain_mpd

    config = MPDConfig(
        **_data_options(active, passive, id_col, label_col, features_active, features_passive, categorical),
        **_given(
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            patience=patience,
            weight_decay=weight_decay,
            min_epoch_rows=min_epoch_rows,
        ),
        **_out_for(out, party, "mpd"),
        **_party_options(party, rendezvous, timeout, secret_file, alignment, resume=resume),
        **_security_options(identity, peer_cert, insecure, ids_in_clear),
        model=_model(hidden, out_dim, emb_dim, head_hidden, dropout, wide),
        negatives=negatives,
        objective=objective,
        mpd_temperature=mpd_temperature,
        val_fraction=val_fraction,
        seed=seed,
        device=device,
    )
    _, result = pretrain_mpd(config, RichReporter(quiet or json_output))
    _render("pretrain-mpd", result, json_output)


@app.command("train-split")
def train_split_command(
    active: ActiveOption = None,
    passive: PassiveOption = None,
    init: Annotated[
        Optional[Path],
        typer.Option(
            "--init", help="vfl.mpd artifact to start the towers from; absent = from scratch (vanilla VFL)."
        ),
    ] = None,
    id_col: IdColOption = default(SplitConfig, "id_col"),
    label_col: LabelColOption = default(SplitConfig, "label_col"),
    features_active: FeaturesActiveOption = "",
    features_passive: FeaturesPassiveOption = "",
    categorical: CategoricalOption = "",
    aux_weight: Annotated[
        float, typer.Option("--aux-weight", help="Weight of the local branch's own BCE.")
    ] = default(SplitConfig, "aux_weight"),
    mpd_weight: Annotated[
        float,
        typer.Option("--mpd-weight", help="Weight of the MPD loss kept as an auxiliary task (needs --init)."),
    ] = default(SplitConfig, "mpd_weight"),
    init_lr_scale: Annotated[
        float, typer.Option("--init-lr-scale", help="Learning-rate factor for towers pretrained by MPD.")
    ] = default(SplitConfig, "init_lr_scale"),
    self_train_weight: Annotated[
        float,
        typer.Option(
            "--self-train-weight",
            help="Weight of the self-training round's soft targets on the unlabelled overlapped rows "
            "(0 = no round).",
        ),
    ] = default(SplitConfig, "self_train_weight"),
    local_first: Annotated[
        bool,
        typer.Option(
            "--local-first/--joint",
            help="Train the local branch alone first, then hold it and train what the publisher adds "
            "(--joint: both at once, as vanilla VFL does).",
        ),
    ] = default(SplitConfig, "local_first"),
    audit: Annotated[
        bool,
        typer.Option(
            "--audit",
            help="Run the norm and direction label-leakage attacks on the gradients the publisher "
            "receives, per observation and summed over the run (one process only).",
        ),
    ] = default(SplitConfig, "audit"),
    freeze_passive: Annotated[
        bool,
        typer.Option(
            "--freeze-passive/--train-passive",
            help="Hold the publisher's tower as MPD (--init) left it: no gradient, so no label signal, "
            "crosses. --train-passive trains it with the gradients (they reveal labels; see --audit).",
        ),
    ] = default(SplitConfig, "freeze_passive"),
    label_epsilon: Annotated[
        float,
        typer.Option(
            "--label-epsilon",
            help="Randomised response on the labels the federated part learns from: epsilon-label "
            "differential privacy for what crosses (0 = off).",
        ),
    ] = default(SplitConfig, "label_epsilon"),
    noise_multiplier: Annotated[
        float,
        typer.Option(
            "--noise-multiplier",
            help="With --train-passive: clip each row's gradient at --clip-quantile of the observed norms "
            "and add noise this many clips strong, scaled for every time a row is sent (0 = off).",
        ),
    ] = default(SplitConfig, "noise_multiplier"),
    clip_quantile: Annotated[
        float, typer.Option("--clip-quantile", help="Quantile of the gradient norms that sets the clip.")
    ] = default(SplitConfig, "clip_quantile"),
    record_received: Annotated[
        Optional[Path],
        typer.Option(
            "--record-received",
            help="On the publisher's side: keep the gradients it receives in this Parquet file, for "
            "'kvtool vfl audit'.",
        ),
    ] = None,
    clip: Annotated[
        float,
        typer.Option("--clip", help="Bound each row's embedding and own gradient to this L2 norm (0 = off)."),
    ] = default(SplitConfig, "clip"),
    embedding_noise: Annotated[
        float, typer.Option("--embedding-noise", help="Gaussian noise std added to the passive embeddings.")
    ] = default(SplitConfig, "embedding_noise"),
    gradient_noise: Annotated[
        float,
        typer.Option("--gradient-noise", help="Gaussian noise std added to each row's returned gradient."),
    ] = default(SplitConfig, "gradient_noise"),
    hidden: HiddenOption = default(ModelConfig, "hidden"),
    out_dim: EmbDimOption = default(ModelConfig, "out_dim"),
    emb_dim: CategoryDimOption = default(ModelConfig, "emb_dim"),
    head_hidden: HeadHiddenOption = default(ModelConfig, "head_hidden"),
    dropout: DropoutOption = default(ModelConfig, "dropout"),
    wide: WideOption = default(ModelConfig, "wide"),
    weight_decay: WeightDecayOption = None,
    epochs: EpochsOption = None,
    batch_size: BatchOption = None,
    lr: LrOption = None,
    patience: PatienceOption = None,
    min_epoch_rows: MinEpochRowsOption = None,
    val_fraction: ValOption = default(SplitConfig, "val_fraction"),
    seed: SeedOption = default(SplitConfig, "seed"),
    device: DeviceOption = default(SplitConfig, "device"),
    out: OutOption = None,
    party: PartyOption = None,
    rendezvous: RendezvousOption = None,
    timeout: TimeoutOption = default(SplitConfig, "timeout"),
    secret_file: SecretOption = None,
    alignment: AlignmentOption = None,
    identity: IdentityOption = None,
    peer_cert: PeerCertOption = None,
    insecure: InsecureOption = default(SplitConfig, "insecure"),
    ids_in_clear: IdsInClearOption = default(SplitConfig, "ids_in_clear"),
    resume: ResumeOption = default(SplitConfig, "resume"),
    json_output: JsonOption = False,
    quiet: QuietOption = False,
    sign_key: SignKeyOption = None,
    trust: TrustOption = None,
) -> None:
    """Train the split model (local + federated branches) on the labelled overlapped rows.

    Example: kvtool vfl train-split --active a.csv --passive b.csv --init runs/vfl/mpd.safetensors

    The publisher's tower is held as MPD left it by default: no gradient, so no label
    signal, crosses (docs/threat-model.md). --audit measures the leak and what the
    defence costs; the publisher sees what it received with --record-received and
    'kvtool vfl audit'.
    """
    use_signing(sign_key, trust)
    from kedit_vfl.vfl.stages.split import train_split

    config = SplitConfig(
        **_data_options(active, passive, id_col, label_col, features_active, features_passive, categorical),
        **_given(
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            patience=patience,
            weight_decay=weight_decay,
            min_epoch_rows=min_epoch_rows,
        ),
        **_out_for(out, party, "split"),
        **_party_options(party, rendezvous, timeout, secret_file, alignment, resume=resume),
        **_security_options(identity, peer_cert, insecure, ids_in_clear),
        init=init,
        model=_model(hidden, out_dim, emb_dim, head_hidden, dropout, wide),
        aux_weight=aux_weight,
        mpd_weight=mpd_weight,
        init_lr_scale=init_lr_scale,
        self_train_weight=self_train_weight,
        local_first=local_first,
        audit=audit,
        freeze_passive=freeze_passive,
        label_epsilon=label_epsilon,
        noise_multiplier=noise_multiplier,
        clip_quantile=clip_quantile,
        record_received=record_received,
        clip=clip,
        embedding_noise=embedding_noise,
        gradient_noise=gradient_noise,
        val_fraction=val_fraction,
        seed=seed,
        device=device,
    )
    _, result = train_split(config, RichReporter(quiet or json_output))
    _render("train-split", result, json_output)


@app.command("distill")
def distill_command(
    teacher: Annotated[
        Optional[Path],
        typer.Option("--teacher", help="vfl.split teacher. [default: runs/vfl/split.safetensors]"),
    ] = None,
    active: ActiveOption = None,
    passive: PassiveOption = None,
    id_col: IdColOption = default(DistillConfig, "id_col"),
    label_col: LabelColOption = default(DistillConfig, "label_col"),
    temperature: Annotated[
        float, typer.Option("--temperature", "-T", help="Softening temperature of the KD loss.")
    ] = default(DistillConfig, "temperature"),
    kd_weight: Annotated[
        float, typer.Option("--kd-weight", help="lambda: weight of KD against the label BCE.")
    ] = default(DistillConfig, "kd_weight"),
    kd_local_rows: Annotated[
        bool,
        typer.Option(
            "--kd-local-rows", help="Also distil the teacher's local branch on rows without the publisher."
        ),
    ] = default(DistillConfig, "kd_local_rows"),
    audit: Annotated[
        bool,
        typer.Option(
            "--audit",
            help="Record what reaches the publisher (no gradient crosses in distillation) and report "
            "the leakage attacks with the teacher's own audit (one process only).",
        ),
    ] = default(DistillConfig, "audit"),
    epochs: EpochsOption = None,
    batch_size: BatchOption = None,
    lr: LrOption = None,
    weight_decay: WeightDecayOption = None,
    patience: PatienceOption = None,
    min_epoch_rows: MinEpochRowsOption = None,
    val_fraction: ValOption = default(DistillConfig, "val_fraction"),
    seed: SeedOption = default(DistillConfig, "seed"),
    device: DeviceOption = default(DistillConfig, "device"),
    out: OutOption = None,
    party: PartyOption = None,
    rendezvous: RendezvousOption = None,
    timeout: TimeoutOption = default(DistillConfig, "timeout"),
    secret_file: SecretOption = None,
    alignment: AlignmentOption = None,
    identity: IdentityOption = None,
    peer_cert: PeerCertOption = None,
    insecure: InsecureOption = default(DistillConfig, "insecure"),
    ids_in_clear: IdsInClearOption = default(DistillConfig, "ids_in_clear"),
    json_output: JsonOption = False,
    quiet: QuietOption = False,
    sign_key: SignKeyOption = None,
    trust: TrustOption = None,
) -> None:
    """Distil the split teacher into a local model over ALL active rows (SplitKD).

    Two parties: the passive party (--party passive --teacher its split artifact) serves
    its embeddings for the teacher's soft targets; the student trains on the active side.

    Example: kvtool vfl distill --teacher split.safetensors --active a.csv --passive b.csv
    """
    use_signing(sign_key, trust)
    from kedit_vfl.vfl.stages.distill import distill

    config = DistillConfig(
        **_given(teacher=teacher, active=active, passive=passive, id_col=id_col, label_col=label_col),
        **_given(
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            patience=patience,
            out=out,
            weight_decay=weight_decay,
            min_epoch_rows=min_epoch_rows,
        ),
        **_party_options(party, rendezvous, timeout, secret_file, alignment),
        **_security_options(identity, peer_cert, insecure, ids_in_clear),
        temperature=temperature,
        kd_weight=kd_weight,
        kd_local_rows=kd_local_rows,
        audit=audit,
        val_fraction=val_fraction,
        seed=seed,
        device=device,
    )
    if teacher is None and config.teacher is not None:
        chained("--teacher", config.teacher, quiet)
    _, result = distill(config, RichReporter(quiet or json_output))
    _render("distill", result, json_output)


@app.command("train-local")
def train_local_command(
    active: ActiveOption = None,
    id_col: IdColOption = default(LocalConfig, "id_col"),
    label_col: LabelColOption = default(LocalConfig, "label_col"),
    features_active: FeaturesActiveOption = "",
    categorical: CategoricalOption = "",
    hidden: HiddenOption = default(ModelConfig, "hidden"),
    out_dim: EmbDimOption = default(ModelConfig, "out_dim"),
    emb_dim: CategoryDimOption = default(ModelConfig, "emb_dim"),
    head_hidden: HeadHiddenOption = default(ModelConfig, "head_hidden"),
    dropout: DropoutOption = default(ModelConfig, "dropout"),
    wide: WideOption = default(ModelConfig, "wide"),
    epochs: EpochsOption = None,
    batch_size: BatchOption = None,
    lr: LrOption = None,
    weight_decay: WeightDecayOption = None,
    patience: PatienceOption = None,
    min_epoch_rows: MinEpochRowsOption = None,
    val_fraction: ValOption = default(LocalConfig, "val_fraction"),
    seed: SeedOption = default(LocalConfig, "seed"),
    device: DeviceOption = default(LocalConfig, "device"),
    out: Annotated[
        Optional[Path],
        typer.Option("--out", help="Where to write the model. [default: runs/vfl/own.safetensors]"),
    ] = None,
    json_output: JsonOption = False,
    quiet: QuietOption = False,
    sign_key: SignKeyOption = None,
) -> None:
    """Train the advertiser's model on its own table alone (no partner), to compare before federating.

    The same tower and scaling as the distilled student; score it like any local model.

    Example: kvtool vfl train-local --active a.csv --out own.safetensors
    && kvtool vfl score --model own.safetensors
    """
    use_signing(sign_key)
    from kedit_vfl.vfl.stages.distill import distill

    config = LocalConfig(
        **_given(active=active, id_col=id_col, label_col=label_col),
        features_active=_columns(features_active),
        categorical=_columns(categorical),
        **_given(
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            patience=patience,
            out=out,
            weight_decay=weight_decay,
            min_epoch_rows=min_epoch_rows,
        ),
        model=_model(hidden, out_dim, emb_dim, head_hidden, dropout, wide),
        val_fraction=val_fraction,
        seed=seed,
        device=device,
    )
    _, result = distill(config, RichReporter(quiet or json_output))
    _render("train-local", result, json_output)


@app.command("score")
def score_command(
    model: Annotated[
        Optional[Path],
        typer.Option(
            "--model", help="vfl.local or vfl.split artifact. [default: runs/vfl/local|split.safetensors]"
        ),
    ] = None,
    active: Annotated[
        Optional[Path],
        typer.Option("--active", help="Rows to score (active table). [default: embedded test table]"),
    ] = None,
    passive: Annotated[
        Optional[Path], typer.Option("--passive", help="Publisher's table for federated mode.")
    ] = None,
    mode: Annotated[str, typer.Option("--mode", help="local (advertiser alone) or federated.")] = default(
        ScoreConfig, "mode"
    ),
    fallback: Annotated[
        Optional[Path],
        typer.Option("--fallback", help="vfl.local model for rows the publisher lacks (federated mode)."),
    ] = None,
    id_col: IdColOption = default(ScoreConfig, "id_col"),
    label_col: LabelColOption = default(ScoreConfig, "label_col"),
    device: DeviceOption = default(ScoreConfig, "device"),
    out: Annotated[
        Optional[Path],
        typer.Option(
            "--out",
            help="id,score,mode_used as CSV (or Parquet for .parquet). [default: runs/vfl/scores_MODE.csv]",
        ),
    ] = None,
    party: PartyOption = None,
    rendezvous: RendezvousOption = None,
    timeout: TimeoutOption = default(ScoreConfig, "timeout"),
    secret_file: SecretOption = None,
    alignment: AlignmentOption = None,
    identity: IdentityOption = None,
    peer_cert: PeerCertOption = None,
    insecure: InsecureOption = default(ScoreConfig, "insecure"),
    ids_in_clear: IdsInClearOption = default(ScoreConfig, "ids_in_clear"),
    json_lines: Annotated[
        bool,
        typer.Option("--json-lines", help="With --out -: one JSON object per scored row instead of CSV."),
    ] = default(ScoreConfig, "json_lines"),
    json_output: JsonOption = False,
    quiet: QuietOption = False,
    trust: TrustOption = None,
) -> None:
    """Score the active party's rows; AUC and log loss when labels exist.

    The table streams through batch by batch (memory does not grow with it); every input
    row gets one output row, in order, repeated ids included.

    Two parties (federated mode): the passive party (--party passive --model its split
    artifact --passive its table) serves embeddings for the overlapping rows.

    Example: kvtool vfl score --model split.safetensors --active a.csv --passive b.csv --mode federated --json
    """
    use_signing(None, trust)
    from kedit_vfl.vfl.serving.score import score

    config = ScoreConfig(
        **_given(model=model, active=active, passive=passive, fallback=fallback, out=out),
        mode=mode,
        id_col=id_col,
        label_col=label_col,
        device=device,
        json_lines=json_lines,
        **_party_options(party, rendezvous, timeout, secret_file, alignment),
        **_security_options(identity, peer_cert, insecure, ids_in_clear),
    )
    if model is None:
        chained(
            "--model", default_output("local.safetensors" if mode == "local" else "split.safetensors"), quiet
        )
    result = score(config, RichReporter(quiet or json_output))
    # With --out - the scores own stdout; the summary goes to stderr.
    _render(f"score ({mode} mode)", result, json_output, sys.stderr if config.to_stdout else None)


@app.command("serve")
def serve_command(
    model: Annotated[
        Optional[Path],
        typer.Option(
            "--model",
            help="vfl.local (answers alone) or vfl.split (with the publisher) artifact; the publisher gives "
            "its passive split artifact. [default: runs/vfl/local.safetensors, split.safetensors with "
            "--rendezvous, split_passive.safetensors for --party passive]",
        ),
    ] = None,
    party: Annotated[
        str,
        typer.Option(
            "--party",
            help="active: the advertiser's HTTP scoring service; passive: the publisher, answering the "
            "advertiser's embedding requests.",
        ),
    ] = default(ServeConfig, "party"),
    port: Annotated[int, typer.Option("--port", help="HTTP port of the scoring service.")] = default(
        ServeConfig, "port"
    ),
    host: Annotated[
        str, typer.Option("--host", help="HTTP address (0.0.0.0: every interface; plain HTTP, see the docs).")
    ] = default(ServeConfig, "host"),
    deadline_ms: Annotated[
        float,
        typer.Option(
            "--deadline-ms",
            help="A row the publisher has not answered within this many ms of its request is scored locally.",
        ),
    ] = default(ServeConfig, "deadline_ms"),
    max_batch: Annotated[
        int, typer.Option("--max-batch", help="Most rows in one HTTP request (more: 413).")
    ] = default(ServeConfig, "max_batch"),
    drain_seconds: Annotated[
        float,
        typer.Option("--drain-seconds", help="On SIGTERM/SIGINT, how long requests in flight may finish."),
    ] = default(ServeConfig, "drain_seconds"),
    fallback: Annotated[
        Optional[Path],
        typer.Option(
            "--fallback",
            help="vfl.local model for the rows the publisher does not answer. [default: the "
            "local.safetensors distilled from --model beside it, else the split model's local branch]",
        ),
    ] = None,
    active: Annotated[
        Optional[Path],
        typer.Option(
            "--active",
            help="The advertiser's users that may be scored federated (only the id column is read; aligned "
            "with the publisher's table at each connection). [default: embedded test table]",
        ),
    ] = None,
    passive: Annotated[
        Optional[Path], typer.Option("--passive", help="The publisher's table (--party passive).")
    ] = None,
    id_col: IdColOption = default(ServeConfig, "id_col"),
    label_col: LabelColOption = default(ServeConfig, "label_col"),
    device: DeviceOption = default(ServeConfig, "device"),
    rendezvous: RendezvousOption = None,
    timeout: TimeoutOption = default(ServeConfig, "timeout"),
    secret_file: SecretOption = None,
    alignment: AlignmentOption = None,
    identity: IdentityOption = None,
    peer_cert: PeerCertOption = None,
    insecure: InsecureOption = default(ServeConfig, "insecure"),
    ids_in_clear: IdsInClearOption = default(ServeConfig, "ids_in_clear"),
    json_output: JsonOption = False,
    quiet: QuietOption = False,
    trust: TrustOption = None,
) -> None:
    """Serve scores over HTTP in real time (advertiser), or embeddings to it (publisher).

    POST /score takes one row or a batch of rows with ids; each answer says whether the
    federated model or the local one served the row, and why. A split model asks the
    publisher for the embeddings of agreed ids (micro-batched, over the two-party
    channel) and scores a row locally when the answer misses --deadline-ms. GET /readyz,
    /healthz, /metrics (Prometheus), /docs (OpenAPI). SIGTERM/SIGINT drain and stop;
    SIGHUP reloads --model without dropping requests. Runs until stopped; --json prints
    the summary at the end.

    Example: kvtool vfl serve --model split.safetensors --port 8080 --rendezvous tcp://0.0.0.0:29500
    --identity me --peer-cert publisher.pem --deadline-ms 15
    """
    use_signing(None, trust)
    from kedit_vfl.vfl.serving.server import serve

    config = ServeConfig(
        **_given(model=model, active=active, passive=passive, fallback=fallback),
        party=party,
        host=host,
        port=port,
        deadline_ms=deadline_ms,
        max_batch=max_batch,
        drain_seconds=drain_seconds,
        id_col=id_col,
        label_col=label_col,
        device=device,
        rendezvous=rendezvous,
        timeout=timeout,
        secret_file=secret_file,
        alignment=alignment,
        **_security_options(identity, peer_cert, insecure, ids_in_clear),
    )
    result = serve(config, RichReporter(quiet or json_output))
    _render(f"serve ({party})", result, json_output)


@app.command("keygen")
def keygen_command(
    out: Annotated[Path, typer.Option("--out", help="Folder for key.pem (private) and cert.pem (to share).")],
    name: Annotated[
        str, typer.Option("--name", help="A name for the certificate, e.g. the organisation.")
    ] = "party",
    force: Annotated[bool, typer.Option("--force", help="Replace an identity already in --out.")] = False,
    json_output: JsonOption = False,
) -> None:
    """Make this party's TLS identity: a private key and a self-signed certificate.

    Send cert.pem (never key.pem) to the other party and compare the fingerprint printed
    here with the one it sees, over another channel (a call, a signed e-mail). Each party
    then runs with --identity OUT --peer-cert OTHER_CERT.pem.
    """
    from kedit_vfl.vfl.channel.identity import generate_identity

    identity = generate_identity(out, name, force)
    result = {"key": str(identity.key), "cert": str(identity.cert), "fingerprint": identity.fingerprint}
    if json_output:
        emit_json(result)
        return
    typer.echo(f"private key (keep it here): {identity.key}")
    typer.echo(f"certificate (send it to the other party): {identity.cert}")
    typer.echo(f"fingerprint (compare it with the other party over another channel): {identity.fingerprint}")


@app.command("align")
def align_command(
    party: Annotated[
        Optional[str],
        typer.Option("--party", help="active (advertiser, PSI client) or passive (publisher, PSI server)."),
    ] = None,
    rendezvous: RendezvousOption = None,
    table: Annotated[
        Optional[Path], typer.Option("--table", help="This party's table (CSV/Parquet/JSONL file or folder).")
    ] = None,
    id_col: IdColOption = default(AlignConfig, "id_col"),
    reveal: Annotated[
        str,
        typer.Option(
            "--reveal",
            help="both: both parties learn the intersection; active-only: the passive party learns "
            "nothing about it at alignment time (it maps all its rows).",
        ),
    ] = default(AlignConfig, "reveal"),
    fpr: Annotated[
        float, typer.Option("--fpr", help="PSI false-positive rate over all of the active party's ids.")
    ] = default(AlignConfig, "fpr"),
    secret_file: SecretOption = None,
    identity: IdentityOption = None,
    peer_cert: PeerCertOption = None,
    insecure: InsecureOption = default(AlignConfig, "insecure"),
    timeout: TimeoutOption = default(AlignConfig, "timeout"),
    deadline: Annotated[
        float,
        typer.Option("--deadline", help="Seconds the whole alignment may take, keepalives or not."),
    ] = default(AlignConfig, "deadline"),
    out: Annotated[
        Optional[Path],
        typer.Option(
            "--out", help="Where to write the alignment. [default: runs/vfl/alignment_PARTY.safetensors]"
        ),
    ] = None,
    json_output: JsonOption = False,
    quiet: QuietOption = False,
    sign_key: SignKeyOption = None,
) -> None:
    """Find the users both parties hold without sending any id (ECDH private set intersection).

    Example: kvtool vfl align --party active --table a.csv --rendezvous tcp://0.0.0.0:29500
    --identity me --peer-cert publisher.pem and, on the publisher's host, kvtool vfl align
    --party passive --table b.csv --rendezvous tcp://ADVERTISER_HOST:29500 --identity me
    --peer-cert advertiser.pem --out al.safetensors
    """
    use_signing(sign_key)
    from kedit_vfl.vfl.channel.alignment import align

    config = AlignConfig(
        party=party,
        rendezvous=rendezvous,
        table=table,
        id_col=id_col,
        reveal=reveal,
        fpr=fpr,
        secret_file=secret_file,
        identity=identity,
        peer_cert=peer_cert,
        insecure=insecure,
        timeout=timeout,
        deadline=deadline,
        out=out,
    )
    result = align(config, RichReporter(quiet or json_output))
    _render(f"align ({config.party} party)", result, json_output)


@app.command("export")
def export_command(
    model: Annotated[
        Optional[Path],
        typer.Option(
            "--model",
            help="vfl.local artifact, or a vfl.split artifact (its local branch). "
            "[default: runs/vfl/local.safetensors]",
        ),
    ] = None,
    format: Annotated[str, typer.Option("--format", help="Export format (onnx).")] = default(
        ExportConfig, "format"
    ),
    out: Annotated[
        Optional[Path],
        typer.Option(
            "--out", help="Where to write the graph (OUT.json beside it). [default: runs/vfl/local.onnx]"
        ),
    ] = None,
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset version (13 to 20).")] = default(
        ExportConfig, "opset"
    ),
    verify_rows: Annotated[
        int,
        typer.Option("--verify-rows", help="Table rows on which onnxruntime must match kvtool vfl score."),
    ] = default(ExportConfig, "verify_rows"),
    table: Annotated[
        Optional[Path],
        typer.Option("--table", help="Active table to verify on. [default: embedded test table, if it fits]"),
    ] = None,
    id_col: IdColOption = default(ExportConfig, "id_col"),
    json_output: JsonOption = False,
    quiet: QuietOption = False,
    trust: TrustOption = None,
) -> None:
    """Export the local-mode model to ONNX, the feature transform inside the graph.

    Inputs: numeric (raw float32, NaN = missing) and categorical (int64 vocabulary
    indices); outputs: score (probability) and logit. Written only after onnxruntime
    reproduces kvtool vfl score's local-mode scores within 1e-5; OUT.json lists the
    column order, the vocabularies and the index convention.

    Example: kvtool vfl export --model local.safetensors --format onnx --out local.onnx --json
    """
    use_signing(None, trust)
    from kedit_vfl.vfl.serving.export import export_onnx

    config = ExportConfig(
        model=model, format=format, out=out, opset=opset, verify_rows=verify_rows, table=table, id_col=id_col
    )
    if model is None:
        chained("--model", config.model_path, quiet)
    result = export_onnx(config, RichReporter(quiet or json_output))
    _render(f"export ({format})", result, json_output)


@app.command("audit")
def audit_command(
    record: Annotated[
        Path, typer.Argument(help="The publisher's record: train-split --record-received FILE.")
    ],
    labels: Annotated[
        Optional[Path],
        typer.Option(
            "--labels",
            help="A table with the users' labels, to score the attacks (for instance in a joint review).",
        ),
    ] = None,
    id_col: IdColOption = default(AuditConfig, "id_col"),
    label_col: Annotated[
        str, typer.Option("--label-col", help="The label column of --labels (0/1).")
    ] = default(AuditConfig, "label_col"),
    scores: Annotated[
        Optional[Path],
        typer.Option("--scores", help="Write each user's attack scores and the attacker's guess (CSV)."),
    ] = None,
    seed: SeedOption = default(AuditConfig, "seed"),
    json_output: JsonOption = False,
) -> None:
    """What the publisher could learn about the labels from the gradients it received.

    Example: kvtool vfl train-split --party passive --record-received received.parquet ...
    then: kvtool vfl audit received.parquet --scores guesses.csv
    """
    from kedit_vfl.vfl.privacy.audit import audit

    config = AuditConfig(
        record=record, labels=labels, id_col=id_col, label_col=label_col, scores=scores, seed=seed
    )
    _render("audit", audit(config), json_output)
