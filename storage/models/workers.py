"""What each live worker process reports it can place a model on, kept in Redis with a TTL.

A worker (:mod:`worker.capabilities`) writes one key per process,
``qkvault:worker:<queue>:<worker id>``, holding its :class:`WorkerCapabilities` as JSON (what it
offers) with the queues it consumes, at start and
then every ``QKVAULT_HEARTBEAT_INTERVAL_S``; the key expires ``QKVAULT_LEASE_TIMEOUT_S`` after the
last write, so a worker that died drops out on its own (a worker stopped cleanly deletes its key).
The API reads the keys of the queue it sends jobs to (:func:`live_reports`) to admit or refuse a
job's placement (:func:`storage.models.placement.placement_refusal`). Redis, not the SQL index:
liveness is a TTL, and nothing here needs to outlive the broker.

The client is passed in (a ``redis.Redis``); this module imports no Redis package itself.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from typing import Any, Protocol

from storage.models.placement import WorkerCapabilities

KEY_PREFIX = "qkvault:worker:"
_GLOB_SPECIAL = str.maketrans({c: f"\\{c}" for c in "*?[]\\"})


class RedisLike(Protocol):
    """The few ``redis.Redis`` methods used here."""

    def set(self, name: str, value: str, ex: int | None = None) -> Any: ...
    def delete(self, *names: str) -> Any: ...
    def scan_iter(self, match: str | None = None, count: int | None = None) -> Any: ...
    def mget(self, keys: list[Any]) -> Any: ...


def report_key(queue: str, worker_id: str) -> str:
    return f"{KEY_PREFIX}{queue}:{worker_id}"


def publish(
    client: RedisLike,
    queue: str,
    worker_id: str,
    caps: WorkerCapabilities,
    ttl_s: float,
    queues: Sequence[str] = (),
) -> None:
    """Write (or refresh) this worker's report; it expires ``ttl_s`` seconds later. ``queue``: the
    base queue (``QKVAULT_QUEUE_NAME``); ``queues``: every queue it consumes (the base queue and
    those of the routes it meets, :mod:`storage.models.routing`)."""
    doc = {
        "queue": queue,
        "worker": worker_id,
        "reported_at": time.time(),
        "queues": list(queues),
        **caps.to_dict(),
    }
    client.set(report_key(queue, worker_id), json.dumps(doc), ex=max(1, math.ceil(ttl_s)))


def withdraw(client: RedisLike, queue: str, worker_id: str) -> None:
    client.delete(report_key(queue, worker_id))


def live_reports(client: RedisLike, queue: str) -> list[tuple[str, WorkerCapabilities]]:
    """``(worker id, capabilities)`` of every unexpired report of the workers on ``queue``."""
    pattern = report_key(queue, "").translate(_GLOB_SPECIAL) + "*"
    keys = list(client.scan_iter(match=pattern, count=500))
    if not keys:
        return []
    out: list[tuple[str, WorkerCapabilities]] = []
    for raw in client.mget(keys):
        if raw is None:  # expired between SCAN and MGET
            continue
        try:
            doc = json.loads(raw)
        except ValueError:
            continue
        if not isinstance(doc, dict) or doc.get("queue") != queue:  # a queue name with ':' in it
            continue
        out.append((str(doc.get("worker")), WorkerCapabilities.from_dict(doc)))
    return sorted(out, key=lambda item: item[0])
