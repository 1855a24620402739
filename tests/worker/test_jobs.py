"""The job runner against a real SQLite index and a local store: outcomes, chunk records, cancel."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import google_crc32c
import pytest

from storage.bundle import open_bundle
from storage.bundle.checksum import matches
from storage.errors import EncoderProcessDied, JobCancelled
from storage.index import Index, JobState
from storage.stores.objectstore import ObjectStore
from worker.jobs import run_job
from worker.models import ModelCache
from worker.settings import WorkerSettings

from .conftest import CollectingHooks, model_cache_dir
from .export_helpers import export


@pytest.fixture
def env(tmp_path: Path) -> dict[str, Any]:
    settings = WorkerSettings(
        database_url=f"sqlite:///{tmp_path}/index.db",
        store_url=str(tmp_path / "store"),
        progress_interval_s=0.0,
        heartbeat_interval_s=0.2,
        model_cache_dir=model_cache_dir(),
    )
    index = Index(settings.database_url)
    index.migrate()
    store = ObjectStore.from_settings(settings)
    return {
        "settings": settings,
        "index": index,
        "store": store,
        "models": ModelCache(model_cache_dir(), "cpu"),
    }


def _submit(env: dict[str, Any], spec: dict[str, Any]) -> str:
    job = env["index"].create_job(
        spec=spec, owner="local", store_url_for=env["store"].bundle_url, max_attempts=3
    )
    return str(job.id)


def _run(env: dict[str, Any], job_id: str) -> JobState | None:
    return run_job(
        job_id,
        index=env["index"],
        store=env["store"],
        models=env["models"],
        settings=env["settings"],
        worker_id="test-worker",
    )


def test_chunk_checksum_setting(
    env: dict[str, Any], tiny_model_dir: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``QKVAULT_CHUNK_CHECKSUM=sha256``: every record of the job (pipeline and zarr writes) is sha256."""
    monkeypatch.setenv("QKVAULT_CHUNK_CHECKSUM", "sha256")
    from_env = WorkerSettings().chunk_checksum  # read from the environment, as a worker does
    env["settings"] = env["settings"].model_copy(update={"chunk_checksum": from_env})
    spec = {"model": {"id": str(tiny_model_dir("llama"))}, "prompts": ["hi"], "capture": {"qkv": True}}
    job_id = _submit(env, spec)
    assert _run(env, job_id) is JobState.SUCCEEDED
    records = env["index"].list_chunks(job_id)
    root = Path(env["index"].get_job(job_id).store_url)
    assert records and all(r.checksum.startswith("sha256:") for r in records)
    assert all(matches((root / r.key).read_bytes(), r.checksum) for r in records)


def test_succeeded_job_records_every_stored_chunk(env: dict[str, Any], tiny_model_dir: Any) -> None:
    spec = {
        "model": {"id": str(tiny_model_dir("llama"))},
        "prompts": ["hello there, world", "x"],
        "generation": {"max_new_tokens": 3},
        "capture": {"qkv": True},
        "storage": {"chunk_rows": 16},
    }
    job_id = _submit(env, spec)
    assert _run(env, job_id) is JobState.SUCCEEDED
    job = env["index"].get_job(job_id)
    assert job.state is JobState.SUCCEEDED and job.attempts == 1 and job.error is None
    assert job.units_done == job.units_total > 0
    assert job.result["lengths"] == [len("hello there, world") + 1 + 3, 2 + 3]
    records = {r.key: r for r in env["index"].list_chunks(job_id)}
    files = dict(env["store"].list_files(job.store_url))
    chunk_files = {k: v for k, v in files.items() if "/c/" in k}
    assert set(records) == set(chunk_files), "index and store disagree on which chunks exist"
    for key, record in records.items():
        data = (Path(job.store_url) / key).read_bytes()
        assert record.nbytes == len(data) == chunk_files[key]
        assert record.checksum == f"crc32c:{google_crc32c.value(data):08x}"  # the default algorithm
    assert job.bytes_written == sum(r.nbytes for r in records.values())
    assert job.chunks_written == len(records)
    attrs = open_bundle(job.store_url).attrs
    assert attrs["complete"] is True and attrs["capture"]["compression"] == "lz4"
    # the chunk writer's account in the result: the row-array chunks it encoded and stored
    row_records = [r for r in records.values() if r.array in ("attention", "q", "k", "v")]
    writer = job.result["writer"]
    assert writer["chunks"] == len(row_records)
    assert writer["stored_bytes"] == sum(r.nbytes for r in row_records)
    assert writer["input_bytes"] > 0 and writer["encode_s"] > 0 and writer["store_s"] > 0
    # A redelivered message for a finished job does nothing.
    assert _run(env, job_id) is None
    assert env["index"].get_job(job_id).attempts == 1


