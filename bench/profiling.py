"""Operator tables of a benchmark's timed runs (``--profile DIR``): what a mode spends its time on,
for the next change, not its speed (the profiler's own cost is in the timings of a profiled run);
on a GPU also where it sat idle and what the host did then (:mod:`bench.idle`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from bench.idle import idle_report, spans_of

TABLE_ROWS = 30


@contextmanager
def profiled(device: torch.device, out: Path | None, name: str, *, stacks: bool = False) -> Iterator[None]:
    """The block under ``torch.profiler`` when ``out`` is set: ``out/<name>.txt`` gets its operators
    by self CPU time (the host's share: Python, launches, waits) and, on a GPU, by self CUDA time,
    with their call counts; on a GPU ``out/<name>-idle.txt`` gets the device's idle gaps by what
    ended them (:func:`bench.idle.idle_report`), named by their Python frames too with ``stacks``
    (``with_stack``: every Python call traced, a much slower host). Without ``out`` the block runs
    as it is."""
    if out is None:
        yield
        return
    from torch.profiler import ProfilerActivity, profile

    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities, with_stack=stacks) as prof:
        yield
        if on_gpu:
            torch.cuda.synchronize(device)
    averages = prof.key_averages()
    sections = [
        f"# {name}: by self CPU time\n",
        averages.table(sort_by="self_cpu_time_total", row_limit=TABLE_ROWS),
    ]
    if on_gpu:
        sections += [
            f"\n# {name}: by self CUDA time\n",
            averages.table(sort_by="self_cuda_time_total", row_limit=TABLE_ROWS),
        ]
    out.mkdir(parents=True, exist_ok=True)
    stem = name.replace(" ", "-")
    (out / f"{stem}.txt").write_text("".join(sections) + "\n", encoding="utf-8")
    if on_gpu:
        report = idle_report(spans_of(prof.profiler.kineto_results.events()))
        (out / f"{stem}-idle.txt").write_text(report.text(name), encoding="utf-8")
