"""The embedded stack runs the reconciler beside the worker: a job committed without its message (the
API died before enqueueing it) is found, re-enqueued and run (real processes; docs/reliability.md)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from qkvault.embedded import EmbeddedStack, exited
from storage.index import Index, JobState
from storage.stores.objectstore import ObjectStore
from tests.faults import wait_until
from tests.worker.tiny_models import build_tiny_model

pytestmark = pytest.mark.slow


def test_embedded_stack_reconciles_a_job_whose_message_was_never_sent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QKVAULT_REQUEUE_AFTER_S", "1")  # read by the stack's children only
    monkeypatch.setenv("QKVAULT_RECONCILE_INTERVAL_S", "0.5")
    monkeypatch.setenv("QKVAULT_MODEL_ROOTS", str(tmp_path))  # where the tiny model is
    model = build_tiny_model("llama", tmp_path / "tiny-llama")
    with EmbeddedStack(tmp_path / "home", ready_timeout_s=120) as stack:
        reconciler: Any = stack._procs["reconciler"]
        assert not exited(reconciler)
        index = Index(stack.env["QKVAULT_DATABASE_URL"])
        store = ObjectStore(root_url=str(Path(stack.env["QKVAULT_STORE_URL"]).resolve()))
        spec = {"model": {"id": str(model)}, "prompts": ["hi"]}
        # committed as the API would, but no message sent: only the reconciler can start it
        job = index.create_job(spec=spec, owner="local", store_url_for=store.bundle_url, max_attempts=3)
        assert wait_until(lambda: index.get_job(job.id).terminal, 120, 0.2)
        done = index.get_job(job.id)
        index.dispose()
        log = stack.log_path("reconciler").read_text()
    assert done.state is JobState.SUCCEEDED and done.attempts == 1, done
    assert "requeued_lost=1" in log
    deadline = time.monotonic() + 10
    while not exited(reconciler) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert exited(reconciler)  # stopped with the stack
