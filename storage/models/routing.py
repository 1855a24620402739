"""Which Celery queue a job goes to, and which queues a worker consumes, by model placement —
declared once, torch-free, for the API, the worker and the reconciler (docs/operations.md, "Model
placement").

A job without placement options (:func:`storage.models.placement.is_placed` false) goes to the base
queue (``QKVAULT_QUEUE_NAME``), which every worker consumes. A placed job goes to the queue of its
:class:`Route`: the GPUs it needs (:func:`~storage.models.placement.gpus_needed`) and whether it
needs bitsandbytes; every placed job needs accelerate. ``<base>.accelerate`` (no GPU, no
bitsandbytes), ``<base>.gpus-<n>``, ``<base>.bnb``, ``<base>.gpus-<n>.bnb``. A worker that offers
accelerate consumes the queue of every route it can meet: ``gpus-1`` .. ``gpus-<its GPU count>``,
each with ``.bnb`` too when it offers bitsandbytes; so ``job_queue(p) in worker_queues(caps)``
exactly when :func:`~storage.models.placement.unmet_needs` has no need in :data:`ROUTED_NEEDS`
(tests/storage/test_routing.py checks it over a grid). A worker consumes at most ``2 + 2 x GPUs``
queues.

``max_memory_gib`` is checked, not routed: memory is a number per GPU, and a bounded set of queues
(memory buckets) would either send a job to a worker whose GPUs are too small or keep it from one
whose GPUs are large enough. Admission refuses a job whose memory no live worker has; a worker that
takes one its GPUs cannot hold fails it with ``placement-unavailable``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from storage.models.placement import Need, Placement, WorkerCapabilities, gpus_needed, is_placed
from storage.models.spec import ModelSpec

log = logging.getLogger(__name__)

ROUTED_NEEDS: frozenset[Need] = frozenset({"accelerate", "bitsandbytes", "gpus"})


@dataclass(frozen=True, order=True)
class Route:
    """What a placed job needs of a worker, beyond accelerate: ``gpus`` GPUs and bitsandbytes."""

    gpus: int = 0
    bitsandbytes: bool = False

    @property
    def suffix(self) -> str:
        parts = [f"gpus-{self.gpus}"] if self.gpus else []
        if self.bitsandbytes:
            parts.append("bnb")
        return ".".join(parts) or "accelerate"


def job_route(placement: Placement) -> Route | None:
    """The route of a placed job; None for a job without placement options (the base queue)."""
    if not is_placed(placement):
        return None
    return Route(gpus_needed(placement), placement.quantization is not None)


def queue_name(base: str, route: Route | None) -> str:
    return base if route is None else f"{base}.{route.suffix}"


def job_queue(base: str, placement: Placement) -> str:
    """The queue every task of a job with this placement is sent to (``base``: QKVAULT_QUEUE_NAME)."""
    return queue_name(base, job_route(placement))


def stored_job_queue(base: str, spec: Mapping[str, Any]) -> str:
    """:func:`job_queue` of a stored job spec (``jobs.spec``, the validated spec as JSON). A spec
    that no longer validates goes to the base queue: the worker that takes it fails it."""
    try:
        model = ModelSpec.model_validate(spec.get("model") or {})
    except ValidationError as exc:
        log.warning("stored job spec's model does not validate (%s); base queue", exc.errors()[:1])
        return base
    return job_queue(base, model)


def worker_routes(caps: WorkerCapabilities) -> list[Route]:
    """Every route a worker with ``caps`` meets (none without accelerate), in a canonical order."""
    if caps.accelerate is None:
        return []
    quantized = (False, True) if caps.bitsandbytes is not None else (False,)
    return [Route(gpus, bnb) for bnb in quantized for gpus in range(len(caps.gpus) + 1)]


def worker_queues(base: str, caps: WorkerCapabilities) -> list[str]:
    """The queues a worker with ``caps`` consumes: ``base`` first, then one per route it meets."""
    return [base, *(queue_name(base, route) for route in worker_routes(caps))]
