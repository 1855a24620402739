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

Routing (:mod:`storage.models.routing`): ``python -m worker`` starts consuming the base queue
(``-Q QKVAULT_QUEUE_NAME``); once the pool child has probed what it offers (its capabilities less the
packages ``QKVAULT_PLACEMENT_PACKAGES`` leaves out), the reporter asks its own Celery node to consume
the queue of every route it meets (Celery remote control ``add_consumer``, sent to this node only,
retried until the node answers) and reports the queues it consumes.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
import socket
import threading
from collections.abc import Callable, Collection
from dataclasses import replace
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
from storage.models.routing import worker_queues
from storage.models.workers import publish, withdraw
from worker.settings import PlacementPackage, WorkerSettings

log = logging.getLogger(__name__)

REDIS_TIMEOUT_S = 5.0  # one report's connect/read timeout; a missed report is retried next beat
SUBSCRIBE_TIMEOUT_S = 1.0  # wait for this node's answer to add_consumer
SUBSCRIBE_RETRY_S = 0.5  # while a queue is not consumed yet, try again this soon (or at the next beat)
PLACEMENT_PACKAGES: tuple[PlacementPackage, ...] = ("accelerate", "bitsandbytes")


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


def offered(caps: WorkerCapabilities, packages: Collection[PlacementPackage] | None) -> WorkerCapabilities:
    """``caps`` less the placement packages not in ``packages`` (``QKVAULT_PLACEMENT_PACKAGES``;
    None: all of them), each withheld one named in ``notes``."""
    if packages is None:
        return caps
    withheld = [name for name in PLACEMENT_PACKAGES if name not in packages and getattr(caps, name)]
    if not withheld:
        return caps
    notes = tuple(f"{name}: not offered (QKVAULT_PLACEMENT_PACKAGES)" for name in withheld)
    return replace(
        caps,
        accelerate=None if "accelerate" in withheld else caps.accelerate,
        bitsandbytes=None if "bitsandbytes" in withheld else caps.bitsandbytes,
        notes=caps.notes + notes,
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


Subscribe = Callable[[str], bool]  # ask this worker's Celery node to consume a queue; True: it does


class CapabilityReporter:
    """A daemon thread: probe once, subscribe this worker to the queues of the routes it meets
    (``subscribe``; None: no Celery node, report only), then write the report every
    ``heartbeat_interval_s`` until :meth:`stop`."""

    def __init__(
        self, settings: WorkerSettings, client: Any | None = None, subscribe: Subscribe | None = None
    ) -> None:
        self.settings = settings
        self.worker_id = worker_id()
        self._client = client
        self._subscribe = subscribe
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="qkvault-capabilities", daemon=True)
        self.caps: WorkerCapabilities | None = None
        self.wanted: list[str] = []  # the queues of the routes it meets
        self.consuming: list[str] = [settings.queue_name]  # python -m worker's -Q
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

    @property
    def subscribed(self) -> bool:
        return self._subscribe is None or set(self.wanted) <= set(self.consuming)

    def subscribe_once(self) -> None:
        """Ask the node to consume each wanted queue it does not yet; stop at the first refusal."""
        if self._subscribe is None:
            return
        for queue in self.wanted:
            if queue in self.consuming:
                continue
            if not self._subscribe(queue):
                log.info("worker %s: queue %s not consumed yet; retrying", self.worker_id, queue)
                return
            self.consuming.append(queue)

    def report_once(self) -> None:
        if self.caps is None:
            self.caps = offered(local_capabilities(self.settings.device), self.settings.placement_packages)
            self.wanted = worker_queues(self.settings.queue_name, self.caps)
            log.info(
                "worker %s capabilities: %s; queues %s",
                self.worker_id,
                self.caps.summary(),
                ", ".join(self.wanted),
            )
        try:
            self.subscribe_once()
        finally:
            publish(
                self._redis(),
                self.settings.queue_name,
                self.worker_id,
                self.caps,
                self.settings.lease_timeout_s,
                queues=self.consuming,
            )
            self.reports += 1

    def _run(self) -> None:
        while True:
            try:
                self.report_once()
            except Exception as exc:  # Redis down: try again next beat, the key expires meanwhile
                log.warning("worker capabilities not reported (%s: %s)", type(exc).__name__, exc)
            interval_s = self.settings.heartbeat_interval_s
            if self._stop.wait(interval_s if self.subscribed else min(interval_s, SUBSCRIBE_RETRY_S)):
                return

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop reporting and delete the report (best effort: it expires anyway)."""
        self._stop.set()
        if self._thread.ident is not None:  # started
            self._thread.join(timeout_s)
        with contextlib.suppress(Exception):
            withdraw(self._redis(), self.settings.queue_name, self.worker_id)


def node_subscriber(app: Any, node: str) -> Subscribe:
    """Ask Celery node ``node`` (``celery@host``) to consume a queue: remote control
    ``add_consumer`` to that node alone; True once it answers (``ok``: it consumes it, or already
    did). The node keeps the queue across broker reconnects (``app.amqp.queues``)."""

    def subscribe(queue: str) -> bool:
        replies = app.control.add_consumer(
            queue, destination=[node], reply=True, timeout=SUBSCRIBE_TIMEOUT_S, limit=1
        )
        return any("ok" in (reply.get(node) or {}) for reply in replies or [])

    return subscribe


def connect_capability_reports(settings: WorkerSettings, app: Any) -> None:
    """Start a :class:`CapabilityReporter` in each pool child of ``python -m worker`` (Celery signals
    ``worker_process_init`` / ``worker_process_shutdown``), subscribing the node (its name taken in
    the parent from ``celeryd_after_setup``) to the queues of its routes."""
    from celery.signals import celeryd_after_setup, worker_process_init, worker_process_shutdown

    node: list[str] = []
    running: list[CapabilityReporter] = []

    def named(sender: str, **_: Any) -> None:
        node.append(sender)

    def started(**_: Any) -> None:
        subscribe = node_subscriber(app, node[-1]) if node else None
        running.append(CapabilityReporter(settings, subscribe=subscribe).start())

    def stopping(**_: Any) -> None:
        while running:
            running.pop().stop()

    celeryd_after_setup.connect(named, weak=False)
    worker_process_init.connect(started, weak=False)
    worker_process_shutdown.connect(stopping, weak=False)
