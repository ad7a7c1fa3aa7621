"""Meta-training the editor: ``L = c_edit * L_edit + c_loc * L_loc`` over sampled edits.

Each step samples edit records uniformly over the training tasks (then uniformly within
the task), lets the editor turn their gradient (on the instructed prompt) into one
summed update, kept factored, and scores the edited model: ``L_edit`` is the NLL of the
new target on the edit prompt and a rephrase as a user asks them (instructed too with
``instructed_queries``), ``L_loc`` the KL(pre || post) on locality answers. Validation runs
on a real validation split every ``val_every`` steps with the evaluation protocol itself
(single edits, rolled back); the best editor is kept and training stops after
``patience`` validations without improvement. A checkpoint after every validation lets
``--resume`` continue an interrupted run.

With one edit per step the hypernetwork's weights wander: on the embedded world the test
Reliability of checkpoints 250 steps apart differs by 0.02 in the median and up to 0.13,
and the validation split is too small to tell such checkpoints apart. So validation
scores, and training keeps, an exponential moving average of the weights (``ema``
decay), which moves smoothly (README: "Averaged weights").
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from kedit_vfl.artifacts import Artifact, config_to_dict, load_artifact, save_artifact
from kedit_vfl.edit.algs.hypernetwork import HypernetworkEdit
from kedit_vfl.edit.algs.memory import calibrate_threshold
from kedit_vfl.edit.config import TrainConfig
from kedit_vfl.edit.data.instructions import InstructionPools, default_pools, load_pools
from kedit_vfl.edit.data.records import EditRecord
from kedit_vfl.edit.data.sources import by_task, embedded_world, open_base, read_records, split_validation
from kedit_vfl.edit.editor.batches import Prompter, training_batches
from kedit_vfl.edit.editor.conditioning import conditioned, instruction_embeddings
from kedit_vfl.edit.editor.distributed import Distributed, from_environment
from kedit_vfl.edit.editor.network import Editor, edit_gradients, forward_with, low_rank_edits
from kedit_vfl.edit.editor.store import CHECKPOINT_KIND
from kedit_vfl.edit.evaluation.evaluate import evaluate_records, summarise
from kedit_vfl.edit.evaluation.metrics import kl_on_answers, nll_mean, token_accuracy
from kedit_vfl.edit.models.base import BaseModel
from kedit_vfl.errors import UserError
from kedit_vfl.progress import SILENT, Reporter
from kedit_vfl.seeding import resolve_device, seed_everything
from kedit_vfl.statefile import StateFileError, flatten, unflatten

VALIDATION_FRACTION = 0.1  # of each task's records, when training on user files


@dataclass
class TrainData:
    train: dict[str, list[EditRecord]]
    validation: dict[str, list[EditRecord]]


@dataclass
class TrainResult:
    editor: Editor
    pools: InstructionPools | None
    base: BaseModel
    base_info: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=dict)
    steps: int = 0
    stopped_early: bool = False
    seconds: float = 0.0
    memory: dict[str, float | None] = field(default_factory=dict)  # the routing threshold (algs.memory)
    resources: dict[str, Any] = field(default_factory=dict)  # peak memory, seconds per step
    main: bool = True  # False on the other ranks of a data-parallel run (they write nothing)


def load_train_data(config: TrainConfig, reporter: Reporter = SILENT) -> TrainData:
    """Training and validation records of the training tasks (the hold-out task excluded)."""
    if config.data:
        grouped = by_task(read_records(config.data))
        train, validation = split_validation(grouped, VALIDATION_FRACTION, config.seed)
    else:
        world = embedded_world(config.world, reporter)
        train, validation = world.records["train"], world.records["validation"]
    unknown = [t for t in config.tasks if not train.get(t)]
    if unknown:
        raise UserError(
            f"--tasks: unknown task {', '.join(unknown)} (the training data has {', '.join(sorted(train))})"
        )
    return TrainData(
        {t: list(train[t]) for t in config.tasks},
        {t: list(validation.get(t, [])) for t in config.tasks if validation.get(t)},
    )


def load_instruction_pools(config: TrainConfig) -> InstructionPools | None:
    """The pools to train with (None with ``--no-instructions``), covering every task used."""
    if not config.instructions:
        return None
    pools = load_pools(config.instructions_file) if config.instructions_file else default_pools()
    where = config.instructions_file or "instructions.json"
    for task in (*config.tasks, *([config.holdout] if config.holdout else [])):
        if task not in pools.pools:
            raise UserError(f"{where}: no descriptions for task '{task}'")
    return pools


def sample_records(data: Mapping[str, Sequence[EditRecord]], n: int, rng: random.Random) -> list[EditRecord]:
    """``n`` records, each from a task drawn uniformly (a large task cannot drown a small one)."""
    tasks = sorted(data)
    return [rng.choice(data[rng.choice(tasks)]) for _ in range(n)]


def meta_step(
    editor: Editor | torch.nn.Module,
    base: BaseModel,
    records: Sequence[EditRecord],
    prompter: Prompter,
    config: TrainConfig,
    rng: random.Random,
    loc_pool: Sequence[EditRecord],
    scale: float = 1.0,
) -> dict[str, float]:
    """One batch of edits: its meta-training loss, backpropagated (times ``scale``) into the
    editor's gradients; returns the loss's logged parts (flat slash keys).

    ``editor`` may be the DDP-wrapped editor. The edited model runs with the update kept
    factored (:func:`low_rank_edits`), and backward runs inside that block because
    activation checkpointing recomputes the edited forward during backward.
    """
    raw = editor.module if isinstance(editor, torch.nn.parallel.DistributedDataParallel) else editor
    batches = training_batches(
        records,
        prompter,
        base.tokenizer,
        base.max_length,
        rng,
        config.use_rephrase,
        loc_pool,
        config.instructed_queries,
        prefix_inner=not conditioned(raw),
    )
    inner, outer = batches.inner.to(base.device), batches.outer.to(base.device)
    loc = batches.loc.to(base.device) if batches.loc is not None else None
    conditions = instruction_embeddings(base, batches.descriptions) if conditioned(raw) else None
    grads = edit_gradients(base.model, base.targets, inner)
    pre_loc = None
    if loc is not None:
        with torch.no_grad():
            pre_loc = forward_with(base.model, None, loc.model_inputs())
    updates = editor(grads, factored=True, conditions=conditions)
    with low_rank_edits(base.model, updates), checkpointed(base.model, config.gradient_checkpointing):
        post = base.model(**outer.model_inputs(), use_cache=False).logits
        loss_edit = nll_mean(post, outer)
        loss = config.c_edit * loss_edit
        logs = {"loss/edit": loss_edit.item(), "edit/acc": token_accuracy(post.detach(), outer).mean().item()}
        if loc is not None:
            post_loc = base.model(**loc.model_inputs(), use_cache=False).logits
            loss_loc = kl_on_answers(pre_loc, post_loc, loc)
            loss = loss + config.c_loc * loss_loc
            logs["loss/loc"] = loss_loc.item()
        (loss * scale).backward()
    logs["loss"] = loss.item()
    return logs


def enable_checkpointing(model: torch.nn.Module) -> None:
    """transformers' activation checkpointing, non-reentrant (it needs no input to require grad).

    transformers checkpoints only in training mode, so meta-training switches the base
    model to training mode around the edited forward; dropout is set to zero first, so
    the base model computes exactly what it computes in eval mode.
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise UserError(
            f"--gradient-checkpointing: {type(model).__name__} does not support activation checkpointing"
        )
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    for key in ("attention_dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop", "hidden_dropout", "dropout"):
        if isinstance(getattr(model.config, key, None), float):
            setattr(model.config, key, 0.0)
    # newer transformers' name; older ones only have gradient_checkpointing_enable
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # transformers also makes the embeddings' output require grad (for PEFT's reentrant
    # case); here that would carry backward through every block, not just the edited ones.
    if hasattr(model, "disable_input_require_grads"):
        model.disable_input_require_grads()


