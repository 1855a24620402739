"""bench.idle: the device's idle gaps in a profile, named by what ended them (spans written by hand:
the report's arithmetic and labels; a real CPU profile: no device activity)."""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

from bench.idle import Span, idle_report, spans_of

US = 1_000  # nanoseconds


def _kernel(name: str, start_us: int, end_us: int, correlation: int, linked: int = 0) -> Span:
    return Span(name, start_us * US, end_us * US, device=True, correlation=correlation, linked=linked)


def _host(name: str, start_us: int, end_us: int, *, correlation: int = 0, python: bool = False) -> Span:
    return Span(name, start_us * US, end_us * US, thread=7, correlation=correlation, python=python)


def test_a_late_launch_is_named_by_its_kernel_and_the_repository_frames_around_it() -> None:
    spans = [
        _kernel("gemm", 0, 100, 1),
        _kernel("rows_kernel", 400, 500, 2),  # 300 µs idle: launched at 350 µs
        _host("cudaLaunchKernel", 10, 12, correlation=1),
        _host("bench/bulk.py(245): run_bulk", 0, 1000, python=True),
        _host("torch/nn/modules/module.py(1779): _wrapped_call_impl", 300, 380, python=True),
        _host("worker/capture/metrics.py(489): observe_qk", 310, 370, python=True),
        _host("worker/capture/fused_metrics.py(183): fused_row_metrics", 320, 360, python=True),
        _host("aten::empty", 330, 340),  # ended before the launch: not around it
        _host("cuLaunchKernel", 350, 352, correlation=2),
    ]
    report = idle_report(spans)
    assert (report.window_ns, report.busy_ns) == (500 * US, 200 * US)
    assert (report.idle_ns, report.gaps) == (300 * US, 1)
    [row] = report.waited_for
    assert row.label == (
        "rows_kernel (cuLaunchKernel) @ "
        "worker/capture/fused_metrics.py(183): fused_row_metrics < worker/capture/metrics.py(489): observe_qk"
    )
    assert (row.gaps, row.idle_ns) == (1, 300 * US)
    assert [(r.label, r.idle_ns) for r in report.after] == [("gemm", 300 * US)]
    assert report.syncs == []
    text = report.text("summary")
    assert "device idle 0.000 s of 0.001 s (60.0%) in 1 gaps" in text and "| 0.000 | 1 | gemm |" in text


def test_an_operator_inside_the_frames_names_the_launch() -> None:
    spans = [
        _kernel("a", 0, 10, 1),
        _kernel("index_add", 100, 110, 2),
        _host("worker/capture/metrics.py(584): _add_rows", 50, 95, python=True),
        _host("aten::index_add_", 60, 90),
        _host("cudaLaunchKernel", 70, 72, correlation=2),
    ]
    [row] = idle_report(spans).waited_for
    assert row.label == "aten::index_add_ @ worker/capture/metrics.py(584): _add_rows"


def test_short_gaps_overlaps_and_work_queued_in_time() -> None:
    spans = [
        _kernel("a", 0, 100, 1),
        _kernel("b", 50, 200, 2),  # overlaps a: merged
        _kernel("c", 210, 300, 3),  # 10 µs: a launch's latency, not a gap
        _kernel("d", 400, 450, 4),  # 100 µs gap, launched at 20 µs: waited for another stream
        _host("cudaLaunchKernel", 20, 21, correlation=4),
        _host("cudaStreamSynchronize", 250, 380),  # ended inside the gap
        _host("worker/bulk.py(147): wait", 240, 390, python=True),
    ]
    report = idle_report(spans)
    assert (report.busy_ns, report.idle_ns, report.gaps) == (340 * US, 100 * US, 1)
    assert [r.label for r in report.waited_for] == [
        "d (launched before the gap: waited for another stream or event)"
    ]
    assert [r.label for r in report.after] == ["c"]
    assert [(r.label, r.idle_ns) for r in report.syncs] == [
        ("cudaStreamSynchronize: ? @ worker/bulk.py(147): wait", 100 * US)
    ]


def test_a_cpu_profile_has_no_device_activity() -> None:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        torch.ones(8).sum()
    spans = spans_of(prof.profiler.kineto_results.events())
    assert spans and not any(s.device for s in spans)
    assert idle_report(spans).text("plain") == "# plain: no device activity recorded\n"


def test_a_kernel_linked_to_its_operator_is_named_by_it() -> None:
    """Without its runtime call recorded, the operator the kernel belongs to names the gap (a runtime
    call whose own id equals the operator's is not it), and one that ended before the gap means the
    work waited on the device."""
    spans = [
        _kernel("a", 0, 10, 1),
        _kernel("mm", 100, 110, 50, linked=5),  # aten::mm's (id 5), begun after the gap began
        _kernel("b", 200, 210, 60, linked=6),  # aten::add's (id 6), ended before this gap began
        _host("cudaLaunchKernel", 20, 21, correlation=5),  # another launch's own id: not mm's
        _host("aten::mm", 60, 95, correlation=5),
        _host("aten::add", 20, 30, correlation=6),
    ]
    report = idle_report(spans)
    assert [(r.label, r.idle_ns) for r in report.waited_for] == [
        ("aten::mm", 90 * US),
        ("b (launched before the gap: waited for another stream or event)", 90 * US),
    ]
    long_name = "void at::native::elementwise_kernel<128, 4, " + "x" * 400
    long = idle_report([_kernel("a", 0, 10, 1), _kernel(long_name, 100, 110, 2)]).text("t")
    assert long_name not in long and long_name[:100] in long and "…" in long


class _OldEvent:
    """A kineto event of a torch without ``is_python_function`` (the device's 2.11)."""

    def __init__(self, name: str, on_device: bool = False) -> None:
        self._name, self._device = name, on_device

    def name(self) -> str:
        return self._name

    def device_type(self) -> str:
        return "DeviceType.CUDA" if self._device else "DeviceType.CPU"

    def start_ns(self) -> int:
        return 1_000

    def duration_ns(self) -> int:
        return 500

    def correlation_id(self) -> int:
        return 3

    def linked_correlation_id(self) -> int:
        return 7

    def start_thread_id(self) -> int:
        return 9


def test_spans_of_a_torch_without_the_python_flag_tell_python_calls_by_name() -> None:
    spans = spans_of([_OldEvent("worker/capture/metrics.py(584): _add_rows"), _OldEvent("aten::add")])
    assert [(s.name, s.python, s.end_ns) for s in spans] == [
        ("worker/capture/metrics.py(584): _add_rows", True, 1_500),
        ("aten::add", False, 1_500),
    ]
    [kernel] = spans_of([_OldEvent("gemm", on_device=True)])
    assert kernel.device and (kernel.correlation, kernel.linked) == (3, 7) and not kernel.python
