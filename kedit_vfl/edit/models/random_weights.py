"""Base models with random weights, built from a transformers config: no hub, no download.

Memory and speed at a real model's size depend on its shape, not on what its weights
learned, so a model with the shape of TinyLlama or LLaMA-2-7B and random weights is what
tests and benchmarks need on machines without the hub. A spec names a shape and optional
config overrides::

    random:tinyllama-1.1b
    random:llama-2-7b,num_hidden_layers=4
    random:path/to/config.json,hidden_size=512,seed=1

The shape is a preset below (the public configs' sizes, copied as numbers) or a
``config.json`` (or a folder holding one) of any architecture transformers knows. Values
are JSON (``true``, ``1e-5``, ``"silu"``) or bare strings. ``seed`` (default 0) seeds the
weights, which are drawn on the CPU whatever the device, so one spec is one model and
one fingerprint everywhere. The tokenizer is the embedded world's (its vocabulary fits
any preset's embedding), so the embedded records train and evaluate an editor for it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kedit_vfl.errors import UserError

RANDOM_PREFIX = "random:"

PRESETS: dict[str, dict[str, Any]] = {
    "tinyllama-1.1b": {
        "model_type": "llama",
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 22,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "vocab_size": 32000,
    },
    "llama-2-7b": {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "vocab_size": 32000,
    },
    "qwen2-0.5b": {
        "model_type": "qwen2",
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "vocab_size": 151936,
    },
    "gpt2": {"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12, "n_positions": 1024},
}

_MAX_OVERRIDES = 64


@dataclass(frozen=True)
class RandomSpec:
    """A parsed ``random:`` model spec."""

    shape: str
    overrides: tuple[tuple[str, Any], ...] = ()
    seed: int = 0

    @property
    def text(self) -> str:
        parts = [self.shape, *(f"{k}={json.dumps(v)}" for k, v in self.overrides)]
        return RANDOM_PREFIX + ",".join(parts + ([f"seed={self.seed}"] if self.seed else []))


def is_random_spec(source: str) -> bool:
    return source.startswith(RANDOM_PREFIX)


def parse_random_spec(source: str) -> RandomSpec:
    """``random:SHAPE[,key=value...]`` -> RandomSpec; a clear error for anything else."""
    if not is_random_spec(source):
        raise UserError(f"--model {source[:80]}: a random-weights model starts with '{RANDOM_PREFIX}'")
    shape, *items = source[len(RANDOM_PREFIX) :].split(",")
    if not shape:
        raise UserError(f"--model {source[:80]}: name a shape ({', '.join(PRESETS)}) or a config.json")
    if len(items) > _MAX_OVERRIDES:
        raise UserError(f"--model: at most {_MAX_OVERRIDES} config overrides")
    overrides: dict[str, Any] = {}
    seed = 0
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise UserError(f"--model {source[:80]}: '{item[:40]}' is not key=value")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        if key == "seed":
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise UserError(f"--model: seed={raw[:20]} must be a non-negative integer")
            seed = value
        else:
            overrides[key] = value
    return RandomSpec(shape, tuple(overrides.items()), seed)


def _shape_dict(shape: str) -> dict[str, Any]:
    if shape in PRESETS:
        return dict(PRESETS[shape])
    path = Path(shape)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise UserError(f"random:{shape[:80]}: not a preset ({', '.join(PRESETS)}) and no such config.json")
    if path.stat().st_size > 1_000_000:
        raise UserError(f"{path}: a config.json of over 1 MB is not a model config")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: not a readable JSON config ({type(exc).__name__})") from None
    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
        raise UserError(f"{path}: a model config needs a 'model_type'")
    return data


def model_config(spec: RandomSpec, tokenizer: Any) -> Any:
    """The transformers config of ``spec``, its special tokens the tokenizer's."""
    from transformers import AutoConfig

    values = {**_shape_dict(spec.shape), **dict(spec.overrides)}
    model_type = values.pop("model_type")
    for key in ("architectures", "transformers_version", "torch_dtype", "dtype", "_name_or_path"):
        values.pop(key, None)
    try:
        defaults = AutoConfig.for_model(model_type)
        config = AutoConfig.for_model(model_type, **values)
        # A misspelt field is kept as a stray attribute that nothing reads; a legacy one
        # (LLaMA's rope_theta) is folded into its new field and leaves none.
        unknown = [k for k, _ in spec.overrides if not hasattr(defaults, k) and hasattr(config, k)]
        if unknown:
            raise UserError(f"{spec.text[:80]}: {model_type} configs have no field '{unknown[0]}'")
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - every value here is the user's; transformers' errors vary
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise UserError(f"{spec.text[:80]}: not a transformers config ({first})") from None
    vocab = getattr(config, "vocab_size", None)
    if isinstance(vocab, int) and vocab < len(tokenizer):
        raise UserError(
            f"{spec.text[:80]}: vocab_size {vocab} is smaller than the tokenizer's {len(tokenizer)} tokens"
        )
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.bos_token_id = (
        tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    )
    return config


def build_random_model(spec: RandomSpec, tokenizer: Any, dtype: torch.dtype) -> nn.Module:
    """A causal LM of ``spec``'s shape with seeded random weights, on the CPU, in ``dtype``."""
    from transformers import AutoModelForCausalLM

    config = model_config(spec, tokenizer)
    state = torch.random.get_rng_state()
    torch.manual_seed(spec.seed)
    try:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except (ValueError, TypeError, KeyError, AssertionError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise UserError(f"{spec.text[:80]}: transformers cannot build a causal LM of it ({first})") from None
    finally:
        torch.random.set_rng_state(state)
    return model
