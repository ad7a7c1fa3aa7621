"""``kvtool edit``: the InstructEdit commands (parse, build a config, call the library, render)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from kedit_vfl.artifacts import Artifact, config_to_dict, data_fingerprint, make_provenance, save_artifact
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
    print_table,
)
from kedit_vfl.edit.config import (
    DEFAULT_TRAIN_TASKS,
    METRICS,
    ApplyConfig,
    EditorConfig,
    EvalConfig,
    TrainConfig,
    WorldOptions,
)
from kedit_vfl.errors import UserError
from kedit_vfl.paths import runs_dir
from kedit_vfl.signing import use_signing

app = typer.Typer(
    help="Knowledge editing (InstructEdit): one editor: train, apply, evaluate, analyse its updates.\n\n"
    "Example: kvtool edit train-editor && kvtool edit apply && kvtool edit evaluate",
    no_args_is_help=True,
)

ModelOption = Annotated[
    str,
    typer.Option(
        "--model",
        help="'embedded' (the project's own small LM), a Hugging Face name or folder, or "
        "random:SHAPE[,key=value...] (random weights of a preset or config.json shape; docs: large models).",
    ),
]
DtypeOption = Annotated[
    str,
    typer.Option(
        "--dtype",
        help="The base model's weights: float32, bfloat16, float16 or auto (the checkpoint's); "
        "the editor stays float32.",
    ),
]
DataOption = Annotated[
    Optional[list[Path]],
    typer.Option(
        "--data", help="Edit records (KnowEdit, ZsRE, CounterFact, ConvSent or kvtool JSONL); repeatable."
    ),
]
WorldSeedOption = Annotated[
    int, typer.Option("--world-seed", help="Seed of the embedded world (a fresh world and base model).")
]
WorldSizeOption = Annotated[
    Optional[int], typer.Option(help="Size of the embedded world (default: the world's own).")
]


def _default_editor() -> Path:
    return runs_dir() / "edit" / "editor.safetensors"


def _editor_or_default(editor: Path | None, quiet: bool) -> Path:
    if editor is not None:
        return editor
    chained("--editor", _default_editor(), quiet)
    return _default_editor()


def _split(value: str | None) -> tuple[str, ...]:
    return tuple(v.strip() for v in (value or "").split(",") if v.strip())


def _world(seed: int, countries: int | None, people: int | None, recent: int | None) -> WorldOptions:
    sizes = {"countries": countries, "people": people, "recent": recent}
    return WorldOptions(seed=seed, sizes=tuple((k, v) for k, v in sizes.items() if v is not None))


def _holdout(value: str | None, tasks: tuple[str, ...]) -> str | None:
    if value is None:
        return None if "zsre" in tasks else "zsre"
    return None if value.lower() == "none" else value


def _metric_rows(summary: dict[str, Any], holdout: str | None = None) -> list[list[Any]]:
    rows = []
    for task, values in [*summary["tasks"].items(), ("overall", summary["overall"])]:
        label = f"{task} (hold-out)" if task == holdout else task
        cells = []
        for name in METRICS:
            post, pre = values.get(name), values.get("pre_" + name)
            cells.append(
                "-" if post is None else f"{post:.3f} ({pre:.3f})" if pre is not None else f"{post:.3f}"
            )
        rows.append([label, *cells, values.get("n_records")])
    return rows


def _sizes(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UserError(f"--batch-sizes {text}: expected whole numbers, comma-separated") from None


def _figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _curve_rows(methods: dict[str, Any]) -> list[list[Any]]:
    """One row per checkpoint: each method's retention / locality there."""
    steps = sorted({p["edits"] for m in methods.values() for p in m.get("sequential_curve", [])})
    rows = []
    for edits in steps:
        cells = []
        for figures in methods.values():
            point = next((p for p in figures.get("sequential_curve", []) if p["edits"] == edits), None)
            cells.append(
                "-" if point is None or point["retention"] is None
                else f"{point['retention']:.3f} / " + _figure(point["locality"])
            )  # fmt: skip
        rows.append([edits, *cells])
    return rows


