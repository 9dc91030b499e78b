"""Shared pieces of the weights / export / generate tests: a tiny model, a tiny word-level
tokenizer with MiniMind's special-token ids, and a checkpoint directory as the trainer writes
one."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from minimind_fast.config import MiniMindConfig
from minimind_fast.model import MiniMindForCausalLM

VOCAB = 97
WORDS = "the quick brown fox jumps over lazy dog".split()


def tiny_config(**overrides) -> MiniMindConfig:
    values = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
        max_position_embeddings=128,
    )
    values.update(overrides)
    return MiniMindConfig(**values)


def tiny_model(config: MiniMindConfig) -> MiniMindForCausalLM:
    """Random weights large enough that logits (and greedy choices) are far from ties."""
    model = MiniMindForCausalLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2) if param.dim() > 1 else param.uniform_(0.5, 1.5)
    return model


def make_tokenizer_dir(path: Path):
    """(directory, tokenizers.Tokenizer): word-level, MiniMind's special tokens at ids 0, 1, 2."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "[UNK]": 3}
    vocab.update({word: i + 4 for i, word in enumerate(WORDS)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    return path, tokenizer


def write_checkpoint_dir(path: Path, config: MiniMindConfig, state: dict) -> Path:
    """A directory as a training checkpoint holds one: model.safetensors, config.json, tokenizer."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().clone().contiguous() for k, v in state.items()}
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config.to_dict()))
    make_tokenizer_dir(path)
    return path
