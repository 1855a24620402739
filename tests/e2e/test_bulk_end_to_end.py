"""A bulk job through the real API, Redis, Celery worker and stores (local and S3): sequences from
an inline source in micro-batches, progress in sequences, padding in the result, the zip and the
store read sequence by sequence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from storage.bundle.bulk import open_bulk

from .conftest import Stack

pytestmark = pytest.mark.integration


def test_bulk_job_end_to_end(stack: Stack, tiny_llama: str, tmp_path: Path) -> None:
    prompts = [("the quick brown fox " * (1 + i % 4)).strip() for i in range(16)]
    spec = {
        "model": {"id": tiny_llama},
        "source": {"kind": "prompts", "prompts": prompts, "token_budget": 512, "max_sequences": 4},
        "generation": {"max_new_tokens": 2},
        "capture": {"attention": True, "qkv": True},
        "storage": {"chunk_rows": 16},
    }
    submitted = stack.client.submit(spec)
    expected_tokens = submitted.progress.tokens_total  # admission's count, with the model's tokenizer
    job = stack.client.wait(submitted.id, poll_s=0.2, timeout_s=180, progress=False)
    assert job.state == "succeeded", job
    assert job.progress.units_done == job.progress.units_total == 16  # progress in sequences
    assert job.result is not None
    result = job.result
    assert result["sequences"] == 16 and result["micro_batches"] >= 4 and result["padding_fraction"] <= 0.05
    # ... and in tokens: the estimate at submission was exact for inline prompts
    assert job.progress.tokens_done == job.progress.tokens_total == result["tokens"] == expected_tokens
    assert "16/16 sequences" in job.status_line() and f"{result['tokens']:,} tokens" in job.status_line()
    zip_path = stack.client.download(job.id, tmp_path / "bulk.zip", progress=False)
    from_zip = open_bulk(zip_path)
    from_store = open_bulk(f"{stack.store_url}/jobs/{job.id}.zarr", storage_options=stack.storage_options)
    assert from_zip.sequences["text"].values.tolist() == prompts
    for i in (0, 9, 15):
        one, other = from_zip.sequence(i), from_store.sequence(i)
        np.testing.assert_array_equal(one["attention"].values, other["attention"].values)
        n = int(from_zip.sequences["length"].sel(sequence=i))
        assert one["attention"].shape[-2:] == (n, n)
        np.testing.assert_allclose(one["attention"].values.astype(np.float32).sum(-1), 1.0, atol=5e-3)
