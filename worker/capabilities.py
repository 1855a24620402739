"""What this worker process can place a model on, probed once and reported to Redis while it lives.

:func:`probe_capabilities` reads the devices the process sees (the GPUs ``CUDA_VISIBLE_DEVICES``
leaves it, with their memory; none when ``QKVAULT_DEVICE`` is ``cpu``) and whether accelerate and
bitsandbytes import. :class:`CapabilityReporter` writes it to Redis (:mod:`storage.models.workers`)
at start and every ``heartbeat_interval_s``, with a TTL of ``lease_timeout_s``.

Nothing here imports torch at import time: ``python -m worker``'s prefork parent imports this
module. ``python -m worker`` starts the reporter in its pool child (:func:`connect_capability_reports`, on
Celery's ``worker_process_init``): the child is where models load, so CUDA is initialised there and
never in the prefork parent; the probe runs on the reporter's thread, so the child answers Celery's
start-up handshake at once. :func:`check_placement_here` is the worker's own check before it loads
a model: a placement this process cannot honour fails the job with ``placement-unavailable``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
import socket
import threading
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from storage.models.placement import (
    GpuInfo,
    Placement,
    PlacementUnavailable,
    WorkerCapabilities,
    is_placed,
    unmet_needs,
)
from storage.models.workers import publish, withdraw
from worker.settings import WorkerSettings

log = logging.getLogger(__name__)

REDIS_TIMEOUT_S = 5.0  # one report's connect/read timeout; a missed report is retried next beat


def _package(name: str) -> tuple[str | None, str | None]:
    """(version, None) when ``name`` imports here, else (None, why not)."""
    try:
        importlib.import_module(name)
    except Exception as exc:  # an ImportError, or a native library that fails to load
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        return None, f"{name}: {type(exc).__name__}: {first}"
    try:
        return version(name), None
    except PackageNotFoundError:
        return "unknown", None


def probe_capabilities(device_setting: str) -> WorkerCapabilities:
    """This process's devices and packages (initialises CUDA when the device setting allows it)."""
    import torch

    from worker.models import pick_device

    device = pick_device(device_setting)
    gpus: list[GpuInfo] = []
    if device.type == "cuda" and torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            gpus.append(GpuInfo(index, str(props.name), int(props.total_memory)))
    accelerate, accelerate_note = _package("accelerate")
    bnb, bnb_note = _package("bitsandbytes")
    return WorkerCapabilities(
        device=str(device),
        gpus=tuple(gpus),
        accelerate=accelerate,
        bitsandbytes=bnb,
        torch=torch.__version__,
        notes=tuple(n for n in (accelerate_note, bnb_note) if n),
    )


@functools.lru_cache(maxsize=4)
def local_capabilities(device_setting: str) -> WorkerCapabilities:
    """:func:`probe_capabilities`, once per process and device setting."""
    return probe_capabilities(device_setting)


def check_placement_here(placement: Placement, device_setting: str) -> None:
    """Raise :class:`PlacementUnavailable` when this process cannot place the model as asked."""
    if not is_placed(placement):
        return
    caps = local_capabilities(device_setting)
    unmet = unmet_needs(placement, caps)
    if unmet:
        reasons = "; ".join(u.message for u in unmet)
        raise PlacementUnavailable(
            f"this worker cannot place the model as the job asks: {reasons} (this worker: "
            f"{caps.summary()}). Fix: submit the job with a placement a worker has, or run it on a worker "
            "that has this one (docs/operations.md, 'Model placement')",
            detail={"field": unmet[0].field, "fields": sorted({u.field for u in unmet})},
        )


def worker_id() -> str:
    """The id this process's leases carry too (``worker.tasks.WorkerState.worker_id``)."""
    return f"{socket.gethostname()}:{os.getpid()}"


class CapabilityReporter:
    """A daemon thread: probe once, then write the report every ``interval_s`` until :meth:`stop`."""

    def __init__(self, settings: WorkerSettings, client: Any | None = None) -> None:
        self.settings = settings
        self.worker_id = worker_id()
        self._client = client
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="qkvault-capabilities", daemon=True)
        self.caps: WorkerCapabilities | None = None
        self.reports = 0

    def _redis(self) -> Any:
        if self._client is None:
            import redis

            self._client = redis.Redis.from_url(
                self.settings.redis_url,
                socket_connect_timeout=REDIS_TIMEOUT_S,
                socket_timeout=REDIS_TIMEOUT_S,
            )
        return self._client

    def start(self) -> CapabilityReporter:
        self._thread.start()
        return self

    def report_once(self) -> None:
        if self.caps is None:
            self.caps = local_capabilities(self.settings.device)
            log.info("worker %s capabilities: %s", self.worker_id, self.caps.summary())
        publish(
            self._redis(), self.settings.queue_name, self.worker_id, self.caps, self.settings.lease_timeout_s
        )
        self.reports += 1

    def _run(self) -> None:
        while True:
            try:
                self.report_once()
            except Exception as exc:  # Redis down: try again next beat, the key expires meanwhile
                log.warning("worker capabilities not reported (%s: %s)", type(exc).__name__, exc)
            if self._stop.wait(self.settings.heartbeat_interval_s):
                return

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop reporting and delete the report (best effort: it expires anyway)."""
        self._stop.set()
        self._thread.join(timeout_s)
        with contextlib.suppress(Exception):
            withdraw(self._redis(), self.settings.queue_name, self.worker_id)


def connect_capability_reports(settings: WorkerSettings) -> None:
    """Start a :class:`CapabilityReporter` in each pool child of ``python -m worker`` (Celery signals
    ``worker_process_init`` / ``worker_process_shutdown``)."""
    from celery.signals import worker_process_init, worker_process_shutdown

    running: list[CapabilityReporter] = []

    def started(**_: Any) -> None:
        running.append(CapabilityReporter(settings).start())

    def stopping(**_: Any) -> None:
        while running:
            running.pop().stop()

    worker_process_init.connect(started, weak=False)
    worker_process_shutdown.connect(stopping, weak=False)
