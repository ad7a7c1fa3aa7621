"""Base language models: loading, edited-layer resolution and fingerprints, in one place.

Every model quirk the editor cares about is resolved here: which linear weights are
edited per architecture, and whether a weight is stored ``(out, in)`` (``nn.Linear``) or
transposed ``(in, out)`` (GPT-2's ``Conv1D``). The rest of the package only sees
:class:`EditTarget` records.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kedit_vfl.errors import UserError
from kedit_vfl.progress import SILENT, Reporter

ALL_WEIGHTS, EDITED_LAYERS = "all-weights", "edited-layers"  # what a base model fingerprint covers

# transformers' own dtype names; "auto" is the checkpoint's dtype (float32 when it has none).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
AUTO_DTYPE = "auto"

# Default edited modules per architecture: the MLP projections of the last blocks.
# ``{i}`` is the block index; the blocks' container path finds how many there are.
_ARCH_LAYERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "gpt2": ("transformer.h", ("mlp.c_fc", "mlp.c_proj")),
    "llama": ("model.layers", ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")),
    "mistral": ("model.layers", ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")),
    "qwen2": ("model.layers", ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")),
    "qwen3": ("model.layers", ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")),
    "gpt_neox": ("gpt_neox.layers", ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h")),
    "opt": ("model.decoder.layers", ("fc1", "fc2")),
}


@dataclass(frozen=True)
class EditTarget:
    """One edited weight: its module name and how to turn ``delta x^T`` into its layout."""

    module: str
    d_in: int
    d_out: int
    transposed: bool  # True for Conv1D: the weight is stored (d_in, d_out)

    @property
    def param(self) -> str:
        return f"{self.module}.weight"

    @property
    def shape_key(self) -> str:
        """Layers with the same key share one gradient-transform network."""
        return f"{self.d_in}x{self.d_out}"

    def to_dict(self) -> dict[str, Any]:
        return {"module": self.module, "d_in": self.d_in, "d_out": self.d_out, "transposed": self.transposed}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EditTarget:
        return cls(str(data["module"]), int(data["d_in"]), int(data["d_out"]), bool(data["transposed"]))


@dataclass
class BaseModel:
    """A loaded causal LM with its tokenizer, where it came from and its edited layers."""

    model: nn.Module
    tokenizer: Any
    source: str
    targets: list[EditTarget]
    device: torch.device
    dtype: torch.dtype

    @property
    def max_length(self) -> int:
        return context_length(self.model)

    def fingerprint(self, scope: str = ALL_WEIGHTS) -> str:
        return fingerprint(self.model, self.targets, scope)


def _target_for(name: str, module: nn.Module) -> EditTarget | None:
    """An EditTarget for a Linear or Conv1D module; None for anything else."""
    if isinstance(module, nn.Linear):
        return EditTarget(name, module.in_features, module.out_features, transposed=False)
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        d_in, d_out = module.weight.shape  # Conv1D stores (d_in, d_out)
        return EditTarget(name, int(d_in), int(d_out), transposed=True)
    return None


def _block_count(model: nn.Module, container: str) -> int | None:
    try:
        blocks = model.get_submodule(container)
    except AttributeError:
        return None
    return len(blocks) if isinstance(blocks, nn.ModuleList) else None


def _default_names(model: nn.Module, n_blocks: int) -> list[str]:
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    if model_type in _ARCH_LAYERS:
        container, suffixes = _ARCH_LAYERS[model_type]
        count = _block_count(model, container)
        if count:
            return [f"{container}.{i}.{s}" for i in range(max(0, count - n_blocks), count) for s in suffixes]
    return _discover_mlp_linears(model, n_blocks)


def _discover_mlp_linears(model: nn.Module, n_blocks: int) -> list[str]:
    """Unknown architecture: the Linear/Conv1D modules under an ``mlp``/``ffn`` of the last blocks."""
    found: dict[str, list[str]] = {}
    pattern = re.compile(r"^(.*\.(\d+))\.(?:.*\.)?(?:mlp|ffn|feed_forward|fc)\b")
    for name, module in model.named_modules():
        match = pattern.match(name)
        if match and _target_for(name, module) is not None:
            found.setdefault(match.group(1), []).append(name)
    blocks = sorted(found, key=lambda b: int(b.rsplit(".", 1)[1]))
    return [n for block in blocks[-n_blocks:] for n in found[block]]


def _matches(name: str, pattern: str) -> bool:
    """PEFT-style matching: exact name, dotted suffix, or a full regular expression."""
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def resolve_targets(model: nn.Module, layers: Sequence[str] = (), n_blocks: int = 3) -> list[EditTarget]:
    """The edited weights: ``layers`` (names, suffixes or regexes) or the architecture's default."""
    modules = dict(model.named_modules())
    if layers:
        names = [n for n in modules if any(_matches(n, p) for p in layers)]
        targets = [t for n in names if (t := _target_for(n, modules[n])) is not None]
        if not targets:
            raise UserError(
                f"--layers {','.join(layers)}: no Linear or Conv1D module of "
                f"{type(model).__name__} matches (e.g. {', '.join(_example_names(modules))})"
            )
        return targets
    targets = [t for n in _default_names(model, n_blocks) if (t := _target_for(n, modules[n])) is not None]
    if not targets:
        raise UserError(
            f"cannot find the MLP layers of {type(model).__name__} automatically; name them with --layers"
        )
    return targets


