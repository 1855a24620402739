"""Tiny randomly initialised models (saved as real model folders) with a byte-level tokenizer.

Built from configs, no download: they give architecture coverage on CPU in seconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from worker.archmatrix.tokenizer import BOS, BYTE_VOCAB, EOS, byte_tokenizer

VOCAB = BYTE_VOCAB

_COMMON: dict[str, Any] = {"vocab_size": VOCAB, "bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": EOS}

CONFIGS: dict[str, dict[str, Any]] = {
    "llama": dict(
        model_type="llama",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    ),
    "qwen2": dict(
        model_type="qwen2",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=256,
    ),
    "mistral": dict(
        model_type="mistral",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        sliding_window=6,
    ),
    "qwen3": dict(
        model_type="qwen3",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=256,
    ),
    "gpt2": dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=4, n_positions=256),
    "gemma2": dict(
        model_type="gemma2",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=256,
    ),
}


def build_tiny_model(kind: str, folder: Path, seed: int = 0, overrides: dict[str, Any] | None = None) -> Path:
    """Save a tiny random ``kind`` model + tokenizer into ``folder``; returns the folder."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if (folder / "config.json").is_file():
        return folder
    params = {**CONFIGS[kind], **(overrides or {})}
    model_type = params.pop("model_type")
    config = AutoConfig.for_model(model_type, **params, **_COMMON)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder
