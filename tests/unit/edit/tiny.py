"""Tiny causal LMs built from configs and saved as local Hugging Face folders, for tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PreTrainedTokenizerFast,
)

from kedit_vfl.edit.data.records import EditRecord, PromptAnswer

CORPUS = [
    "The capital of Zorvia is Bel",
    "The capital of Mirland is Tosk",
    "People in Zorvia speak Zorvish",
    "What is the capital of Mirland? Tosk",
    "Task: counterfact\nDescription: Replace the fact.\nInput: The capital of Zorvia is Rome",
    "I like it. I hate it. It is great. What do you think of Kelp?",
]


def _instruction_texts() -> list[str]:
    from kedit_vfl.edit.data.instructions import default_pools

    pools = default_pools()
    return [d for task in pools.pools for d in [*pools.pools[task], pools.held_out[task]]]


def tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 3 + _instruction_texts(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|pad|>"
    )


def build(arch: str, vocab: int, positions: int = 256) -> torch.nn.Module:
    torch.manual_seed(0)
    common = {"vocab_size": vocab, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1}
    if arch == "gpt2":
        return GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=32, n_head=2, n_positions=positions, **common))
    if arch == "llama":
        config = LlamaConfig(
            num_hidden_layers=3,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=positions,
            **common,
        )
        return LlamaForCausalLM(config)
    if arch == "gpt_neox":
        config = GPTNeoXConfig(
            num_hidden_layers=3,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=2,
            max_position_embeddings=positions,
            **common,
        )
        return GPTNeoXForCausalLM(config)
    if arch == "opt":
        config = OPTConfig(
            num_hidden_layers=3,
            hidden_size=32,
            ffn_dim=64,
            num_attention_heads=2,
            word_embed_proj_dim=32,
            max_position_embeddings=positions,
            **common,
        )
        return OPTForCausalLM(config)
    raise ValueError(arch)


def save_tiny(arch: str, folder: Path, positions: int = 256) -> Path:
    """A tiny ``arch`` model with its tokenizer, saved where ``from_pretrained`` finds it."""
    tok = tokenizer()
    model = build(arch, len(tok), positions)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


def records(task: str = "counterfact", n: int = 6) -> list[EditRecord]:
    subjects = ["Zorvia", "Mirland", "Kelp", "Tosk", "Bel", "Rome"]
    targets = ["Rome", "Bel", "Tosk", "Zorvish", "Kelp", "Mirland"]
    out = []
    for i in range(n):
        s, t = subjects[i % 6], targets[(i + 1) % 6]
        out.append(
            EditRecord(
                task=task,
                prompt=f"The capital of {s} is",
                target_new=t,
                subject=s,
                rephrase=(f"What is the capital of {s}?",),
                locality=(PromptAnswer(f"People in {subjects[(i + 2) % 6]} speak", "Zorvish"),),
                portability=(PromptAnswer(f"The capital city of {s} is", t),),
            )
        )
    return out


def write_jsonl(path: Path, items: list[EditRecord]) -> Path:
    path.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in items))
    return path