@app.command("train-editor")
def train_editor_command(
    model: ModelOption = "embedded",
    data: DataOption = None,
    tasks: Annotated[str, typer.Option("--tasks", help="Training tasks, comma-separated.")] = ",".join(
        DEFAULT_TRAIN_TASKS
    ),
    holdout: Annotated[
        Optional[str],
        typer.Option(
            "--holdout", help="Task kept out of training ('none' for none; default zsre unless trained)."
        ),
    ] = None,
    no_instructions: Annotated[
        bool, typer.Option("--no-instructions", help="Multi-task MEND baseline: no instruction prefix.")
    ] = False,
    instructions: Annotated[
        Optional[Path],
        typer.Option("--instructions", help="Instruction pools (JSON) instead of the shipped ones."),
    ] = None,
    steps: Annotated[int, typer.Option("--steps", help="Maximum meta-training steps.")] = TrainConfig.steps,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Edits per step.")] = TrainConfig.batch_size,
    batch_sizes: Annotated[
        str,
        typer.Option(
            "--batch-sizes",
            help="Edits per step drawn from these sizes, comma-separated (one editor for single edits "
            "and batches); empty: always --batch-size.",
        ),
    ] = ",".join(map(str, TrainConfig.batch_sizes)),
    memory_edits: Annotated[
        int,
        typer.Option(
            "--memory-edits",
            help="Calibrate the side memory's routing threshold (evaluate --method memory) for a memory "
            "of this many edits.",
        ),
    ] = TrainConfig.memory_edits,
    memory_unrelated: Annotated[
        float,
        typer.Option(
            "--memory-unrelated",
            help="The side memory's threshold routes at most this share of unrelated validation "
            "prompts to an edit.",
        ),
    ] = TrainConfig.memory_unrelated,
    instructed_queries: Annotated[
        bool,
        typer.Option(
            "--instructed-queries/--plain-queries",
            help="Train the edit to hold on the instructed prompts, or on the plain prompts a user asks "
            "(the instruction then only conditions the editor's input).",
        ),
    ] = TrainConfig.instructed_queries,
    accumulate: Annotated[
        int,
        typer.Option(
            "--accumulate",
            help="Meta-steps averaged into one optimizer step (N matches torchrun with N processes).",
        ),
    ] = TrainConfig.accumulate,
    gradient_checkpointing: Annotated[
        bool,
        typer.Option(
            "--gradient-checkpointing/--no-gradient-checkpointing",
            help="Recompute the base model's activations in backward instead of keeping them.",
        ),
    ] = TrainConfig.gradient_checkpointing,
    lr: Annotated[float, typer.Option("--lr", help="Adam learning rate of the editor.")] = TrainConfig.lr,
    lr_alpha: Annotated[
        float, typer.Option("--lr-alpha", help="Learning rate of the step sizes.")
    ] = TrainConfig.lr_alpha,
    c_edit: Annotated[float, typer.Option("--c-edit", help="Weight of the edit loss.")] = TrainConfig.c_edit,
    c_loc: Annotated[float, typer.Option("--c-loc", help="Weight of the locality loss.")] = TrainConfig.c_loc,
    ema: Annotated[
        float,
        typer.Option("--ema", help="Decay of the weight average that validation scores and keeps (0: off)."),
    ] = TrainConfig.ema,
    val_every: Annotated[
        int, typer.Option("--val-every", help="Steps between validations.")
    ] = TrainConfig.val_every,
    patience: Annotated[
        int, typer.Option("--patience", help="Validations without improvement before stopping.")
    ] = TrainConfig.patience,
    layers: Annotated[
        Optional[str],
        typer.Option("--layers", help="Edited modules: names, suffixes or regexes, comma-separated."),
    ] = None,
    n_blocks: Annotated[
        int, typer.Option("--n-blocks", help="Without --layers: edit the MLPs of this many last blocks.")
    ] = EditorConfig.n_blocks,
    rank: Annotated[int, typer.Option("--rank", help="Rank of the gradient transform.")] = EditorConfig.rank,
    depth: Annotated[
        int, typer.Option("--depth", help="Low-rank residual blocks per gradient transform.")
    ] = EditorConfig.depth,
    aggregate: Annotated[
        str,
        typer.Option(
            "--aggregate",
            help="How a batch's edits combine: joint (each edit's effect as if alone, solved "
            "together) or sum (MEND's summed updates).",
        ),
    ] = EditorConfig.aggregate,
    ridge: Annotated[
        float,
        typer.Option("--ridge", help="With --aggregate joint: ridge, times the mean squared key length."),
    ] = EditorConfig.ridge,
    instruction_input: Annotated[
        str,
        typer.Option(
            "--instruction-input",
            help="Where the instruction enters: prefix (it prefixes the prompt the editor "
            "differentiates) or condition (the plain prompt's gradient, the instruction's "
            "embedding conditioning the editor).",
        ),
    ] = EditorConfig.instruction_input,
    val_records: Annotated[
        int, typer.Option("--val-records", help="Validation records per task at each validation.")
    ] = TrainConfig.val_records,
    edit_lr: Annotated[
        float, typer.Option("--edit-lr", help="Initial per-layer step size.")
    ] = EditorConfig.edit_lr,
    world_seed: WorldSeedOption = 0,
    world_countries: WorldSizeOption = None,
    world_people: WorldSizeOption = None,
    world_recent: WorldSizeOption = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the checkpoint beside --out.")
    ] = False,
    out: Annotated[Optional[Path], typer.Option("--out", help="Editor artifact to write.")] = None,
    seed: SeedOption = 0,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "float32",
    json_output: JsonOption = False,
    quiet: QuietOption = False,
    sign_key: SignKeyOption = None,
    trust: TrustOption = None,
) -> None:
    """Meta-train one instruction-conditioned editor across editing tasks.

    Example: kvtool edit train-editor --tasks counterfact,recent,convsent --holdout zsre
    """
    use_signing(sign_key, trust)
    from kedit_vfl.edit.editor.store import EDITOR_KIND, editor_extra
    from kedit_vfl.edit.editor.training import train_editor

    out = out or _default_editor()
    config = TrainConfig(
        model=model,
        device=device,
        dtype=dtype,
        data=tuple(str(p) for p in data or ()),
        tasks=_split(tasks),
        holdout=_holdout(holdout, _split(tasks)),
        instructions=not no_instructions,
        instructions_file=str(instructions) if instructions else None,
        steps=steps,
        batch_size=batch_size,
        batch_sizes=_sizes(batch_sizes),
        memory_edits=memory_edits,
        memory_unrelated=memory_unrelated,
        instructed_queries=instructed_queries,
        accumulate=accumulate,
        gradient_checkpointing=gradient_checkpointing,
        lr=lr,
        lr_alpha=lr_alpha,
        c_edit=c_edit,
        c_loc=c_loc,
        ema=ema,
        val_every=val_every,
        val_records=val_records,
        patience=patience,
        seed=seed,
        world=_world(world_seed, world_countries, world_people, world_recent),
        editor=EditorConfig(
            rank=rank,
            depth=depth,
            edit_lr=edit_lr,
            layers=_split(layers),
            n_blocks=n_blocks,
            aggregate=aggregate,
            ridge=ridge,
            instruction_input=instruction_input,
        ),
    )
    reporter = RichReporter(quiet)
    result = train_editor(config, out=out, resume=resume, reporter=reporter)
    if not result.main:
        return  # another rank of a data-parallel run: rank 0 writes and reports
    provenance = make_provenance(
        "edit train-editor",
        config_to_dict(config),
        data=data_fingerprint(config.data) if config.data else None,
        seed=seed,
    )
    extra = editor_extra(
        result.editor,
        result.base,
        result.pools,
        result.base_info,
        tasks=list(config.tasks),
        holdout=config.holdout,
        best=result.best,
        history=result.history,
        memory=result.memory,
    )
    save_artifact(
        Artifact(EDITOR_KIND, result.editor.state_dict(), config_to_dict(config), provenance, extra), out
    )
    best = result.best
    payload = {
        "out": str(out),
        "steps": result.steps,
        "stopped_early": result.stopped_early,
        "seconds": round(result.seconds, 1),
        "best_step": best.get("step"),
        "validation": {k: best.get(k) for k in ("score", *METRICS)},
        "edited_layers": [t.module for t in result.editor.targets],
        "instructions": result.pools is not None,
        "resources": result.resources,
    }
    if json_output:
        emit_json(payload)
        return
    print_kv("editor", {k: v for k, v in payload.items() if k not in ("validation", "resources")})
    print_kv("resources", result.resources)
    if best.get("tasks"):
        print_table(
            f"validation at step {best['step']}: post-edit (pre-edit)",
            ["task", *METRICS, "n_records"],
            _metric_rows({"tasks": best["tasks"], "overall": best}),
        )


