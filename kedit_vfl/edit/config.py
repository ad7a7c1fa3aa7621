"""Typed, validated configs of the edit commands; each is serialised into its artifact."""

from __future__ import annotations

from dataclasses import dataclass, field

from kedit_vfl.errors import UserError

METHOD_NAMES = ("instructedit", "memory", "mend", "ft-l", "ft-m")  # kedit_vfl.edit.algs
METRICS = ("reliability", "generalization", "locality", "portability")  # what evaluate reports per task

KNOWN_TASKS = ("counterfact", "recent", "convsent", "zsre")
DEFAULT_TRAIN_TASKS = ("counterfact", "recent", "convsent")
QUERY_STYLES = ("auto", "instructed", "plain")  # evaluate --queries; auto: as the editor was trained
INSTRUCTION_INPUTS = ("prefix", "condition")  # where an instruction enters the editor
AGGREGATES = ("sum", "joint")  # how a batch's edits combine (EditorConfig.aggregate)
DTYPE_NAMES = ("float32", "bfloat16", "float16", "auto")  # transformers' names; auto: the checkpoint's


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise UserError(f"{name} {value}: must be positive")


@dataclass(frozen=True)
class EditorConfig:
    """Shape of the hypernetwork; the defaults suit tiny and multi-billion models alike."""

    rank: int = 1920  # capped at the transform's width
    depth: int = 2  # low-rank residual blocks per transform
    edit_lr: float = 1e-3  # initial per-layer step size alpha_l
    layers: tuple[str, ...] = ()  # empty: the architecture's default MLP layers
    n_blocks: int = 3  # default layers: the MLPs of the last n_blocks blocks
    # How a batch's edits combine: "sum" (MEND: the rank-one updates add up) or "joint"
    # (each edit's effect on the batch's keys as if alone; network.joint_values), with a
    # ridge of ``ridge`` times the mean squared key length.
    aggregate: str = "joint"
    ridge: float = 1.0  # chosen on the validation split (docs/edit.md, "Batches")
    # Where a task instruction enters: "condition" (the editor reads the gradient of the
    # plain prompt a user asks, and the base model's embedding of the instruction scales
    # and shifts its features; the default since 0.3) or "prefix" (it prefixes the prompt
    # whose gradient the editor reads, as up to 0.2; docs/edit.md has the comparison).
    instruction_input: str = "condition"
    condition_dim: int = 0  # the instruction embedding's width (set by training; 0: none)
    condition_rank: int = 64  # rank of the map from the instruction embedding to the features

    def __post_init__(self) -> None:
        _positive("--rank", self.rank)
        _positive("--depth", self.depth)
        _positive("--edit-lr", self.edit_lr)
        _positive("--n-blocks", self.n_blocks)
        if self.aggregate not in AGGREGATES:
            raise UserError(f"--aggregate {self.aggregate}: expected one of {', '.join(AGGREGATES)}")
        _positive("--ridge", self.ridge)
        if self.instruction_input not in INSTRUCTION_INPUTS:
            expected = ", ".join(INSTRUCTION_INPUTS)
            raise UserError(f"--instruction-input {self.instruction_input}: expected one of {expected}")
        if self.condition_dim < 0:
            raise UserError(f"condition_dim {self.condition_dim}: must be >= 0")
        _positive("condition_rank", self.condition_rank)


@dataclass(frozen=True)
class WorldOptions:
    """Which embedded world (seed and sizes) to build when ``--model embedded``."""

    seed: int = 0
    sizes: tuple[tuple[str, int], ...] = ()

    def as_kwargs(self) -> dict[str, int]:
        return {"seed": self.seed, **dict(self.sizes)}


