"""The worker enforces the model roots too (issue #12): a stored job whose ``model.id`` lies outside
them (stored before the rule, or admitted by a misconfigured API) fails with the API's message,
and the path is never opened."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from storage.index import Index, JobState
from storage.models.roots import outside_roots_message
from storage.stores.objectstore import ObjectStore
from worker.jobs import run_job
from worker.models import ModelCache
from worker.settings import WorkerSettings
from worker.tasks import WorkerState

from .conftest import model_cache_dir


@pytest.fixture
def env(tmp_path: Path) -> dict[str, Any]:
    root = tmp_path / "models"
    root.mkdir()
    settings = WorkerSettings(
        database_url=f"sqlite:///{tmp_path}/index.db",
        store_url=str(tmp_path / "store"),
        progress_interval_s=0.0,
        heartbeat_interval_s=0.2,
        model_cache_dir=model_cache_dir(),
        model_roots=[root],
    )
    index = Index(settings.database_url)
    index.migrate()
    return {
        "root": root,
        "settings": settings,
        "index": index,
        "store": ObjectStore.from_settings(settings),
        "models": ModelCache(model_cache_dir(), "cpu", settings.model_root_dirs()),
    }


def _run(env: dict[str, Any], model: dict[str, str]) -> tuple[JobState | None, dict[str, Any]]:
    job = env["index"].create_job(
        spec={"model": model, "prompts": ["hi"]},
        owner="local",
        store_url_for=env["store"].bundle_url,
        max_attempts=3,
    )
    state = run_job(
        job.id,
        index=env["index"],
        store=env["store"],
        models=env["models"],
        settings=env["settings"],
        worker_id="test-worker",
    )
    return state, env["index"].get_job(job.id).error or {}


def test_a_stored_job_outside_the_roots_fails_unopened(
    env: dict[str, Any], tiny_model_dir: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real models outside the root (which would load) and paths that would fail differently if
    opened all fail with the one message; nothing is loaded."""
    import transformers

    import worker.models

    def opened(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"a refused model was opened: {args}")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", opened)
    monkeypatch.setattr(worker.models, "_dequantised_gguf", opened)
    model = str(tiny_model_dir("llama"))
    os.symlink(model, env["root"] / "link")
    ids = [
        model,
        "/etc/passwd",
        "/proc/self/environ",
        "/dev/zero.gguf",
        f"{env['root']}/../../x",
        f"{env['root']}/link",
    ]
    for model_id in ids:
        state, error = _run(env, {"id": model_id})
        assert state is JobState.FAILED, model_id
        assert error["type"] == "invalid-job-spec" and error["detail"] == outside_roots_message(model_id)
    state, error = _run(env, {"id": str(env["root"]), "gguf_file": "../../../../etc/passwd"})
    assert state is JobState.FAILED and error["detail"] == outside_roots_message(str(env["root"]))


def test_a_model_under_a_root_runs(env: dict[str, Any], tiny_model_dir: Any) -> None:
    model = tiny_model_dir("llama")
    env["models"] = ModelCache(model_cache_dir(), "cpu", [model.parent])
    state, error = _run(env, {"id": str(model)})
    assert state is JobState.SUCCEEDED, error


def test_the_worker_task_checks_the_settings_roots(env: dict[str, Any]) -> None:
    """The Celery task's model cache carries the worker's model roots (``QKVAULT_MODEL_ROOTS``)."""
    settings: WorkerSettings = env["settings"]
    _, _, models = WorkerState(settings).resources()
    assert models.roots == (env["root"],) == settings.model_root_dirs()
    default = settings.model_copy(update={"model_roots": []})
    _, _, models = WorkerState(default).resources()
    assert models.roots == default.default_model_roots() and model_cache_dir() in models.roots