def test_a_chunk_encoder_process_that_died_gives_the_job_back_and_the_next_attempt_resumes(
    env: dict[str, Any], tiny_model_dir: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On CUDA the chunks are encoded by encoder processes (storage/bundle/encodeprocs.py); one
    that dies mid-job fails the writes it held with ``EncoderProcessDied`` (tests/storage/
    test_encodeprocs.py). Raised here where the pipeline raises it, after some row blocks were
    written: the attempt gives the job back, and the next one resumes and completes it."""
    from storage.bundle.writer import BundleWriter

    spec = {
        "model": {"id": str(tiny_model_dir("llama"))},
        "prompts": ["hello there, world", "x"],
        "capture": {"qkv": True},
        "storage": {"chunk_rows": 16},
    }
    job_id = _submit(env, spec)
    calls = {"n": 0}
    write_row_blocks = BundleWriter.write_row_blocks

    def dies_on_the_third(self: BundleWriter, blocks: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            self.wait()  # what the first two handed over is stored and recorded
            raise EncoderProcessDied(
                "chunk encoder process encoder-0 (pid 4242) ended (exit status -9) holding 1 tasks; "
                "their chunks were not stored",
                detail={"pid": 4242, "status": -9},
            )
        write_row_blocks(self, blocks)

    monkeypatch.setattr(BundleWriter, "write_row_blocks", dies_on_the_third)
    assert _run(env, job_id) is JobState.QUEUED
    job = env["index"].get_job(job_id)
    error = job.public_fields()["error"]
    assert (job.state, job.attempts, job.lease_worker) == (JobState.QUEUED, 1, None)
    assert error["type"] == "encoder-process-died" and error["retrying"] is True
    assert error["extra"] == {"pid": 4242, "status": -9} and (error["attempts"], error["max_attempts"]) == (
        1,
        3,
    )
    recorded = job.chunks_written
    assert recorded > 0
    monkeypatch.setattr(BundleWriter, "write_row_blocks", write_row_blocks)
    assert _run(env, job_id) is JobState.SUCCEEDED
    job = env["index"].get_job(job_id)
    assert job.attempts == 2 and job.error is None
    assert job.result["resume"]["chunks_recorded"] == recorded


def test_bad_model_fails_with_readable_error(env: dict[str, Any], tmp_path: Path) -> None:
    job_id = _submit(env, {"model": {"id": str(tmp_path / "no-such-model")}, "prompts": ["hi"]})
    assert _run(env, job_id) is JobState.FAILED
    error = env["index"].get_job(job_id).error
    assert error["type"] == "model-load-failed" and "no-such-model" in error["detail"]


def test_prompt_too_long_fails_with_readable_error(env: dict[str, Any], tiny_model_dir: Any) -> None:
    job_id = _submit(
        env,
        {
            "model": {"id": str(tiny_model_dir("llama"))},
            "prompts": ["x" * 300],
            "generation": {"max_new_tokens": 10},
        },
    )
    assert _run(env, job_id) is JobState.FAILED
    error = env["index"].get_job(job_id).error
    assert error["type"] == "invalid-job-spec"
    assert "301 tokens + max_new_tokens 10" in error["detail"] and "256" in error["detail"]


def test_cancel_requested_before_start_ends_cancelled(env: dict[str, Any], tiny_model_dir: Any) -> None:
    job_id = _submit(env, {"model": {"id": str(tiny_model_dir("llama"))}, "prompts": ["hi"]})
    env["index"].request_cancel(job_id)
    assert _run(env, job_id) is None
    assert env["index"].get_job(job_id).state is JobState.CANCELLED


def test_cancel_at_chunk_boundary_keeps_partial_data(tiny_model_dir: Any, tmp_path: Path) -> None:
    spec = {
        "model": {"id": str(tiny_model_dir("llama"))},
        "prompts": ["a" * 100],
        "generation": {"max_new_tokens": 4},
        "storage": {"chunk_rows": 16},
    }
    hooks = CollectingHooks(cancel_after_blocks=3)
    with pytest.raises(JobCancelled):
        export(spec, tmp_path / "b.zarr", hooks=hooks)
    ds = open_bundle(tmp_path / "b.zarr")
    assert ds.attrs["partial"] is True and ds.attrs["complete"] is False
    assert hooks.units < hooks.units_total  # stopped early
    assert ds["attention"][0, 0, :, :16, :16].values.any()  # what was written is kept


def test_cancel_during_a_long_generation_lands_within_a_decoding_step(
    env: dict[str, Any], tiny_model_dir: Any
) -> None:
    """200 generated tokens under one 512-row block: no row block completes while decoding, so a
    cancel must land at a decoding step (read from the flag the heartbeat thread keeps fresh, not
    from the database on the forward thread), keep what was generated and mark it partial."""
    import threading
    import time

    new_tokens = 200
    spec = {
        "model": {"id": str(tiny_model_dir("llama"))},
        "prompts": ["hi"],
        "generation": {"max_new_tokens": new_tokens, "stop_at_eos": False},
        "storage": {"chunk_rows": 512},
    }
    job_id = _submit(env, spec)
    index: Index = env["index"]

    def cancel_once_decoding() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            job = index.get_job(job_id)
            if job.phase == "decoding" and job.units_done > 20:
                index.request_cancel(job_id)
                return
            time.sleep(0.02)

    canceller = threading.Thread(target=cancel_once_decoding)
    canceller.start()
    state = _run(env, job_id)
    canceller.join()
    job = index.get_job(job_id)
    assert state is JobState.CANCELLED and job.state is JobState.CANCELLED and job.partial
    ds = open_bundle(env["store"].bundle_url(job_id))
    generated = int(ds["length"][0]) - int(ds["prompt_length"][0])
    assert 0 < generated < new_tokens, generated  # stopped mid-generation, what was made is kept
    assert ds.attrs["partial"] is True
