"""Where a GPU sat idle in a profiled run, and what its host was doing then (``--profile``).

A timed mode's GPU busy share (:mod:`bench.gpubusy`) says *that* the GPU waited, not *for what*.
From the profiler's events, :func:`idle_report` finds every gap of at least ``min_gap_ns`` between
the device's activities (kernels, copies, fills; overlapping activities merged) and names each one
by the work that ended it: the host operation that launched it (the innermost operator, and the
Python frames of this repository or of the model's code that were running then when the profile
traced Python calls: ``--profile-stacks``, a much slower host), or "launched before the gap" when
the work was queued in time and waited for something else (another stream, an event). It also lists
the host's synchronising calls that ended inside a gap (a host that waits for the device empties the
launch queue: the GPU then waits for the host's next launches). Gaps are summed per label; the
labels with the most idle time come first.

:func:`spans_of` turns ``torch.profiler``'s events into the plain :class:`Span` records the report
reads, so the report itself is tested on spans written by hand (tests/test_bench_idle.py).
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

# host calls that wait for the device (the CUDA runtime's and driver's names)
SYNC_CALLS = (
    "cudaDeviceSynchronize",
    "cudaStreamSynchronize",
    "cudaEventSynchronize",
    "cudaMemcpy",  # the synchronous form
    "cuStreamSynchronize",
    "cuEventSynchronize",
    "cuCtxSynchronize",
)
# frames worth naming in a label: this repository's packages and the model's code
LABEL_FRAMES = ("worker/", "storage/", "bench/", "qkvault/", "transformers/models/")
FRAMES_PER_LABEL = 2
DEFAULT_MIN_GAP_NS = 20_000  # shorter gaps are a launch's ordinary latency
TOP_LABELS = 25
LABEL_CHARS = 160  # a kernel's templated C++ name runs to hundreds of characters: its start says it


@dataclass(frozen=True)
class Span:
    """One profiler event: ``[start_ns, end_ns)`` on a host thread (``thread``) or the device
    (``device=True``); ``correlation``: the event's own id (a device activity shares it with the
    runtime call that launched it), ``linked``: the id of the operator it belongs to (a device
    activity's or a runtime call's; 0 for an operator); ``python``: a traced Python call (its name
    says the file, line and function), else an operator or a runtime call."""

    name: str
    start_ns: int
    end_ns: int
    thread: int = 0
    device: bool = False
    correlation: int = 0
    linked: int = 0
    python: bool = False


@dataclass
class IdleRow:
    """One label's gaps: how many, their idle nanoseconds."""

    label: str
    gaps: int = 0
    idle_ns: int = 0


@dataclass
class IdleReport:
    """The device's busy and idle time between its first and last activity, and the idle time by
    what ended each gap (``waited_for``), by the device work before it (``after``) and by the host
    synchronisations that ended inside one (``syncs``)."""

    window_ns: int = 0
    busy_ns: int = 0
    idle_ns: int = 0
    gaps: int = 0
    waited_for: list[IdleRow] = field(default_factory=list)
    after: list[IdleRow] = field(default_factory=list)
    syncs: list[IdleRow] = field(default_factory=list)

    def text(self, title: str, top: int = TOP_LABELS) -> str:
        if not self.window_ns:
            return f"# {title}: no device activity recorded\n"
        share = 100 * self.idle_ns / self.window_ns
        lines = [
            f"# {title}: device idle {self.idle_ns / 1e9:.3f} s of {self.window_ns / 1e9:.3f} s "
            f"({share:.1f}%) in {self.gaps:,} gaps; busy {self.busy_ns / 1e9:.3f} s",
        ]
        for heading, rows in (
            ("waiting for (the launch that ended the gap)", self.waited_for),
            ("after (the device work before the gap)", self.after),
            ("host synchronisations that ended inside a gap", self.syncs),
        ):
            lines += ["", f"## {heading}", "| idle s | gaps | label |", "|---|---|---|"]
            lines += [f"| {r.idle_ns / 1e9:.3f} | {r.gaps:,} | {_shown(r.label)} |" for r in rows[:top]]
        return "\n".join(lines) + "\n"


def _runtime_call(span: Span) -> bool:
    """A CUDA runtime or driver call (``cudaLaunchKernel``, ``cuLaunchKernel``, a synchronisation)."""
    return not span.python and span.name.startswith("cu")


def _shown(label: str) -> str:
    return label if len(label) <= LABEL_CHARS else label[: LABEL_CHARS - 1] + "…"


class _Enclosing:
    """The host spans of each thread that enclose a time, innermost first (spans nest on a thread:
    each one's parent is found once, so a lookup walks up one call chain)."""

    def __init__(self, spans: Iterable[Span]) -> None:
        self._by_thread: dict[int, tuple[list[int], list[Span], list[int]]] = {}
        grouped: dict[int, list[Span]] = {}
        for span in spans:
            grouped.setdefault(span.thread, []).append(span)
        for thread, items in grouped.items():
            items.sort(key=lambda s: (s.start_ns, -s.end_ns))
            parents: list[int] = []
            open_: list[int] = []  # the spans enclosing the current one, outermost first
            for i, span in enumerate(items):
                while open_ and items[open_[-1]].end_ns < span.end_ns:
                    open_.pop()
                parents.append(open_[-1] if open_ else -1)
                open_.append(i)
            self._by_thread[thread] = ([s.start_ns for s in items], items, parents)

    def chain(self, thread: int, t_ns: int) -> list[Span]:
        starts, items, parents = self._by_thread.get(thread, ([], [], []))
        i = bisect.bisect_right(starts, t_ns) - 1
        out = []
        while i >= 0:
            if items[i].end_ns >= t_ns:
                out.append(items[i])
            i = parents[i]
        return out


