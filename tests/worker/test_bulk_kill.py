"""A bulk job whose worker process is SIGKILLed mid-job (real Redis, real worker and reconciler
processes, SQLite, local store): the next attempt resumes at the first unfinished micro-batch and
the bundle equals an uninterrupted run's, byte for byte (timings aside), every chunk recorded once."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from storage.index import Index, JobState
from storage.stores.objectstore import ObjectStore
from tests.faults import audit_chunks, bundle_differences, bundle_files, kill_group, wait_until
from tests.services import start_worker
from tests.soak import fast_env, reconciler
from worker.jobs import run_job
from worker.models import ModelCache
from worker.settings import WorkerSettings

from .conftest import model_cache_dir

pytestmark = [pytest.mark.slow, pytest.mark.integration]

JOB_ID = "00000000-0000-4000-8000-0000000b01c0"


def _spec(model: Path) -> dict[str, Any]:
    prompts = [("seven small birds sing in the old oak tree " * (1 + i % 5)).strip() for i in range(48)]
    return {
        "model": {"id": str(model)},
        "source": {"kind": "prompts", "prompts": prompts, "token_budget": 384, "max_sequences": 6},
        "generation": {"max_new_tokens": 6},
        "capture": {"attention": True, "qkv": True},
        "storage": {"chunk_rows": 16},
    }


def test_sigkill_mid_bulk_job_resumes_at_the_first_unfinished_micro_batch(
    redis_url: str, tiny_model_dir: Any, tmp_path: Path
) -> None:
    model, cache = tiny_model_dir("llama"), model_cache_dir()
    ref_settings = WorkerSettings(
        database_url=f"sqlite:///{tmp_path}/ref.db", store_url=str(tmp_path / "ref"), model_cache_dir=cache
    )
    ref_index, ref_store = Index(ref_settings.database_url), ObjectStore.from_settings(ref_settings)
    ref_index.migrate()
    ref_index.create_job(
        spec=_spec(model), owner="t", store_url_for=ref_store.bundle_url, max_attempts=1, job_id=JOB_ID
    )
    models = ModelCache(cache, "cpu")
    assert run_job(
        JOB_ID, index=ref_index, store=ref_store, models=models, settings=ref_settings, worker_id="ref"
    )
    reference = bundle_files(ref_store, ref_index.get_job(JOB_ID).store_url)

    settings = WorkerSettings(
        database_url=f"sqlite:///{tmp_path}/index.db",
        store_url=str(tmp_path / "store"),
        redis_url=redis_url,
        queue_name=f"qk-bulk-{uuid.uuid4().hex[:8]}",
    )
    index, store = Index(settings.database_url), ObjectStore.from_settings(settings)
    index.migrate()
    index.create_job(
        spec=_spec(model), owner="t", store_url_for=store.bundle_url, max_attempts=3, job_id=JOB_ID
    )
    from worker.app import create_celery_app, enqueue_export

    app = create_celery_app(settings)
    enqueue_export(app, JOB_ID)
    app.close()
    env = fast_env(settings, cache, model)
    with reconciler(env, tmp_path / "reconciler.log"):
        with start_worker(env, tmp_path / "worker.log") as proc:
            assert wait_until(lambda: index.get_job(JOB_ID).units_done >= 18, 120, poll_s=0.02)
            kill_group(proc)
        killed_at = index.get_job(JOB_ID)
        assert killed_at.state is JobState.RUNNING and killed_at.units_done < 48
        with start_worker(env, tmp_path / "worker.log"):
            assert wait_until(lambda: index.get_job(JOB_ID).terminal, 180, poll_s=0.2)
    done = index.get_job(JOB_ID)
    assert done.state is JobState.SUCCEEDED and done.attempts == 2, done.error
    assert done.result is not None and done.result["resumed_micro_batches"] >= 2
    files = bundle_files(store, done.store_url)
    assert bundle_differences(files, reference) == []
    audit = audit_chunks(index, done, files)
    assert audit.clean, audit
    index.dispose()
    ref_index.dispose()
