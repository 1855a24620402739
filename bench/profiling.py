"""Operator tables of a benchmark's timed runs (``--profile DIR``): what a mode spends its time on,
for the next change, not its speed (the profiler's own cost is in the timings of a profiled run)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

TABLE_ROWS = 30


@contextmanager
def profiled(device: torch.device, out: Path | None, name: str) -> Iterator[None]:
    """The block under ``torch.profiler`` when ``out`` is set: ``out/<name>.txt`` gets its operators
    by self CPU time (the host's share: Python, launches, waits) and, on a GPU, by self CUDA time,
    with their call counts. Without ``out`` the block runs as it is."""
    if out is None:
        yield
        return
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        yield
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    averages = prof.key_averages()
    sections = [
        f"# {name}: by self CPU time\n",
        averages.table(sort_by="self_cpu_time_total", row_limit=TABLE_ROWS),
    ]
    if device.type == "cuda":
        sections += [
            f"\n# {name}: by self CUDA time\n",
            averages.table(sort_by="self_cuda_time_total", row_limit=TABLE_ROWS),
        ]
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name.replace(' ', '-')}.txt").write_text("".join(sections) + "\n", encoding="utf-8")