@app.command("apply")
def apply_command(
    editor: Annotated[Optional[Path], typer.Option("--editor", help="Editor artifact (edit.editor).")] = None,
    edits: Annotated[
        Optional[list[Path]],
        typer.Option("--edits", help="Edit requests (JSONL or any supported format); repeatable."),
    ] = None,
    model: Annotated[
        Optional[str], typer.Option("--model", help="Base model (default: the editor's own).")
    ] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Folder for the edited model.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out folder.")] = False,
    batch_size: Annotated[
        int,
        typer.Option(
            "--batch-size",
            help="Edits per forward pass (memory and speed only: every gradient is taken on the "
            "unedited model and the editor combines all edits at once).",
        ),
    ] = ApplyConfig.batch_size,
    instruction_index: Annotated[
        int, typer.Option("--instruction-index", help="Which description of the task's pool to use.")
    ] = 0,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "float32",
    json_output: JsonOption = False,
    quiet: QuietOption = False,
    trust: TrustOption = None,
) -> None:
    """Apply edits with a trained editor and save the edited model as a Hugging Face folder.

    Example: kvtool edit apply --edits requests.jsonl --out runs/edit/edited-model
    """
    use_signing(None, trust)
    from kedit_vfl.edit.editor.apply import apply_edits

    config = ApplyConfig(
        edits=tuple(str(p) for p in edits or ()),
        out=str(out or runs_dir() / "edit" / "edited-model"),
        model=model,
        device=device,
        dtype=dtype,
        batch_size=batch_size,
        instruction_index=instruction_index,
        overwrite=overwrite,
    )
    result = apply_edits(_editor_or_default(editor, quiet), config, RichReporter(quiet))
    n = len(result.edits)
    summary = {
        "out": str(result.out),
        "n_edits": n,
        "edit_seconds": round(result.edit_seconds, 4),
        "mean_p_pre": sum(e["p_pre"] for e in result.edits) / n,
        "mean_p_post": sum(e["p_post"] for e in result.edits) / n,
        "acc_post": sum(e["acc_post"] for e in result.edits) / n,
        "held": sum(e["held"] for e in result.edits),
    }
    if json_output:
        emit_json({**summary, "edits": result.edits})
        return
    print_kv("edited model", summary)
    shown = result.edits[:20]
    print_table(
        f"edits (first {len(shown)} of {n}): target probability before and after",
        ["prompt", "target", "p_pre", "p_post", "held"],
        [
            [
                e["prompt"][-50:],
                e["target_new"][:30],
                e["p_pre"],
                e["p_post"],
                "yes" if e["held"] else "no",
            ]
            for e in shown
        ],
    )