def _example_names(modules: dict[str, nn.Module]) -> list[str]:
    return [n for n, m in modules.items() if _target_for(n, m) is not None][-4:]


def context_length(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    for key in ("n_positions", "max_position_embeddings", "max_seq_len", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


_VOLATILE_CONFIG = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures"}


def fingerprint(model: nn.Module, targets: Sequence[EditTarget], scope: str = ALL_WEIGHTS) -> str:
    """sha256 over the model config and its weights (rounded to bfloat16).

    ``all-weights`` covers every parameter, so a folder whose other layers were swapped is
    not taken for the base model an editor was trained on; ``edited-layers`` (what editors
    written before the scope was recorded used) covers only the edited ones. Rounding to
    bfloat16 makes a model loaded as float32 and the same model loaded as bfloat16 share
    one fingerprint, so an editor trained on CPU applies on a GPU.
    """
    if scope not in (ALL_WEIGHTS, EDITED_LAYERS):
        raise UserError(f"unknown base model fingerprint scope {scope[:40]!r}; upgrade kvtool")
    digest = hashlib.sha256()
    config = model.config.to_dict() if hasattr(model, "config") else {}
    config = {k: v for k, v in config.items() if k not in _VOLATILE_CONFIG}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    params = dict(model.named_parameters())
    names = [t.param for t in targets] if scope == EDITED_LAYERS else sorted(params)
    for name in names:
        weight = params[name].detach().to("cpu", torch.bfloat16).contiguous()
        digest.update(name.encode() + b"\0")
        digest.update(weight.view(torch.uint8).numpy())
    return digest.hexdigest()


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """No transformers progress bars (library code never prints; the Reporter shows progress)."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def load_base_model(
    source: str,
    device: torch.device,
    dtype: str = "float32",
    layers: Sequence[str] = (),
    n_blocks: int = 3,
    reporter: Reporter = SILENT,
) -> BaseModel:
    """Load a Hugging Face causal LM (name or local folder), frozen, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_dtype(dtype)
    local = Path(source)
    if not local.exists() and (source.startswith((".", "/", "~")) or source.count("/") > 1):
        raise UserError(f"--model {source}: no such folder")
    if local.exists() and not (local / "config.json").is_file():
        raise UserError(f"--model {source}: not a Hugging Face model folder (no config.json)")
    reporter.log(f"loading base model {source}")
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(source)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES.get(dtype, dtype))
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"--model {source}: cannot load a causal language model ({first})") from exc
    return prepare_base(model, tokenizer, source, device, layers, n_blocks)


def load_random_model(
    spec: str,
    tokenizer_source: str,
    device: torch.device,
    dtype: str = "float32",
    layers: Sequence[str] = (),
    n_blocks: int = 3,
    reporter: Reporter = SILENT,
) -> BaseModel:
    """A ``random:`` spec's model (models.random_weights) with the tokenizer of ``tokenizer_source``."""
    from transformers import AutoTokenizer

    from kedit_vfl.edit.models.random_weights import build_random_model, parse_random_spec

    check_dtype(dtype)
    parsed = parse_random_spec(spec)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    reporter.log(f"building {spec} with random weights")
    model = build_random_model(parsed, tokenizer, DTYPES.get(dtype, torch.float32))
    return prepare_base(model, tokenizer, spec, device, layers, n_blocks)


def save_model_folder(
    base: BaseModel, out: Path, overwrite: bool, files: dict[str, str] | None = None
) -> None:
    """A Hugging Face folder (weights, tokenizer, ``files``), written beside ``out`` then
    renamed: never a half-written model."""
    import shutil
    import tempfile

    if out.exists() and not overwrite:
        raise UserError(f"{out}: already exists (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        with quiet_transformers():
            base.model.save_pretrained(tmp, safe_serialization=True)
            base.tokenizer.save_pretrained(tmp)
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)
        if out.exists() and overwrite:
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES and dtype != AUTO_DTYPE:
        raise UserError(f"--dtype {dtype}: expected one of {', '.join([*DTYPES, AUTO_DTYPE])}")


def prepare_base(
    model: nn.Module, tokenizer: Any, source: str, device: torch.device, layers: Sequence[str], n_blocks: int
) -> BaseModel:
    """Frozen, in eval mode, on ``device``, its tokenizer padding on the right."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "right"
    model.to(device).eval()
    model.requires_grad_(False)
    targets = resolve_targets(model, layers, n_blocks)
    return BaseModel(model, tokenizer, source, targets, device, next(model.parameters()).dtype)
