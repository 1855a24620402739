"""A finished micro-batch's device work on another thread, without stalling the next micro-batch.

A bulk job's drain thread computes the finished micro-batch's figures (per-head metrics, kv
compression, certificate) and reads them to the host while the forward thread queues the next
micro-batch's passes. Done on the device's current stream, that read waits for everything queued
there, the next micro-batch's kernels included, and the forward thread's own host-to-device
copies stalled behind it (measured on an H100: the next micro-batch's input upload waited the
whole 200-300 ms of the drain's read, and the GPU idled 23-44% of a bulk job): the forward thread
could no longer run ahead of the GPU.

So the forward thread marks where its micro-batch's work ends (:func:`mark_queued`: an event on
each CUDA device's current stream) and the drain, under :func:`after_mark`, first waits for that
event (its own thread only), then queues its work on a side stream of its own, concurrent with the
next micro-batch's kernels, and waits for that stream before it returns: tensors it frees
afterwards were used by no pending kernel. Off CUDA both are no-ops.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from worker.capture.hostcopy import sleeping_event


@dataclass(frozen=True)
class QueuedMark:
    """Events after the work queued so far on each CUDA device's current stream (none off CUDA);
    ``device``: the model's (first) device, whose side stream is made current last (entering a
    stream also makes its device the current one)."""

    events: dict[int, torch.cuda.Event] = field(default_factory=dict)
    device: int = 0


def mark_queued(device: torch.device) -> QueuedMark:
    """Mark the end of the work queued so far by this thread for a model on ``device``: on every
    CUDA device (a model placed over several GPUs) when ``device`` is one, else nothing."""
    if device.type != "cuda":
        return QueuedMark()
    events = {}
    for index in range(torch.cuda.device_count()):
        event = sleeping_event()  # the drain thread sleeps until the passes ran
        event.record(torch.cuda.current_stream(index))
        events[index] = event
    primary = device.index if device.index is not None else torch.cuda.current_device()
    return QueuedMark(events, primary)


_SIDE: dict[int, torch.cuda.Stream] = {}
_SIDE_LOCK = threading.Lock()


def side_stream(index: int) -> torch.cuda.Stream:
    """The process's side stream of CUDA device ``index`` (created on first use)."""
    with _SIDE_LOCK:
        stream = _SIDE.get(index)
        if stream is None:
            stream = _SIDE[index] = torch.cuda.Stream(index)
        return stream


@contextlib.contextmanager
def after_mark(mark: QueuedMark) -> Iterator[float]:
    """Run the block's device work after ``mark``'s, on side streams (module docstring); yields
    the seconds this thread waited for ``mark``'s work (0 off CUDA)."""
    if not mark.events:
        yield 0.0
        return
    t0 = time.perf_counter()
    for event in mark.events.values():
        event.synchronize()  # this thread only: no lock or stream the forward thread needs
    waited_s = time.perf_counter() - t0
    order = sorted(mark.events, key=lambda index: index == mark.device)  # the model's device last
    streams = [side_stream(index) for index in order]
    try:
        with contextlib.ExitStack() as stack:
            for stream in streams:
                stack.enter_context(torch.cuda.stream(stream))
            yield waited_s
    finally:
        for stream in streams:  # sleeping, not spinning, until the stream's work ran
            done = sleeping_event()
            done.record(stream)
            done.synchronize()