def _label(chain: Sequence[Span], fallback: str) -> str:
    """The innermost operator of ``chain`` (or ``fallback``) and its innermost Python frames of
    :data:`LABEL_FRAMES`."""
    op = next((s.name for s in chain if not s.python), fallback)
    frames = [s.name for s in chain if s.python and any(part in s.name for part in LABEL_FRAMES)]
    return op + (" @ " + " < ".join(frames[:FRAMES_PER_LABEL]) if frames else "")


def _add(rows: dict[str, IdleRow], label: str, idle_ns: int) -> None:
    row = rows.setdefault(label, IdleRow(label))
    row.gaps += 1
    row.idle_ns += idle_ns


def _sorted(rows: dict[str, IdleRow]) -> list[IdleRow]:
    return sorted(rows.values(), key=lambda r: -r.idle_ns)


def idle_report(spans: Sequence[Span], min_gap_ns: int = DEFAULT_MIN_GAP_NS) -> IdleReport:
    """The device's idle gaps in ``spans`` (module docstring), each at least ``min_gap_ns`` long."""
    device = sorted((s for s in spans if s.device), key=lambda s: s.start_ns)
    host = [s for s in spans if not s.device]
    report = IdleReport()
    if not device:
        return report
    # what queued each device activity: its runtime call (the same id) where recorded, else the
    # operator it belongs to
    runtime = {s.correlation: s for s in host if s.correlation and _runtime_call(s)}
    operators = {s.correlation: s for s in host if s.correlation and not (s.python or _runtime_call(s))}
    ops = _Enclosing(s for s in host if not _runtime_call(s))
    syncs = sorted((s for s in host if s.name in SYNC_CALLS), key=lambda s: s.end_ns)
    sync_ends = [s.end_ns for s in syncs]
    waited: dict[str, IdleRow] = {}
    after: dict[str, IdleRow] = {}
    synced: dict[str, IdleRow] = {}
    busy_end, last = device[0].end_ns, device[0]
    report.window_ns = max(s.end_ns for s in device) - device[0].start_ns
    busy = device[0].end_ns - device[0].start_ns
    for span in device[1:]:
        gap = span.start_ns - busy_end
        if gap >= min_gap_ns:
            report.gaps += 1
            report.idle_ns += gap
            _add(after, last.name, gap)
            launch = runtime.get(span.correlation) or operators.get(span.linked)
            if launch is None:
                label = f"{span.name} (launch not recorded)"
            elif (launch.start_ns if _runtime_call(launch) else launch.end_ns) <= busy_end:
                label = f"{span.name} (launched before the gap: waited for another stream or event)"
            else:
                label = _label(ops.chain(launch.thread, launch.start_ns), f"{span.name} ({launch.name})")
            _add(waited, label, gap)
            first = bisect.bisect_left(sync_ends, busy_end)
            for sync in syncs[first : bisect.bisect_right(sync_ends, span.start_ns)]:
                _add(synced, f"{sync.name}: {_label(ops.chain(sync.thread, sync.start_ns), '?')}", gap)
        if span.end_ns > busy_end:
            busy += span.end_ns - max(busy_end, span.start_ns)
            busy_end, last = span.end_ns, span
    report.busy_ns = busy
    report.waited_for, report.after, report.syncs = _sorted(waited), _sorted(after), _sorted(synced)
    return report


_PYTHON_CALL = re.compile(r"\.py\(\d+\): ")  # a traced call's name: "file.py(line): function"


def _is_python(event: Any) -> bool:
    """Whether a kineto event is a traced Python call (older torch has no flag: its name says)."""
    flag = getattr(event, "is_python_function", None)
    return bool(flag()) if flag is not None else bool(_PYTHON_CALL.search(str(event.name())))


def spans_of(events: Iterable[Any]) -> list[Span]:
    """``torch.profiler`` kineto events (``prof.profiler.kineto_results.events()``) as spans, each
    with its own id and its operator's (as torch's own post-processing links a device activity to
    an operator: ``linked_correlation_id``), traced Python calls (``with_stack=True``) marked."""
    spans = []
    for event in events:
        on_device = str(event.device_type()).endswith("CUDA")
        start = int(event.start_ns())
        spans.append(
            Span(
                name=str(event.name()),
                start_ns=start,
                end_ns=start + int(event.duration_ns()),
                thread=int(event.start_thread_id()),
                device=on_device,
                correlation=int(event.correlation_id()),
                linked=int(event.linked_correlation_id()),
                python=_is_python(event),
            )
        )
    return spans
