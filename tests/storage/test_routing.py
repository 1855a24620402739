"""Routing by placement (storage/models/routing.py): a job's queue is among a worker's queues exactly
when the worker meets the job's routed needs (accelerate, bitsandbytes, GPU count), over every
valid placement of a grid and every worker of a grid; memory stays a check."""

from __future__ import annotations

import itertools
from typing import Any

from pydantic import ValidationError

from storage.models.placement import GIB, GpuInfo, WorkerCapabilities, unmet_needs
from storage.models.routing import (
    ROUTED_NEEDS,
    Route,
    job_queue,
    stored_job_queue,
    worker_queues,
)
from storage.models.spec import ModelSpec

BASE = "qk"


def _placements() -> list[ModelSpec]:
    """Every valid combination of a grid of the four placement fields (invalid ones are skipped)."""
    out = []
    grid = itertools.product(
        (None, "auto", "sequential"),
        (None, 1, 2, 3, 5),
        (None, {"0": 10}, {"1": 200}, {"cpu": 8}, {"0": 10, "2": 30}, {"3": 1}),
        (None, {"bits": 4}, {"bits": 8}),
    )
    for device_map, num_gpus, memory, quant in grid:
        try:
            out.append(
                ModelSpec(
                    id="org/name",
                    device_map=device_map,
                    num_gpus=num_gpus,
                    max_memory_gib=memory,
                    quantization=quant,
                )
            )
        except ValidationError:
            continue
    return out


def _workers() -> list[WorkerCapabilities]:
    out = []
    for gpus, accelerate, bnb in itertools.product(range(5), (None, "1.1"), (None, "0.45")):
        devices = tuple(GpuInfo(i, "gpu", (40 + 60 * (i % 2)) * GIB) for i in range(gpus))
        out.append(WorkerCapabilities("cuda" if gpus else "cpu", devices, accelerate, bnb))
    return out


def test_a_jobs_queue_is_consumed_exactly_by_the_workers_that_meet_its_routed_needs() -> None:
    placements, workers = _placements(), _workers()
    assert len(placements) > 60 and len(workers) == 20
    seen = {True: 0, False: 0}
    for placement in placements:
        queue = job_queue(BASE, placement)
        for caps in workers:
            routed = [u for u in unmet_needs(placement, caps) if u.need in ROUTED_NEEDS]
            consumed = queue in worker_queues(BASE, caps)
            assert consumed == (not routed), (placement, caps, queue, routed)
            seen[consumed] += 1
    assert min(seen.values()) > 100  # both outcomes happen, often


def test_queue_names_and_what_a_worker_consumes() -> None:
    assert job_queue(BASE, ModelSpec(id="o/n")) == BASE  # no placement: the base queue
    assert job_queue(BASE, ModelSpec(id="o/n", device_map="auto")) == "qk.accelerate"
    assert job_queue(BASE, ModelSpec(id="o/n", device_map="auto", num_gpus=2)) == "qk.gpus-2"
    assert job_queue(BASE, ModelSpec(id="o/n", device_map="auto", max_memory_gib={"2": 9})) == "qk.gpus-3"
    assert job_queue(BASE, ModelSpec(id="o/n", quantization={"bits": 8})) == "qk.bnb"
    four_bit_on_two = ModelSpec(id="o/n", device_map="auto", num_gpus=2, quantization={"bits": 4})
    assert job_queue(BASE, four_bit_on_two) == "qk.gpus-2.bnb"

    bare = WorkerCapabilities("cpu")
    assert worker_queues(BASE, bare) == [BASE]  # no accelerate: plain jobs only
    two = WorkerCapabilities("cuda", (GpuInfo(0, "g", GIB), GpuInfo(1, "g", GIB)), "1.1", "0.45")
    assert worker_queues(BASE, two) == [
        BASE,
        "qk.accelerate",
        "qk.gpus-1",
        "qk.gpus-2",
        "qk.bnb",
        "qk.gpus-1.bnb",
        "qk.gpus-2.bnb",
    ]
    assert Route(2, True).suffix == "gpus-2.bnb"


def test_memory_is_checked_not_routed() -> None:
    small = WorkerCapabilities("cuda", (GpuInfo(0, "g", 40 * GIB),), "1.1")
    big_memory = ModelSpec(id="o/n", device_map="auto", max_memory_gib={"0": 80})
    assert job_queue(BASE, big_memory) in worker_queues(BASE, small)
    assert [u.need for u in unmet_needs(big_memory, small)] == ["gpu_memory"]


def test_the_queue_of_a_stored_spec() -> None:
    stored: dict[str, Any] = {
        "model": ModelSpec(id="o/n", device_map="auto", num_gpus=2).model_dump(mode="json"),
        "prompts": ["x"],
    }
    assert stored_job_queue(BASE, stored) == "qk.gpus-2"
    assert stored_job_queue(BASE, {"model": {"id": "o/n"}}) == BASE
    # a stored model that no longer validates: the base queue (the worker fails the job there)
    assert stored_job_queue(BASE, {"model": {"id": "o/n", "num_gpus": 2}}) == BASE