@dataclass(frozen=True)
class TrainConfig:
    """``kvtool edit train-editor``: one field per option."""

    model: str = "embedded"
    device: str = "auto"
    dtype: str = "float32"
    data: tuple[str, ...] = ()  # empty: the embedded world's train/validation splits
    tasks: tuple[str, ...] = DEFAULT_TRAIN_TASKS
    holdout: str | None = "zsre"
    instructions: bool = True
    instructions_file: str | None = None
    steps: int = 3000
    batch_size: int = 1  # edit records per meta-training step (combined as editor.aggregate says)
    # Mixed batch sizes: each step draws its number of edits from these (MEND's batched
    # objective at several sizes, so one editor serves single edits and batches); empty:
    # always ``batch_size``.
    batch_sizes: tuple[int, ...] = ()
    # The side memory (evaluate --method memory) routes a prompt to an edit when their keys
    # are close enough; the threshold is chosen on the validation split for a memory
    # holding this many edits (more edits, more unrelated prompts near one: stricter).
    memory_edits: int = 100
    # ... as the loosest threshold that routes at most this share of the validation
    # records' unrelated (locality) prompts to an edit: a misrouted prompt gets an edit
    # it never asked for, so Locality is the constraint and Generalization what is left.
    memory_unrelated: float = 0.05
    # The edit loss (and validation) on the instructed prompts as well as the edit input;
    # off: on the plain prompts and rephrases a user asks the edited model, the instruction
    # only conditioning the gradient the editor sees (docs/edit.md: "Instructions and queries").
    instructed_queries: bool = False
    # Meta-steps whose gradients average into one optimizer step: one process with
    # --accumulate N takes the step that N data-parallel processes (torchrun) take.
    accumulate: int = 1
    # transformers' activation checkpointing through the base model's blocks: saves the
    # edited blocks' activations for more compute (docs/large-models.md has the measurement).
    gradient_checkpointing: bool = False
    lr: float = 1e-4  # Adam, hypernetwork
    lr_alpha: float = 1e-4  # Adam, per-layer step sizes (MEND's lr_lr; compared on worlds 0-2, README)
    c_edit: float = 0.1
    c_loc: float = 1.0
    use_rephrase: bool = True
    ema: float = 0.995  # decay of the weight average that validation scores and training keeps; 0: off
    val_every: int = 250
    val_records: int = 64  # per task
    patience: int = 6  # validations without improvement before stopping
    seed: int = 0
    world: WorldOptions = field(default_factory=WorldOptions)
    editor: EditorConfig = field(default_factory=EditorConfig)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_NAMES:
            raise UserError(f"--dtype {self.dtype}: expected one of {', '.join(DTYPE_NAMES)}")
        if not self.tasks:
            raise UserError("--tasks: name at least one task")
        if self.holdout is not None and self.holdout in self.tasks:
            raise UserError(
                f"--holdout {self.holdout}: is also in --tasks; a hold-out task is never trained on"
            )
        if not self.data:
            unknown = [t for t in (*self.tasks, self.holdout) if t is not None and t not in KNOWN_TASKS]
            if unknown:
                raise UserError(
                    f"--tasks/--holdout: unknown task {', '.join(unknown)} "
                    f"(the embedded world has {', '.join(KNOWN_TASKS)})"
                )
        if any(size < 1 for size in self.batch_sizes):
            raise UserError(f"--batch-sizes {','.join(map(str, self.batch_sizes))}: every size must be >= 1")
        for name in (
            "steps",
            "batch_size",
            "lr",
            "lr_alpha",
            "val_every",
            "val_records",
            "patience",
            "memory_edits",
            "accumulate",
        ):
            _positive("--" + name.replace("_", "-"), getattr(self, name))
        if not 0 <= self.memory_unrelated < 1:
            raise UserError(f"--memory-unrelated {self.memory_unrelated}: must be in [0, 1)")
        if self.c_edit < 0 or self.c_loc < 0:
            raise UserError("--c-edit/--c-loc: must be non-negative")
        if not 0 <= self.ema < 1:
            raise UserError(f"--ema {self.ema}: must be in [0, 1) (0 turns the weight average off)")


