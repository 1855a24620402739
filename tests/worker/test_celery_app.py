"""The Celery app is configured for long GPU jobs (DESIGN.md "Job lifecycle")."""

from __future__ import annotations

import pytest

from worker.app import EXPORT_TASK, create_celery_app
from worker.settings import WorkerSettings
from worker.tasks import register_tasks


def test_long_job_settings() -> None:
    settings = WorkerSettings(redis_url="redis://127.0.0.1:1/0")
    app = create_celery_app(settings)
    conf = app.conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1 and conf.worker_concurrency == 1
    visibility = conf.broker_transport_options["visibility_timeout"]
    assert conf.task_soft_time_limit < conf.task_time_limit < visibility
    assert conf.result_backend_transport_options["visibility_timeout"] == visibility
    register_tasks(app, settings)
    assert EXPORT_TASK in app.tasks


def test_time_limits_out_of_order_are_refused() -> None:
    settings = WorkerSettings(
        task_soft_time_limit_s=100, task_hard_time_limit_s=200, broker_visibility_timeout_s=150
    )
    with pytest.raises(ValueError, match="soft < hard < visibility"):
        create_celery_app(settings)
