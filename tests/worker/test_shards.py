"""A bulk job split into shards (worker/shards.py), run in-process by two worker ids: the plan
numbers micro-batches as one worker does, each shard exports its range, the finalize writes the
sequence table and root; the bundle equals a one-worker run's, every array of every sequence and
the table (byte for byte, timings aside), and the job's result names who ran which shard."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

from storage.bundle.bulk import open_bulk
from storage.index import Index, JobState
from storage.index import shards as sh
from storage.stores.objectstore import ObjectStore, zarr_store
from tests.faults import audit_chunks, bundle_differences, bundle_files
from worker.bulk import batch_group
from worker.jobs import run_job
from worker.models import ModelCache
from worker.settings import WorkerSettings
from worker.shards import ShardExporter, run_finalize, run_shard

from .conftest import model_cache_dir

JOB_ID = "00000000-0000-4000-8000-00000005a4d0"


def bulk_spec(model: Path, sequences: int = 30, shuffle_seed: int | None = 3) -> dict[str, Any]:
    prompts = [
        ("seven small birds sing in the old oak tree " * (1 + i % 5)).strip() for i in range(sequences)
    ]
    source: dict[str, Any] = {"kind": "prompts", "prompts": prompts, "token_budget": 384, "max_sequences": 6}
    if shuffle_seed is not None:
        source |= {"shuffle_seed": shuffle_seed, "shuffle_buffer": 7}
    return {
        "model": {"id": str(model)},
        "source": source,
        "generation": {"max_new_tokens": 3},
        "capture": {"attention": True, "qkv": True},
        "storage": {"chunk_rows": 16},
    }


def shard_job(
    tmp_path: Path, name: str, spec: dict[str, Any], job_id: str = JOB_ID, **kw: Any
) -> tuple[WorkerSettings, Index, ObjectStore]:
    """Settings (SQLite index and local store under ``tmp_path/name``, ``kw`` on top), the index and
    the store, with job ``job_id`` of ``spec`` created (queued)."""
    settings = WorkerSettings(
        database_url=f"sqlite:///{tmp_path}/{name}.db",
        store_url=str(tmp_path / name),
        model_cache_dir=model_cache_dir(),
        **kw,
    )
    index, store = Index(settings.database_url), ObjectStore.from_settings(settings)
    index.migrate()
    index.create_job(spec=spec, owner="t", store_url_for=store.bundle_url, max_attempts=2, job_id=job_id)
    return settings, index, store


def test_sharded_bundle_equals_a_one_worker_run(tiny_model_dir: Any, tmp_path: Path) -> None:
    spec = bulk_spec(tiny_model_dir("llama"))
    models = ModelCache(model_cache_dir(), "cpu")
    ref_settings, ref_index, ref_store = shard_job(tmp_path, "ref", spec)
    assert run_job(
        JOB_ID, index=ref_index, store=ref_store, models=models, settings=ref_settings, worker_id="ref"
    )
    reference = bundle_files(ref_store, ref_index.get_job(JOB_ID).store_url)
    batches = ref_index.get_job(JOB_ID).result["micro_batches"]  # type: ignore[index]
    assert batches >= 5

    settings, index, store = shard_job(tmp_path, "sharded", spec, shard_micro_batches=2)
    launched: list[list[int]] = []
    outcome = run_job(
        JOB_ID, index=index, store=store, models=models, settings=settings, worker_id="planner",
        launch_shards=lambda job, shards: launched.append(shards),
    )  # fmt: skip
    assert outcome is JobState.RUNNING and launched == [list(range((batches + 1) // 2))]
    job = index.get_job(JOB_ID)
    assert job.lease_worker == sh.SHARDED_LEASE and job.units_total == 30
    outcomes = [
        run_shard(
            JOB_ID, n, index=index, store=store, models=models, settings=settings, worker_id=f"w{n % 2}"
        )
        for n in launched[0]
    ]
    assert outcomes == ["succeeded"] * (len(outcomes) - 1) + ["finalize"]
    assert index.get_job(JOB_ID).units_done == 30  # summed from the shards
    assert (
        run_finalize(JOB_ID, index=index, store=store, settings=settings, worker_id="w1")
        is JobState.SUCCEEDED
    )
    assert run_finalize(JOB_ID, index=index, store=store, settings=settings, worker_id="w0") is None  # once
    done = index.get_job(JOB_ID)
    assert done.state is JobState.SUCCEEDED and done.result is not None
    runs = done.result["shards"]["runs"]
    assert done.result["shards"]["count"] == len(launched[0]) and {r["worker"] for r in runs} == {"w0", "w1"}
    assert runs[1]["micro_batches"] == [2, 4] and done.result["micro_batches"] == batches
    files = bundle_files(store, done.store_url)
    assert bundle_differences(files, reference) == []
    assert audit_chunks(index, done, files).clean


@pytest.mark.parametrize("shard_micro_batches", [0, 100])
def test_small_or_unsharded_bulk_jobs_run_on_one_worker(
    tiny_model_dir: Any, tmp_path: Path, shard_micro_batches: int
) -> None:
    spec = bulk_spec(tiny_model_dir("llama"), sequences=8, shuffle_seed=None)
    assert_runs_on_one_worker(tmp_path, spec, shard_micro_batches=shard_micro_batches)


def assert_runs_on_one_worker(tmp_path: Path, spec: dict[str, Any], **settings_kw: Any) -> None:
    """The job of ``spec`` (with worker settings ``settings_kw``) succeeds on the worker that took
    it: no shard is made or sent."""
    settings, index, store = shard_job(tmp_path, "one", spec, **settings_kw)
    launched: list[list[int]] = []
    outcome = run_job(
        JOB_ID, index=index, store=store, models=ModelCache(model_cache_dir(), "cpu"), settings=settings,
        worker_id="w", launch_shards=lambda job, shards: launched.append(shards),
    )  # fmt: skip
    assert outcome is JobState.SUCCEEDED and launched == [] and sh.list_shards(index, JOB_ID) == []


def test_a_shard_failing_for_good_fails_the_job_keeping_the_finished_micro_batches(
    tiny_model_dir: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shard 1 fails (not a transient fault: no retry); the queued shards are cancelled, the shard
    that leaves nothing to run sends the finalize, and the job ends failed with shard 1's problem
    and a root whose table holds the micro-batches that finished, readable like a cancelled
    one-worker job's."""
    spec = bulk_spec(tiny_model_dir("llama"), shuffle_seed=None)
    settings, index, store = shard_job(tmp_path, "failing", spec, shard_micro_batches=2)
    models = ModelCache(model_cache_dir(), "cpu")
    launched: list[list[int]] = []
    run_job(
        JOB_ID, index=index, store=store, models=models, settings=settings, worker_id="planner",
        launch_shards=lambda job, shards: launched.append(shards),
    )  # fmt: skip
    real_start_batch = ShardExporter._start_batch

    def start_batch(self: ShardExporter, job_id: str, batch: Any, members: Any, drain: Any = None) -> Any:
        if batch.index == 3:
            raise RuntimeError("the export of micro-batch 3 broke")
        return real_start_batch(self, job_id, batch, members, drain)

    monkeypatch.setattr(ShardExporter, "_start_batch", start_batch)
    run: dict[str, Any] = {"index": index, "store": store, "models": models, "settings": settings}
    assert run_shard(JOB_ID, 0, **run, worker_id="w0") == "succeeded"
    # micro-batch 2 finishes, 3 fails; the queued shards are cancelled: nothing is left to run
    assert run_shard(JOB_ID, 1, **run, worker_id="w1") == "finalize"
    stopping = index.get_job(JOB_ID)
    assert stopping.state is JobState.RUNNING and stopping.error is not None
    assert stopping.error["shard"] == 1 and "micro-batch 3 broke" in stopping.error["detail"]
    assert run_shard(JOB_ID, 2, **run, worker_id="w0") == "finalize"  # a late delivery: finalize due
    assert (
        run_finalize(JOB_ID, index=index, store=store, settings=settings, worker_id="w0") is JobState.FAILED
    )
    done = index.get_job(JOB_ID)
    assert done.state is JobState.FAILED and done.partial and done.error == stopping.error
    assert done.result is not None and done.result["micro_batches"] == 3
    assert [r["state"] for r in done.result["shards"]["runs"]][:3] == ["succeeded", "failed", "cancelled"]
    bundle = open_bulk(done.store_url)
    table = bundle.sequences
    assert bundle.batches() == [batch_group(k) for k in range(3)]  # 3 and on never finished
    assert "partial_table" not in table.attrs and sorted(set(table["batch"].values.tolist())) == [0, 1, 2]
    store_of = zarr_store(done.store_url, read_only=True)
    groups = [zarr.open_array(store_of, path=f"{batch_group(k)}/sequence", mode="r") for k in range(3)]
    kept = sorted(int(i) for array in groups for i in np.asarray(array[:]))
    assert table["sequence"].values.tolist() == kept and done.result["sequences"] == len(kept)
    for i in kept[:2]:
        assert bundle.sequence(i)["tokens"].shape[-1] == int(table["length"].sel(sequence=i))
    assert audit_chunks(index, done, bundle_files(store, done.store_url)).clean