@app.command("evaluate")
def evaluate_command(
    editor: Annotated[Optional[Path], typer.Option("--editor", help="Editor artifact (edit.editor).")] = None,
    data: DataOption = None,
    task: Annotated[Optional[str], typer.Option("--task", help="Only this task's records.")] = None,
    model: Annotated[
        Optional[str], typer.Option("--model", help="Base model (default: the editor's own).")
    ] = None,
    instruction_index: Annotated[
        int, typer.Option("--instruction-index", help="Which description of each task's pool to use.")
    ] = 0,
    unseen_instruction: Annotated[
        bool, typer.Option("--unseen-instruction", help="Use each task's held-out description.")
    ] = False,
    queries: Annotated[
        str,
        typer.Option(
            "--queries",
            help="What the edited model is asked: 'plain' (the prompts a user asks after apply), "
            "'instructed' (the prompts it edited with) or 'auto' (as the editor was trained).",
        ),
    ] = EvalConfig.queries,
    no_prefix: Annotated[
        bool,
        typer.Option(
            "--no-prefix",
            help="Ablation: edit without the instruction (no prefix; a conditioned editor gets "
            "a zero instruction embedding).",
        ),
    ] = False,
    sequential: Annotated[
        int, typer.Option("--sequential", help="Apply N edits in a row without rollback (0: one at a time).")
    ] = 0,
    batch: Annotated[
        int,
        typer.Option(
            "--batch",
            help="Apply N edits together, as apply does (combined by the editor; 0: one at a time).",
        ),
    ] = 0,
    limit: Annotated[
        Optional[int], typer.Option("--limit", help="At most this many records per task.")
    ] = None,
    method: Annotated[
        str,
        typer.Option(
            "--method",
            help="Editing methods to compare on the same records, comma-separated: instructedit, memory "
            "(its updates in a routed side memory, for batches and sequences), mend (the editor trained "
            "without instructions), ft-l, ft-m (EasyEdit's fine-tuning baselines).",
        ),
    ] = ",".join(EvalConfig.methods),
    mend_editor: Annotated[
        Optional[Path],
        typer.Option("--mend-editor", help="For --method mend: an editor trained with --no-instructions."),
    ] = None,
    hparams: Annotated[
        Optional[Path],
        typer.Option(
            "--hparams",
            help="JSON object of FT-L/FT-M settings (objective, layers, steps, lr, norm_constraint, "
            "stop_loss) over the method's defaults.",
        ),
    ] = None,
    curve_every: Annotated[
        int,
        typer.Option(
            "--curve-every", help="With --sequential: score all edits so far every this many (0: N/10)."
        ),
    ] = EvalConfig.curve_every,
    plot: Annotated[
        Optional[Path], typer.Option("--plot", help="With --sequential: write the retention curve (PNG).")
    ] = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "float32",
    json_output: JsonOption = False,
    quiet: QuietOption = False,
    trust: TrustOption = None,
) -> None:
    """Reliability, Generalization, Locality and Portability per task, pre and post edit.

    Example: kvtool edit evaluate --json   (the embedded test split, hold-out task included)
    Compare: kvtool edit evaluate --method instructedit,ft-m,ft-l
    """
    use_signing(None, trust)
    from kedit_vfl.edit.evaluation.evaluate import evaluate_editor

    config = EvalConfig(
        model=model,
        device=device,
        dtype=dtype,
        data=tuple(str(p) for p in data or ()),
        task=task,
        instruction_index=instruction_index,
        unseen_instruction=unseen_instruction,
        no_prefix=no_prefix,
        queries=queries,
        sequential=sequential,
        batch=batch,
        limit=limit,
        methods=tuple(m.strip() for m in method.split(",") if m.strip()),
        mend_editor=str(mend_editor) if mend_editor else None,
        hparams=str(hparams) if hparams else None,
        curve_every=curve_every,
        plot=str(plot) if plot else None,
    )
    result = evaluate_editor(_editor_or_default(editor, quiet), config, RichReporter(quiet))
    if json_output:
        emit_json(result)
        return
    protocol = (
        f"sequential {sequential}"
        if sequential
        else f"batches of {batch}"
        if batch
        else "one edit at a time, rolled back"
    )
    for name, figures in result["methods"].items():
        print_table(
            f"{name}: edit quality ({protocol}): post-edit (pre-edit)",
            ["task", *METRICS, "n_records"],
            _metric_rows(figures, result.get("holdout")),
        )
    if sequential:
        print_table(
            f"retention over {sequential} edits in a row (mean over sequences)",
            ["edits", *result["methods"]],
            _curve_rows(result["methods"]),
        )
    if len(result["methods"]) > 1:
        columns = ["method", "reliability", "generalization", "locality", "mean_rgl", "seconds_per_edit"]
        print_table(
            f"methods compared ({protocol}, overall)",
            columns,
            [[row[c] for c in columns] for row in result["comparison"]],
        )


