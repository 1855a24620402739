"""``python -m worker``: one Celery worker process (concurrency 1: one per GPU).

Configuration comes from ``QKVAULT_*`` environment variables (worker.settings.WorkerSettings). Extra
arguments are passed to ``celery worker``.
"""

from __future__ import annotations

import logging
import os
import socket
import sys

from worker.app import create_celery_app
from worker.capabilities import connect_capability_reports
from worker.settings import WorkerSettings
from worker.tasks import register_tasks


def main(argv: list[str] | None = None) -> None:
    settings = WorkerSettings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_celery_app(settings)
    register_tasks(app, settings)
    connect_capability_reports(settings, app)  # each pool child: its GPUs and packages, its queues
    name = f"qkvault-{os.getpid()}@{socket.gethostname()}"
    args = [
        "worker",
        "--loglevel=INFO",
        "--concurrency=1",
        "--pool=prefork",
        "-Q",
        settings.queue_name,
        "--hostname",
        name,
        *(sys.argv[1:] if argv is None else argv),
    ]
    app.worker_main(argv=args)


if __name__ == "__main__":
    main()
