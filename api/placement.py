"""Admission of a job's model placement (``model.device_map``, ``model.num_gpus``,
``model.max_memory_gib``, ``model.quantization``) against what the live workers report they have.

The workers of the queue this API sends jobs to each keep a report in Redis (their GPUs with
memory, whether accelerate and bitsandbytes import; :mod:`storage.models.workers`, written by
:mod:`worker.capabilities`, expiring ``QKVAULT_LEASE_TIMEOUT_S`` after a worker's last beat). A job
whose placement no live worker can honour is refused with 422 ``placement-unavailable``, naming
the field and the fix. When no worker has reported (none started yet, all gone) or Redis cannot be
read, the job is admitted and waits in its queue (:mod:`storage.models.routing`: only workers that
meet its GPU count and packages consume it) until such a worker starts; the worker checks again
before it loads the model (memory is checked, not routed) and fails the job with the same problem
type if it cannot honour the placement. A job without placement options is not checked (no Redis
round trip).
"""

from __future__ import annotations

import logging
from typing import Any

import redis

from api.problems import ApiProblem, field_error
from api.settings import ApiSettings
from storage.jobs.spec import JobSpec
from storage.models.placement import PlacementUnavailable, is_placed, placement_refusal
from storage.models.workers import live_reports

log = logging.getLogger(__name__)


def check_placement(spec: JobSpec, settings: ApiSettings, client: Any | None = None) -> None:
    """Raise a 422 ``placement-unavailable`` problem when live workers report and none of them can
    place ``spec.model`` as asked. ``client``: a ``redis.Redis`` (default: one on ``QKVAULT_REDIS_URL``)."""
    if not is_placed(spec.model):
        return
    own = client is None
    if client is None:
        timeout_s = settings.broker_timeout_s
        client = redis.Redis.from_url(
            settings.redis_url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s
        )
    try:
        reports = live_reports(client, settings.queue_name)
    except redis.RedisError as exc:  # the worker checks; the job waits in the queue meanwhile
        log.warning("placement not checked: worker reports unreadable (%s: %s)", type(exc).__name__, exc)
        return
    finally:
        if own:
            client.close()
    refusal = placement_refusal(spec.model, reports)
    if refusal is not None:
        raise _problem(refusal)


def _problem(refusal: PlacementUnavailable) -> ApiProblem:
    fields = refusal.detail.get("fields", [refusal.detail.get("field", "model")])
    return ApiProblem(
        422,
        refusal.problem_type,
        refusal.message,
        title="Placement unavailable",
        errors=[field_error(f"body.{name}", refusal.message, "placement_unavailable") for name in fields],
        extensions={k: v for k, v in refusal.detail.items() if k not in ("field", "fields")},
    )