@app.command("build-model")
def build_model_command(
    spec: Annotated[
        str,
        typer.Argument(
            help="random:SHAPE[,key=value...]: a preset (tinyllama-1.1b, llama-2-7b, qwen2-0.5b, gpt2) "
            "or a config.json, with config overrides and seed=N."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Hugging Face model folder to write.")],
    dtype: DtypeOption = "float32",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out folder.")] = False,
    json_output: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Write a model of any transformers architecture with random weights, for tests and
    benchmarks at a real model's size without the hub (the embedded world's tokenizer).

    Example: kvtool edit build-model random:tinyllama-1.1b,num_hidden_layers=4 --out runs/tiny-llama
    """
    import torch

    from kedit_vfl.edit.data.sources import embedded_world
    from kedit_vfl.edit.models.base import load_random_model, save_model_folder
    from kedit_vfl.edit.models.random_weights import parse_random_spec

    parse_random_spec(spec)  # a malformed spec fails before the world is opened
    if out.exists() and not overwrite:
        raise UserError(f"{out}: already exists (pass --overwrite to replace it)")
    reporter = RichReporter(quiet)
    world = embedded_world(WorldOptions(), reporter)
    base = load_random_model(spec, str(world.model_dir), torch.device("cpu"), dtype, reporter=reporter)
    save_model_folder(base, out, overwrite)
    payload = {
        "out": str(out),
        "model_type": base.model.config.model_type,
        "parameters": sum(p.numel() for p in base.model.parameters()),
        "dtype": str(base.dtype).removeprefix("torch."),
        "fingerprint": base.fingerprint(),
    }
    if json_output:
        emit_json(payload)
        return
    print_kv("model", payload)


@app.command("analyze-gradients")
def analyze_gradients_command(
    editor: Annotated[Optional[Path], typer.Option("--editor", help="Editor artifact (edit.editor).")] = None,
    compare: Annotated[
        Optional[Path],
        typer.Option("--compare", help="A second editor for the same base model, shown side by side."),
    ] = None,
    data: DataOption = None,
    tasks: Annotated[
        Optional[str], typer.Option("--tasks", help="Only these tasks (comma-separated).")
    ] = None,
    per_task: Annotated[int, typer.Option("--per-task", help="Records per task.")] = 100,
    sketch_dim: Annotated[
        int,
        typer.Option("--sketch-dim", help="Size of the random projection used when updates are large."),
    ] = 4096,
    exact_limit: Annotated[
        int, typer.Option("--exact-limit", help="Flatten updates exactly up to this many entries.")
    ] = 65536,
    model: Annotated[
        Optional[str], typer.Option("--model", help="Base model (default: the editor's own).")
    ] = None,
    out: Annotated[
        Optional[Path], typer.Option("--out", help="Folder for analysis.json and gradients.png.")
    ] = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "float32",
    seed: SeedOption = 0,
    json_output: JsonOption = False,
    quiet: QuietOption = False,
    trust: TrustOption = None,
) -> None:
    """How the editor's update directions cluster by task: PCA, silhouette, hold-out neighbour.

    Example: kvtool edit analyze-gradients --editor runs/edit/editor.safetensors --compare plain.safetensors
    """
    use_signing(None, trust)
    from kedit_vfl.edit.evaluation.gradients import AnalyzeConfig, analyze_gradients

    config = AnalyzeConfig(
        editor=str(_editor_or_default(editor, quiet)),
        compare=str(compare) if compare else None,
        out=str(out or runs_dir() / "edit" / "analysis"),
        data=tuple(str(p) for p in data or ()),
        tasks=_split(tasks),
        per_task=per_task,
        exact_limit=exact_limit,
        sketch_dim=sketch_dim,
        model=model,
        device=device,
        dtype=dtype,
        seed=seed,
    )
    result = analyze_gradients(config, RichReporter(quiet))
    if json_output:
        emit_json(result)
        return
    rows = []
    for panel in result["panels"]:
        holdout = panel.get("holdout") or {}
        rows.append(
            [
                panel["name"],
                panel["silhouette_2d"],
                panel["silhouette_reduced"],
                panel["n_components_90"],
                panel["cosine"]["ratio"],
                f"{holdout['task']} -> {holdout['nearest']}" if holdout else "-",
            ]
        )
    print_table(
        f"task separation of editor updates ({result['mode']}; {result['representation']['kind']})",
        [
            "panel",
            "silhouette 2-D",
            "silhouette 90%",
            "PCs for 90%",
            "between/within cos",
            "hold-out nearest",
        ],
        rows,
    )
    print_kv("written", result["files"])
