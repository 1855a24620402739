"""A finished micro-batch's device work on the drain thread: after the work the forward thread had
queued when it marked, on a side stream, not behind what it queued later (worker/capture/sidestream.py)."""

from __future__ import annotations

import threading

import pytest
import torch

from worker.capture.hostcopy import read_to_host
from worker.capture.sidestream import after_mark, mark_queued, side_stream


def test_off_cuda_the_mark_is_empty_and_the_block_runs_as_it_is() -> None:
    mark = mark_queued(torch.device("cpu"))
    assert not mark.events
    with after_mark(mark) as waited_s:
        value = torch.arange(4).sum().item()
    assert waited_s == 0.0 and value == 6


def test_off_cuda_a_read_to_the_host_is_the_tensor_itself() -> None:
    values = torch.arange(6).reshape(2, 3)
    assert torch.equal(read_to_host(values), values)


def test_an_error_in_the_block_propagates() -> None:
    with pytest.raises(ValueError, match="drain failed"), after_mark(mark_queued(torch.device("cpu"))):
        raise ValueError("drain failed")


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@needs_cuda
def test_the_drain_sees_the_marked_work_and_runs_on_its_side_stream() -> None:
    device = torch.device("cuda")
    x = torch.zeros(1 << 20, device=device)
    # a page-locked allocation orders the device's streams: take the scalar's block beforehand, as
    # a worker's drains have theirs cached after the first micro-batches
    read_to_host(x.sum())
    # the side stream's first use waits for the whole device once a process (measured on an H100:
    # a first drain entered only after the work queued later was done; a second did not): use it
    # beforehand, as a worker's first micro-batch does
    with after_mark(mark_queued(device)):
        read_to_host(x.sum())
    torch.cuda._sleep(200_000_000)  # ≈ 0.1 s of queued device work before the write below
    x.add_(1.0)
    mark = mark_queued(device)
    later = torch.cuda.Event()
    torch.cuda._sleep(2_000_000_000)  # the next micro-batch's work: queued after the mark
    later.record()
    seen: dict[str, object] = {}

    def drain() -> None:
        with torch.inference_mode(), after_mark(mark) as waited_s:
            seen["stream"] = torch.cuda.current_stream(device)
            seen["sum"] = float(read_to_host(x.sum()))  # reads the marked write, not before it
            seen["later_done"] = later.query()  # the drain did not wait for the later work
            seen["waited"] = waited_s
        seen["after"] = torch.cuda.current_stream(device)

    thread = threading.Thread(target=drain)
    thread.start()
    thread.join(60)
    assert seen["sum"] == float(1 << 20)
    assert seen["stream"] == side_stream(torch.cuda.current_device())
    assert seen["after"] == torch.cuda.default_stream(device)  # the side stream only inside the block
    assert seen["later_done"] is False and isinstance(seen["waited"], float) and seen["waited"] > 0
    torch.cuda.synchronize()
