"""A one-batch job cut by its exported layers (worker/layershards.py), run in-process by several
worker ids: each shard computes only the layers up to its own, the finalize puts the shards' parts
together, and the bundle equals a one-worker run's byte for byte (timings aside), with the summary
metrics, induction scores, chosen heads and certificate of every layer. Jobs a layer cut cannot
serve run on one worker; a shard failing for good leaves a partial bundle of the other layers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from storage.bundle.reader import open_bundle, open_summary
from storage.index import Index, JobState
from storage.index import shards as sh
from storage.jobs.spec import JobSpec
from storage.stores.objectstore import ObjectStore
from tests.faults import audit_chunks, bundle_differences, bundle_files
from worker.generation import decoder_layers
from worker.jobs import run_job
from worker.layershards import parts_url
from worker.models import ModelCache
from worker.settings import WorkerSettings
from worker.shards import run_finalize, run_shard

from .conftest import model_cache_dir
from .test_shards import JOB_ID, assert_runs_on_one_worker, shard_job

WORDS = "the quick brown fox jumps over the lazy dog while seven small birds sing in an old oak tree "


def layer_spec(model: Path, capture: dict[str, Any], new_tokens: int = 0) -> dict[str, Any]:
    return {
        "model": {"id": str(model)},
        "prompts": [(WORDS * 2).strip(), WORDS.strip()],
        "generation": {"max_new_tokens": new_tokens},
        "capture": capture,
        "storage": {"chunk_rows": 32},
    }


CAPTURES = {
    "summary-induction": {
        "attention": True,
        "qkv": True,
        "hidden_states": True,
        "summary": True,
        "induction_probe": {"length": 16},
    },
    "top-heads": {
        "detail": "top_heads",
        "qkv": True,
        "top_heads": {"n": 2},
        "summary_params": {"local_window": 16},
    },
}


def _plan(settings: WorkerSettings, index: Index, store: ObjectStore, models: ModelCache) -> list[int]:
    launched: list[list[int]] = []
    outcome = run_job(
        JOB_ID, index=index, store=store, models=models, settings=settings, worker_id="planner",
        launch_shards=lambda job, shards: launched.append(shards),
    )  # fmt: skip
    assert outcome is JobState.RUNNING, index.get_job(JOB_ID).error
    return launched[0]


@pytest.mark.parametrize("capture", sorted(CAPTURES))
def test_layer_sharded_bundle_equals_a_one_worker_run(
    tiny_model_dir: Any, tmp_path: Path, capture: str
) -> None:
    model = tiny_model_dir("llama")
    spec = layer_spec(model, CAPTURES[capture])
    models = ModelCache(model_cache_dir(), "cpu")
    ref_settings, ref_index, ref_store = shard_job(tmp_path, "ref", spec)
    assert run_job(
        JOB_ID, index=ref_index, store=ref_store, models=models, settings=ref_settings, worker_id="ref"
    ) is JobState.SUCCEEDED  # fmt: skip
    reference = bundle_files(ref_store, ref_index.get_job(JOB_ID).store_url)

    settings, index, store = shard_job(tmp_path, "sharded", spec, shard_layers=1)
    shards = _plan(settings, index, store, models)
    assert shards == [0, 1] and index.get_job(JOB_ID).lease_worker == sh.SHARDED_LEASE  # 2 layers
    last_layer = decoder_layers(models.get(JobSpec.model_validate(spec).model).model)[-1]
    calls: list[int] = []
    handle = last_layer.register_forward_hook(lambda *_: calls.append(1))
    try:
        outcomes = [
            run_shard(
                JOB_ID, n, index=index, store=store, models=models, settings=settings, worker_id=f"w{n % 2}"
            )
            for n in shards
        ]
    finally:
        handle.remove()
    assert outcomes == ["succeeded", "finalize"]
    passes = 2  # the prefill, then the induction probe or the top-heads pass
    assert len(calls) == passes  # the last layer ran in the last shard only: the others stopped before it
    final = run_finalize(JOB_ID, index=index, store=store, settings=settings, worker_id="w1", models=models)
    assert final is JobState.SUCCEEDED
    done = index.get_job(JOB_ID)
    assert done.result is not None and done.result["shards"]["unit"] == "layers"
    assert [r["layers"] for r in done.result["shards"]["runs"]] == [[0, 1], [1, 2]]
    assert done.units_done == done.units_total == 2 * passes
    files = bundle_files(store, done.store_url)
    assert bundle_differences(files, reference) == []
    assert audit_chunks(index, done, files).clean
    assert not store.exists(parts_url(done.store_url), "0.npz")  # the parts are gone


def test_jobs_a_layer_cut_cannot_serve_run_on_one_worker(tiny_model_dir: Any, tmp_path: Path) -> None:
    spec = layer_spec(
        tiny_model_dir("llama"), {"attention": True}, new_tokens=2
    )  # decoding needs every layer
    assert_runs_on_one_worker(tmp_path, spec, shard_layers=1)


def test_a_layer_shard_failing_for_good_leaves_the_other_layers(
    tiny_model_dir: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tiny_model_dir("llama")
    spec = layer_spec(model, {"attention": True, "summary": True, "summary_params": {"local_window": 16}})
    settings, index, store = shard_job(tmp_path, "failing", spec, shard_layers=1)
    models = ModelCache(model_cache_dir(), "cpu")
    assert _plan(settings, index, store, models) == [0, 1]
    run: dict[str, Any] = {"index": index, "store": store, "models": models, "settings": settings}
    assert run_shard(JOB_ID, 0, **run, worker_id="w0") == "succeeded"
    import worker.shards

    def broken(*_: Any, **__: Any) -> dict[str, Any]:
        raise RuntimeError("layer 1 broke")

    monkeypatch.setattr(worker.shards, "run_layer_shard", broken)
    assert run_shard(JOB_ID, 1, **run, worker_id="w1") == "finalize"
    assert run_finalize(JOB_ID, **run, worker_id="w1") is JobState.FAILED
    done = index.get_job(JOB_ID)
    assert done.partial and done.error is not None and "layer 1 broke" in done.error["detail"]
    assert (
        "(layers 1...1)" in sh.exhausted_problem(JOB_ID, sh.list_shards(index, JOB_ID)[1], "layers")["detail"]
    )
    bundle = open_bundle(done.store_url)
    assert bundle.attrs["partial"] is True and list(bundle.attrs["certificate"]["layers"]) == ["0"]
    rows = open_summary(done.store_url)["rows"].values  # layer 0 summarised, layer 1 never computed
    assert (rows[0] > 0).all() and (rows[1] == 0).all()