@dataclass(frozen=True)
class EvalConfig:
    """``kvtool edit evaluate``: which records, which instruction, which protocol."""

    model: str | None = None  # None: the editor's own base model
    device: str = "auto"
    dtype: str = "float32"
    data: tuple[str, ...] = ()
    task: str | None = None
    instruction_index: int = 0
    unseen_instruction: bool = False
    no_prefix: bool = False  # ablation: edit without the instruction (prefix or conditioning)
    sequential: int = 0  # 0: one edit at a time with rollback
    batch: int = 0  # N: N edits applied together as ``apply`` does (combined as the editor's aggregate says)
    limit: int | None = None  # records per task
    seed: int = 0
    methods: tuple[str, ...] = ("instructedit",)  # compared on the same records and protocol
    mend_editor: str | None = None  # for MEND when the editor has instructions
    hparams: str | None = None  # JSON of FTConfig fields for ft-l / ft-m
    curve_every: int = 0  # with --sequential: score the edits so far every this many (0: N/10)
    # What the edited model is asked, for an instructed editor: the instructed prompts it
    # edited with, or the plain prompts (and rephrases) a user queries after ``apply``;
    # auto: the ones its edit loss was trained on (plain since 0.2, instructed before).
    queries: str = "auto"
    plot: str | None = None  # with --sequential: the retention curve as a PNG

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_NAMES:
            raise UserError(f"--dtype {self.dtype}: expected one of {', '.join(DTYPE_NAMES)}")
        unknown = [m for m in self.methods if m not in METHOD_NAMES]
        if unknown or not self.methods:
            raise UserError(f"--method {','.join(unknown)}: expected some of {', '.join(METHOD_NAMES)}")
        if len(set(self.methods)) != len(self.methods):
            raise UserError("--method: a method is named twice")
        if self.instruction_index < 0:
            raise UserError(f"--instruction-index {self.instruction_index}: must be >= 0")
        if self.sequential < 0:
            raise UserError(f"--sequential {self.sequential}: must be >= 0")
        if self.batch < 0:
            raise UserError(f"--batch {self.batch}: must be >= 0")
        if self.batch and self.sequential:
            raise UserError("--batch and --sequential exclude each other")
        if self.curve_every < 0:
            raise UserError(f"--curve-every {self.curve_every}: must be >= 0")
        if self.plot is not None and not self.sequential:
            raise UserError("--plot draws the --sequential retention curve: add --sequential N")
        if self.no_prefix and self.unseen_instruction:
            raise UserError("--no-prefix and --unseen-instruction exclude each other")
        if self.limit is not None and self.limit <= 0:
            raise UserError(f"--limit {self.limit}: must be positive")
        if self.queries not in QUERY_STYLES:
            raise UserError(f"--queries {self.queries}: expected one of {', '.join(QUERY_STYLES)}")


FT_OBJECTIVES = ("prompt_last", "target_new")


@dataclass(frozen=True)
class FTConfig:
    """Fine-tuning baselines as EasyEdit defines them (``hparams/FT``), in its terms.

    FT-L (``prompt_last``): the last prompt token's prediction is pushed towards every
    target token, and the weight change is bound elementwise by ``norm_constraint``
    (EasyEdit's GPT-2 defaults: lr 5e-4, bound 5e-4). FT-M (``target_new``): the
    teacher-forced NLL of the target tokens only, no bound; lr 5e-3 is the setting
    the editing issue measured EasyEdit's FT-M with on the embedded model. Both run at
    most ``steps`` Adam steps on all edits of a batch together and stop once the loss is
    below ``stop_loss``.
    """

    objective: str = "target_new"
    layers: tuple[str, ...] = ()  # module names; empty: the last edited block's MLP output projection
    steps: int = 25
    lr: float = 5e-3
    norm_constraint: float = 0.0  # elementwise bound on the weight change; 0: none
    stop_loss: float = 1e-2

    def __post_init__(self) -> None:
        if self.objective not in FT_OBJECTIVES:
            raise UserError(f"objective {self.objective!r}: expected one of {', '.join(FT_OBJECTIVES)}")
        _positive("steps", self.steps)
        _positive("lr", self.lr)
        if self.norm_constraint < 0 or self.stop_loss < 0:
            raise UserError("norm_constraint and stop_loss must not be negative")


FT_PRESETS = {
    "ft-l": FTConfig(objective="prompt_last", lr=5e-4, norm_constraint=5e-4),
    "ft-m": FTConfig(objective="target_new", lr=5e-3),
}


@dataclass(frozen=True)
class ApplyConfig:
    """``kvtool edit apply``: which edits, in batches of how many, written where."""

    edits: tuple[str, ...] = ()
    out: str = ""
    model: str | None = None
    device: str = "auto"
    dtype: str = "float32"
    batch_size: int = 32  # edits per forward pass; every edit's update is computed on the unedited model
    instruction_index: int = 0
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_NAMES:
            raise UserError(f"--dtype {self.dtype}: expected one of {', '.join(DTYPE_NAMES)}")
        _positive("--batch-size", self.batch_size)
        if self.instruction_index < 0:
            raise UserError(f"--instruction-index {self.instruction_index}: must be >= 0")
