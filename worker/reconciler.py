"""The reconciler: brings Celery's queue back in line with the jobs table (DESIGN.md "Job lifecycle").

``python -m worker.reconciler`` runs :func:`reconcile_once` every ``reconcile_interval_s`` (one
process is enough; two are safe). One pass:

1. Expired leases: a ``running``/``cancelling`` job with no heartbeat for ``lease_timeout_s`` lost
   its worker. Cancel requested -> ``cancelled``; attempts used up -> ``failed`` (problem type
   ``lease-expired``); else back to ``queued``, lease cleared, and re-enqueued.
2. Lost messages: a ``queued`` job untouched for ``requeue_after_s`` and with no message in the
   broker (the API died between its commit and the enqueue, Redis lost it) is re-enqueued with the
   job id as task id, and its ``updated_at`` bumped so the next pass leaves it alone.

Every change is a conditional UPDATE (``storage/index/reconcile.py``): a worker that comes back, a
claim or a cancel between the read and the write wins. Before sending, the pass reads the Redis
broker: a job whose message still waits in the queue list, or was delivered to a worker after the
job was last touched, is left alone (no duplicate messages; ``Index.claim`` would refuse a duplicate
of a job whose lease is live anyway, and fences the writes of a worker whose lease moved). Deliveries
left unacked by a dead worker are removed from
kombu's ``unacked`` hash when the job is re-enqueued, else kombu would redeliver them after the
visibility timeout. A broker that cannot be read falls back to the time thresholds alone.

Every message goes to its job's queue (:func:`storage.models.routing.stored_job_queue`, from the
stored spec: a job with placement options waits for a worker that meets them), and the broker read
covers the queues of the pass's jobs and the base queue.
Imports neither torch nor transformers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import threading
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from celery import Celery

from storage.index import Index, JobRecord, JobState
from storage.index import reconcile as sql
from storage.index import shards as shard_sql
from storage.index.models import utcnow
from storage.index.retry import IndexRetry
from storage.models.routing import stored_job_queue
from worker.app import (
    EXPORT_TASK,
    FINALIZE_TASK,
    SHARD_TASK,
    create_celery_app,
    enqueue_export,
    enqueue_finalize,
    enqueue_shard,
    shard_key,
)
from worker.settings import WorkerSettings

log = logging.getLogger(__name__)


@dataclass
class ReconcileReport:
    """What one pass did. ``still_in_broker``: queued past ``requeue_after_s`` but their message is
    waiting in the broker (a busy queue, not a lost message); ``raced``: rows that changed between
    read and write (left to the next pass); ``enqueue_errors``: sends that failed (retried later)."""

    requeued_lost: int = 0
    requeued_expired: int = 0
    failed_expired: int = 0
    cancelled_expired: int = 0
    still_in_broker: int = 0
    raced: int = 0
    enqueue_errors: int = 0

    @property
    def changed(self) -> int:
        return self.requeued_lost + self.requeued_expired + self.failed_expired + self.cancelled_expired

    def __str__(self) -> str:
        return " ".join(f"{name}={value}" for name, value in asdict(self).items())


@dataclass
class BrokerView:
    """Export messages in the Redis broker: task ids waiting in the queue lists, and unacked
    deliveries (task id -> [(delivery tag, delivered at, epoch s)])."""

    queued: set[str] = field(default_factory=set)
    unacked: dict[str, list[tuple[str, float]]] = field(default_factory=dict)

    def holds(self, job_id: str, delivered_after: float) -> bool:
        """A message waits in the queue, or was delivered to a worker after ``delivered_after``."""
        return job_id in self.queued or any(t > delivered_after for _, t in self.unacked.get(job_id, []))

    def stale(self, job_id: str, delivered_after: float) -> list[str]:
        return [tag for tag, t in self.unacked.get(job_id, []) if t <= delivered_after]


def _task_id(payload: Any) -> str | None:
    """The job id of an export message; :func:`~worker.app.shard_key` of a shard message; the job
    id + ``:finalize`` of a finalize message."""
    headers = payload.get("headers") if isinstance(payload, dict) else None
    if not isinstance(headers, dict) or headers.get("task") not in (EXPORT_TASK, SHARD_TASK, FINALIZE_TASK):
        return None
    task_id = headers.get("id")
    if not isinstance(task_id, str):
        return None
    return task_id if headers.get("task") == EXPORT_TASK else task_id.rsplit(":", 1)[0]


def _redis(channel: Any) -> tuple[Any, str]:
    """A plain client on the channel's pool (kombu's prefixed client skips LRANGE/HGETALL) + prefix."""
    import redis

    return redis.Redis(connection_pool=channel.client.connection_pool), str(channel.global_keyprefix or "")


def inspect_broker(app: Celery, queues: Collection[str]) -> BrokerView | None:
    """Read the lists of ``queues`` (every priority) and the unacked hash in one MULTI; None when
    the broker is not Redis or cannot be read."""
    try:
        with app.connection_for_read() as conn:
            channel = conn.default_channel
            if not hasattr(channel, "unacked_key") or not hasattr(channel, "_q_for_pri"):
                return None
            client, prefix = _redis(channel)
            lists = {prefix + channel._q_for_pri(q, p) for q in queues for p in channel.priority_steps}
            pipe = client.pipeline(transaction=True)
            for key in sorted(lists):
                pipe.lrange(key, 0, -1)
            pipe.hgetall(prefix + channel.unacked_key)
            pipe.zrange(prefix + channel.unacked_index_key, 0, -1, withscores=True)
            *messages, unacked, delivered = pipe.execute()
    except Exception:
        log.warning("cannot read the broker; deciding by time thresholds alone", exc_info=True)
        return None
    view = BrokerView()
    for raw in (m for chunk in messages for m in chunk):
        with _ignore_malformed():
            if (task_id := _task_id(json.loads(raw))) is not None:
                view.queued.add(task_id)
    times = {_text(tag): float(score) for tag, score in delivered}
    for tag, raw in unacked.items():
        with _ignore_malformed():
            if (task_id := _task_id(json.loads(raw)[0])) is not None:
                view.unacked.setdefault(task_id, []).append((_text(tag), times.get(_text(tag), 0.0)))
    return view


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _ignore_malformed() -> contextlib.suppress:
    return contextlib.suppress(ValueError, TypeError, KeyError, IndexError, AttributeError)


def drop_deliveries(app: Celery, tags: list[str]) -> None:
    """Forget unacked deliveries of a dead worker (kombu would redeliver them after the visibility
    timeout, a duplicate of the message the reconciler sends)."""
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        client, prefix = _redis(channel)
        pipe = client.pipeline(transaction=True)
        pipe.zrem(prefix + channel.unacked_index_key, *tags).hdel(prefix + channel.unacked_key, *tags)
        pipe.execute()


def _send(
    app: Celery,
    job_id: str,
    queue: str,
    broker: BrokerView | None,
    live_after: float,
    report: ReconcileReport,
) -> bool:
    try:
        stale = broker.stale(job_id, live_after) if broker is not None else []
        if stale:
            drop_deliveries(app, stale)
        enqueue_export(app, job_id, queue=queue)
    except Exception:
        log.warning("job %s: re-enqueue failed; retried after requeue_after_s", job_id, exc_info=True)
        report.enqueue_errors += 1
        return False
    return True


def _expired(
    index: Index,
    app: Celery,
    settings: WorkerSettings,
    job: JobRecord,
    queue: str,
    now: datetime,
    broker: BrokerView | None,
    report: ReconcileReport,
) -> None:
    who = f"job {job.id}: lease of {job.lease_worker} expired (last heartbeat {job.heartbeat_at})"
    if job.cancel_requested or job.state is JobState.CANCELLING:
        if sql.end_expired(index, job, JobState.CANCELLED, now):
            report.cancelled_expired += 1
            log.info("%s; cancel was requested: cancelled", who)
            return
    elif job.attempts >= job.max_attempts:
        problem = sql.lease_expired_problem(job, settings.lease_timeout_s, now)
        if sql.end_expired(index, job, JobState.FAILED, now, error=problem):
            report.failed_expired += 1
            log.warning("%s on attempt %d of %d: failed", who, job.attempts, job.max_attempts)
            return
    elif sql.requeue_expired(index, job, now):
        report.requeued_expired += 1
        log.info("%s on attempt %d of %d: queued again", who, job.attempts, job.max_attempts)
        # deliveries before the last beat belong to the dead attempt; later ones are live
        beat = job.heartbeat_at or now - timedelta(seconds=settings.lease_timeout_s)
        if broker is None or not broker.holds(job.id, beat.timestamp()):
            _send(app, job.id, queue, broker, beat.timestamp(), report)
        return
    report.raced += 1
    log.info("job %s changed while being reconciled; left to the next pass", job.id)


def reconcile_once(
    index: Index, celery_app: Celery, settings: WorkerSettings, now: datetime | None = None
) -> ReconcileReport:
    """One pass over the jobs table (see the module docstring); ``now`` defaults to the clock."""
    now = now or utcnow()
    report = ReconcileReport()
    lease_cutoff = now - timedelta(seconds=settings.lease_timeout_s)
    queue_cutoff = now - timedelta(seconds=settings.requeue_after_s)
    expired = sql.expired_leases(index, beat_before=lease_cutoff)
    stale = sql.stale_queued(index, untouched_since=queue_cutoff)
    queue_of = {j.id: stored_job_queue(settings.queue_name, j.spec) for j in expired + stale}
    broker = inspect_broker(celery_app, {settings.queue_name, *queue_of.values()}) if queue_of else None
    for job in expired:
        _expired(index, celery_app, settings, job, queue_of[job.id], now, broker, report)
    for job in stale:
        if broker is not None and broker.holds(job.id, queue_cutoff.timestamp()):
            report.still_in_broker += 1
        elif not sql.mark_requeued(index, job, now):
            report.raced += 1
        elif _send(celery_app, job.id, queue_of[job.id], broker, queue_cutoff.timestamp(), report):
            report.requeued_lost += 1
            log.info("job %s: queued since %s, no message in the broker: re-enqueued", job.id, job.updated_at)
    _reconcile_shards(index, celery_app, settings, now, report)
    level = logging.INFO if report.changed or report.enqueue_errors else logging.DEBUG
    log.log(level, "reconcile: %s", report)
    return report


def _reconcile_shards(
    index: Index, app: Celery, settings: WorkerSettings, now: datetime, report: ReconcileReport
) -> None:
    """The shards of sharded bulk jobs (storage/index/shards.py), as jobs are reconciled: an
    expired shard lease is cancelled, failed past its attempts (failing the job) or queued and sent
    again (the dead worker's delivery dropped); a queued shard without a message is sent again; a
    job none of whose shards is left to run (all succeeded, or it stopped) and that nobody finalized
    gets its finalize message (again)."""
    lease_cutoff = now - timedelta(seconds=settings.lease_timeout_s)
    queue_cutoff = now - timedelta(seconds=settings.requeue_after_s)
    expired = shard_sql.expired_shards(index, beat_before=lease_cutoff)
    stale = shard_sql.stale_queued_shards(index, untouched_since=queue_cutoff)
    unfinalized = shard_sql.unfinalized(index, untouched_since=queue_cutoff)
    if not (expired or stale or unfinalized):
        return
    job_ids = {s.job_id for s in expired + stale} | set(unfinalized)
    queue_of = {j: stored_job_queue(settings.queue_name, index.get_job(j).spec) for j in sorted(job_ids)}
    broker = inspect_broker(app, {settings.queue_name, *queue_of.values()})
    for shard in expired:
        key = shard_key(shard.job_id, shard.shard)
        outcome = shard_sql.expire_shard(index, shard, now)
        who = f"job {shard.job_id} shard {shard.shard}: lease of {shard.lease_worker} expired"
        if outcome is None:
            report.raced += 1
        elif outcome in (shard_sql.CANCELLED, shard_sql.FAILED):
            if outcome == shard_sql.CANCELLED:
                report.cancelled_expired += 1
            else:
                report.failed_expired += 1
                log.warning(
                    "%s on attempt %d of %d: failed, and the job with it",
                    who, shard.attempts, shard.max_attempts,
                )  # fmt: skip
            if shard_sql.finalize_due(index, shard.job_id):  # it was the last to stop: finalize now
                _send_finalize(app, shard.job_id, queue_of[shard.job_id], report)
        else:
            report.requeued_expired += 1
            log.info("%s on attempt %d of %d: queued again", who, shard.attempts, shard.max_attempts)
            beat = (shard.heartbeat_at or lease_cutoff).timestamp()
            if broker is None or not broker.holds(key, beat):
                _send_shard(app, shard.job_id, shard.shard, queue_of[shard.job_id], broker, beat, report)
    for shard in stale:
        key = shard_key(shard.job_id, shard.shard)
        if broker is not None and broker.holds(key, queue_cutoff.timestamp()):
            report.still_in_broker += 1
            continue
        shard_sql.touch_shard(index, shard.job_id, shard.shard, now)
        queue = queue_of[shard.job_id]
        if _send_shard(app, shard.job_id, shard.shard, queue, broker, queue_cutoff.timestamp(), report):
            report.requeued_lost += 1
    for job_id in unfinalized:
        if broker is not None and broker.holds(f"{job_id}:finalize", queue_cutoff.timestamp()):
            report.still_in_broker += 1
            continue
        shard_sql.touch_job(index, job_id, now)
        if _send_finalize(app, job_id, queue_of[job_id], report):
            report.requeued_lost += 1
            log.info("job %s: no shard left to run, not finalized: finalize sent again", job_id)


def _send_finalize(app: Celery, job_id: str, queue: str, report: ReconcileReport) -> bool:
    try:
        enqueue_finalize(app, job_id, queue=queue)
    except Exception:
        log.warning("job %s: finalize not sent; retried later", job_id, exc_info=True)
        report.enqueue_errors += 1
        return False
    return True


def _send_shard(
    app: Celery,
    job_id: str,
    shard: int,
    queue: str,
    broker: BrokerView | None,
    live_after: float,
    report: ReconcileReport,
) -> bool:
    try:
        stale = broker.stale(shard_key(job_id, shard), live_after) if broker is not None else []
        if stale:
            drop_deliveries(app, stale)
        enqueue_shard(app, job_id, shard, queue=queue)
    except Exception:
        log.warning("job %s shard %d: re-enqueue failed; retried later", job_id, shard, exc_info=True)
        report.enqueue_errors += 1
        return False
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m worker.reconciler",
        description="Re-enqueue lost jobs and expire dead leases (QKVAULT_* settings; docs/reliability.md).",
    )
    parser.add_argument("--once", action="store_true", help="run one pass and exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = WorkerSettings()
    index = Index(settings.database_url, retry=IndexRetry(budget_s=settings.db_retry_s))
    app = create_celery_app(settings)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    log.info(
        "reconciler: every %g s, lease timeout %g s, requeue after %g s, queue %s",
        settings.reconcile_interval_s,
        settings.lease_timeout_s,
        settings.requeue_after_s,
        settings.queue_name,
    )
    while not stop.is_set():
        try:
            reconcile_once(index, app, settings)
        except Exception:  # the database or broker is down: try again next interval
            log.exception("reconcile pass failed; next try in %g s", settings.reconcile_interval_s)
        if args.once:
            break
        stop.wait(settings.reconcile_interval_s)
    index.dispose()


if __name__ == "__main__":
    main()