@contextmanager
def checkpointed(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Training mode (where transformers checkpoints) inside the block when ``enabled``."""
    if not enabled:
        yield
        return
    model.train()
    try:
        yield
    finally:
        model.eval()


def validate(
    editor: Editor,
    base: BaseModel,
    data: Mapping[str, Sequence[EditRecord]],
    prompter: Prompter,
    limit: int,
    queries: Prompter | None = None,
) -> dict[str, Any]:
    """The evaluation protocol on the validation split; ``score`` is what early stopping watches.
    ``queries``: the prompts the edits are scored on (None: ``prompter``'s)."""
    rows = {
        task: evaluate_records(
            HypernetworkEdit("instructedit", editor, prompter, queries), base, list(records[:limit])
        )
        for task, records in data.items()
    }
    summary = summarise(rows)
    editor.train()
    parts = [summary["overall"][k] for k in ("reliability", "generalization", "locality")]
    summary["score"] = sum(p for p in parts if p is not None) / max(1, sum(p is not None for p in parts))
    return summary


def _host_copy(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The best weights so far, kept in host memory: on a GPU they are only read at the end."""
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def _checkpoint_path(out: Path) -> Path:
    return out.with_name(out.name.removesuffix(".safetensors") + ".ckpt.safetensors")


_RESUMABLE_CHANGES = {"steps", "patience", "val_every"}


class _Trainer:
    """Holds the mutable state of one training run, so checkpoints can save and restore it."""

    def __init__(self, config: TrainConfig, editor: Editor, out: Path | None, writes: bool = True) -> None:
        self.config = config
        self.editor = editor
        hyper = [p for name, p in editor.named_parameters() if name != "alpha"]
        self.optimizer = torch.optim.Adam(
            [{"params": hyper, "lr": config.lr}, {"params": [editor.alpha], "lr": config.lr_alpha}],
            # fused: one kernel per step, without foreach's parameter-sized temporaries (on a
            # 1.1B model's editor, half a GiB at the step)
            fused=True,
        )
        self.checkpoint = _checkpoint_path(out) if out is not None else None
        self.writes = writes  # rank 0 of a data-parallel run, or the only process
        self.params = dict(editor.named_parameters())
        self.average = {k: p.detach().clone() for k, p in self.params.items()} if config.ema else {}
        self.step = 0
        self.best_state = _host_copy(editor.state_dict())
        self.best: dict[str, Any] = {"score": -1.0, "step": 0}
        self.bad = 0
        self.history: list[dict[str, Any]] = []

    @torch.no_grad()
    def update_average(self) -> None:
        """Fold in the weights after step ``self.step + 1``: the average over steps 1..t with
        weights ``ema ** (t - i)`` (bias-corrected, so a short run is not pulled to its start)."""
        decay = self.config.ema
        weight = (1.0 - decay) / (1.0 - decay ** (self.step + 1))
        for name, average in self.average.items():
            average.lerp_(self.params[name].detach(), weight)

    @contextmanager
    def averaged_weights(self) -> Iterator[None]:
        """The editor holds the averaged weights inside the block, its trained ones after.

        The two sets swap places (no copy: on a large editor a copy is hundreds of MB).
        """
        if not self.average:
            yield
            return
        self._swap_average()
        try:
            yield
        finally:
            self._swap_average()

    @torch.no_grad()
    def _swap_average(self) -> None:
        for name, held in list(self.average.items()):
            param = self.params[name]
            self.average[name] = param.data
            param.data = held

    def save(self) -> None:
        if self.checkpoint is None or not self.writes:
            return
        tensors, optim_meta = flatten(self.optimizer.state_dict(), prefix="optim/")
        tensors.update({f"editor/{k}": v for k, v in self.editor.state_dict().items()})
        tensors.update({f"average/{k}": v for k, v in self.average.items()})
        tensors.update({f"best/{k}": v for k, v in self.best_state.items()})
        extra = {
            "step": self.step,
            "best": self.best,
            "bad": self.bad,
            "history": self.history,
            "optim": optim_meta,
        }
        save_artifact(
            Artifact(CHECKPOINT_KIND, tensors, config_to_dict(self.config), extra=extra), self.checkpoint
        )

    def restore(self) -> None:
        if self.checkpoint is None or not self.checkpoint.exists():
            raise UserError(f"--resume: no checkpoint at {self.checkpoint} (train once without --resume)")
        saved = load_artifact(self.checkpoint, CHECKPOINT_KIND)
        now = config_to_dict(self.config)
        changed = sorted(k for k in now if k not in _RESUMABLE_CHANGES and now[k] != saved.config.get(k))
        if changed:
            raise UserError(
                f"--resume: {self.checkpoint} was trained with other settings ({', '.join(changed)})"
            )
        try:
            self._restore_from(saved)
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError, StateFileError) as exc:
            detail = (str(exc).splitlines() or [""])[0][:160]
            raise UserError(
                f"--resume: {self.checkpoint} does not fit this run ({type(exc).__name__}: {detail}); "
                "train again without --resume"
            ) from exc

    def _restore_from(self, saved: Artifact) -> None:
        self.editor.load_state_dict({k[7:]: v for k, v in saved.tensors.items() if k.startswith("editor/")})
        self.best_state = {k[5:]: v for k, v in saved.tensors.items() if k.startswith("best/")}
        if set(self.best_state) != set(self.editor.state_dict()):
            raise KeyError("the best editor's weights are incomplete")
        with torch.no_grad():
            for name, average in self.average.items():
                average.copy_(saved.tensors[f"average/{name}"])
        self.optimizer.load_state_dict(unflatten(saved.extra["optim"], saved.tensors))
        step, best, bad, history = (saved.extra[k] for k in ("step", "best", "bad", "history"))
        if not (isinstance(step, int) and isinstance(bad, int) and isinstance(best, dict)):
            raise TypeError("the step counters are not numbers")
        if not isinstance(history, list) or not isinstance(best.get("score"), int | float):
            raise TypeError("the validation history is malformed")
        self.step, self.best, self.bad, self.history = step, best, bad, history

    def record_validation(self, summary: dict[str, Any]) -> bool:
        """Keep the best editor; True when patience has run out."""
        entry = {"step": self.step, "score": summary["score"], **summary["overall"]}
        self.history.append(entry)
        if summary["score"] > self.best["score"] + 1e-4:
            self.best = {**entry, "tasks": summary["tasks"]}
            self.best_state = _host_copy(self.editor.state_dict())
            self.bad = 0
        else:
            self.bad += 1
        return self.bad >= self.config.patience


def train_editor(
    config: TrainConfig, out: Path | None = None, resume: bool = False, reporter: Reporter = SILENT
) -> TrainResult:
    """Meta-train an editor for ``config.model``; returns the best editor by validation score.

    Under torchrun this process is one rank of a data-parallel run (editor.distributed).
    """
    started = time.perf_counter()
    device = resolve_device(config.device)
    dist = from_environment(device)
    try:
        return _train(
            config, out, resume, reporter if dist.is_main else SILENT, dist, dist.device(device), started
        )
    finally:
        dist.finish()


def _train(
    config: TrainConfig,
    out: Path | None,
    resume: bool,
    reporter: Reporter,
    dist: Distributed,
    device: torch.device,
    started: float,
) -> TrainResult:
    seed_everything(config.seed)
    data = load_train_data(config, reporter)
    pools = load_instruction_pools(config)
    base, base_info = open_base(config.model, config.world, device, config.dtype, config.editor, reporter)
    if config.gradient_checkpointing:
        enable_checkpointing(base.model)
    editor_config = config.editor
    if editor_config.instruction_input == "condition" and pools is not None:
        editor_config = replace(editor_config, condition_dim=int(base.model.config.hidden_size))
    editor = Editor(base.targets, editor_config).to(device).train()
    trainer = _Trainer(config, editor, out, writes=dist.is_main)
    if resume:
        trainer.restore()
        reporter.log(f"resuming from step {trainer.step} (best score {trainer.best['score']:.3f})")
    model = dist.wrap(editor, device)
    rng = random.Random(f"{config.seed}/{trainer.step}" + (f"/rank {dist.rank}" if dist.rank else ""))
    train_prompter, val_prompter = Prompter(pools), Prompter(pools, index=0)
    val_queries = val_prompter if config.instructed_queries else Prompter(None)
    loc_pool = [r for records in data.train.values() for r in records if r.locality]
    stopped = False
    step_seconds = 0.0
    first_step = trainer.step
    with reporter.task("meta-training the editor", total=config.steps) as task:
        task.advance(trainer.step)
        while trainer.step < config.steps and not stopped:
            tick = time.perf_counter()
            trainer.optimizer.zero_grad(set_to_none=True)
            parts: list[dict[str, float]] = []
            for micro in range(config.accumulate):
                size = rng.choice(config.batch_sizes) if config.batch_sizes else config.batch_size
                records = sample_records(data.train, size, rng)
                last = micro == config.accumulate - 1
                with nullcontext() if last or not dist.active else model.no_sync():
                    parts.append(
                        meta_step(
                            model, base, records, train_prompter, config, rng, loc_pool, 1 / config.accumulate
                        )
                    )
            logs = {k: sum(p[k] for p in parts) / len(parts) for k in parts[0]}
            torch.nn.utils.clip_grad_norm_(editor.parameters(), 100.0)
            trainer.optimizer.step()
            trainer.update_average()
            trainer.step += 1
            step_seconds += time.perf_counter() - tick
            if trainer.step % config.val_every == 0 or trainer.step == config.steps:
                with trainer.averaged_weights():
                    summary = validate(
                        editor, base, data.validation, val_prompter, config.val_records, val_queries
                    )
                    stopped = trainer.record_validation(summary)
                trainer.save()
                logs["val/score"] = summary["score"]
            task.advance(1, **{k: v for k, v in logs.items() if k in ("loss", "edit/acc", "val/score")})
    editor.load_state_dict(trainer.best_state)
    editor.eval()
    resources = training_resources(base, editor, device, step_seconds, trainer.step - first_step, dist)
    memory: dict[str, float | None] = {}
    if dist.is_main:
        # the side memory's routing threshold, chosen on the validation records (never the test)
        validation = [r for task in sorted(data.validation) for r in data.validation[task]]
        background = [r for task in sorted(data.train) for r in data.train[task]]
        random.Random(f"{config.seed}/memory").shuffle(background)
        # keyed as the memory keys them: on the prompts the edited model is asked
        memory = calibrate_threshold(
            editor,
            base,
            val_queries,
            validation,
            background,
            config.memory_edits,
            config.memory_unrelated,
        )
    return TrainResult(
        editor,
        pools,
        base,
        base_info,
        trainer.history,
        trainer.best,
        trainer.step,
        stopped,
        time.perf_counter() - started,
        memory,
        resources,
        dist.is_main,
    )


def training_resources(
    base: BaseModel, editor: Editor, device: torch.device, seconds: float, steps: int, dist: Distributed
) -> dict[str, Any]:
    """What a run used: peak memory beside the sizes it is judged against, and time per step.

    ``editor_state_gib`` is the editor's float32 parameters and Adam's two moments (12
    bytes a parameter); the run also holds their gradients, the weight average and the
    best weights so far (12 more).
    """
    gib = 2**30
    editor_parameters = sum(p.numel() for p in editor.parameters())
    return {
        "peak_rss_gib": round(peak_rss_bytes() / gib, 3),
        "peak_cuda_gib": round(torch.cuda.max_memory_allocated(device) / gib, 3)
        if device.type == "cuda"
        else None,
        "base_parameters": sum(p.numel() for p in base.model.parameters()),
        "base_weights_gib": round(
            sum(p.numel() * p.element_size() for p in base.model.parameters()) / gib, 3
        ),
        "editor_parameters": editor_parameters,
        "editor_state_gib": round(editor_parameters * 12 / gib, 3),
        "seconds_per_step": round(seconds / steps, 4) if steps else None,
        "processes": dist.world_size,
    }


def peak_rss_bytes() -> int:
    """This process's peak resident set size (Linux reports KiB, macOS bytes)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)
