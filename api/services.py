"""The API's long-lived collaborators, created once per app and lazily (on first use).

Held on ``app.state.services``; handlers reach them through the typed dependencies in
:mod:`api.deps`. Nothing here opens a connection at construction time.
"""

from __future__ import annotations

import threading
from typing import Any

from celery import Celery

from api.settings import ApiSettings
from storage.index import Index
from storage.index.retry import IndexRetry
from storage.stores.objectstore import ObjectStore
from worker.app import create_celery_app


def create_api_celery_app(settings: ApiSettings) -> Celery:
    """The worker's Celery app, tuned for a producer that must answer HTTP requests quickly.

    - no result backend: the database is the source of truth, and the Redis result backend would
      subscribe to every sent task's result channel (never consumed here) and, after a Redis
      outage, refuse to publish until the process restarts;
    - connect/socket timeouts and one publish retry, so a dead Redis fails an enqueue in about
      ``broker_timeout_s`` instead of blocking the request for tens of seconds.
    """
    app = create_celery_app(settings)
    timeout_s = settings.broker_timeout_s
    transport: dict[str, Any] = dict(app.conf.broker_transport_options or {})
    transport.update(socket_connect_timeout=timeout_s, socket_timeout=timeout_s, max_retries=1)
    app.conf.update(
        result_backend=None,
        broker_transport_options=transport,
        broker_connection_timeout=timeout_s,
        broker_connection_max_retries=1,
        task_publish_retry_policy={
            "max_retries": 1,
            "interval_start": 0,
            "interval_step": 0.2,
            "interval_max": 0.2,
        },
    )
    return app


class Services:
    """Index, object store and Celery client of one app, each built on first use.

    Sync handlers run in a thread pool and may ask for a service concurrently: construction is
    double-checked under a lock, so each exists once.
    """

    def __init__(self, settings: ApiSettings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._index: Index | None = None
        self._object_store: ObjectStore | None = None
        self._celery_app: Celery | None = None

    @property
    def index(self) -> Index:
        if self._index is None:
            with self._lock:
                if self._index is None:
                    retry = IndexRetry(budget_s=self.settings.db_retry_s)
                    self._index = Index(self.settings.database_url, retry=retry)
        return self._index

    @property
    def object_store(self) -> ObjectStore:
        if self._object_store is None:
            with self._lock:
                if self._object_store is None:
                    self._object_store = ObjectStore.from_settings(self.settings)
        return self._object_store

    @property
    def celery_app(self) -> Celery:
        if self._celery_app is None:
            with self._lock:
                if self._celery_app is None:
                    self._celery_app = create_api_celery_app(self.settings)
        return self._celery_app

    def close(self) -> None:
        """Release pooled database and broker connections (app shutdown)."""
        if self._celery_app is not None:
            self._celery_app.close()
        if self._index is not None:
            self._index.dispose()
