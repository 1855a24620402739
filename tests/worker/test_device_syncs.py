"""The capture's forward-thread path must not wait for the GPU once per (layer, sequence).

A GPU run cannot happen here, so the "device" is PyTorch's ``meta`` device: its tensors have shapes
but no data, so every place that would read device data on the host — a ``.item()`` / ``int()`` /
``bool()`` of a device tensor, a ``nonzero``, a blocking copy to the host — is seen by a dispatch
mode that counts it (and returns a placeholder so the path runs on). On a GPU each of them is a
synchronisation that drains the launch queue; issue 13 measured summary-only bulk jobs at 0.03× of
plain inference on an H200, with four such waits per (layer, sequence) of every micro-batch.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from storage.bundle.labels import SummaryParams
from storage.jobs.layout import layout_for_job
from storage.jobs.spec import JobSpec
from storage.models.facts import ModelFacts
from worker.capture import metrics as metrics_module
from worker.capture.certify import SAMPLE_SEQUENCES, Certifier
from worker.capture.hook import AttentionCall
from worker.capture.metrics import HeadMetricsAccumulator
from worker.capture.session import ExportSession

META = torch.device("meta")
# reads of device data on the host; a copy to the CPU (``to`` / ``_to_copy``) counts when blocking
_READS = {"_local_scalar_dense", "nonzero", "is_nonzero", "equal", "allclose"}


class _MadeOnDevice(TorchFunctionMode):
    """Counts tensors made on ``meta`` ("device") from host data (``torch.tensor(..., device=)``): on
    CUDA that is a copy from pageable memory, which waits for the work queued before it."""

    def __init__(self, counts: Counter[str]) -> None:
        super().__init__()
        self.counts = counts

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        made = getattr(func, "__name__", "") in ("tensor", "as_tensor")
        if made and kwargs.get("device") is not None and torch.device(kwargs["device"]) == META:
            self.counts["tensor made on the device from host data"] += 1
        return func(*args, **kwargs)


class DeviceReads(TorchDispatchMode):
    """Counts every host read of ``meta`` ("device") data by op name, and every copy of host data
    to it that would wait for the device (blocking, or made there from host data)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocking: Counter[str] = Counter()
        self.async_copies = 0
        self.operators: Counter[str] = Counter()  # every operator on "device" data
        self.to_device = 0  # copies from the host to the "device"
        self._made = _MadeOnDevice(self.blocking)

    def __enter__(self) -> DeviceReads:
        self._made.__enter__()
        super().__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        self._made.__exit__(*exc)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = func.__name__.split(".")[0]
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        on_device = any(t.device == META for t in tensors)
        if on_device:
            self.operators[name] += 1
        if name in ("_to_copy", "to") and kwargs.get("device") == META and not on_device:
            self.to_device += 1
            if not kwargs.get("non_blocking"):
                self.blocking["blocking copy to device"] += 1
        if on_device and name in _READS:
            self.blocking[name] += 1
            if name == "_local_scalar_dense":
                return 0
            if name == "nonzero":
                return torch.zeros((0, args[0].dim()), dtype=torch.long)
            return False
        to_host = name in ("_to_copy", "to") and kwargs.get("device") == torch.device("cpu")
        if on_device and to_host:
            if kwargs.get("non_blocking"):
                self.async_copies += 1
            else:
                self.blocking["blocking copy to host"] += 1
            dtype = kwargs.get("dtype") or args[0].dtype
            return torch.zeros(args[0].shape, dtype=dtype)
        return func(*args, **kwargs)


FACTS = ModelFacts("llama", 3, 4, 2, 8, hidden_size=32)
PARAMS = SummaryParams(sink_tokens=2, local_window=6)  # min_keys = 32


def summary_session(
    lengths: list[int],
    facts: ModelFacts,
    params: SummaryParams,
    *,
    new_tokens: int = 0,
    certifier: Certifier | None = None,
) -> tuple[ExportSession, HeadMetricsAccumulator, list[int]]:
    """A summary-only export session of a left-padded batch of ``lengths`` (the accumulator it feeds,
    the pads), for a model of ``facts`` generating ``new_tokens``."""
    spec = JobSpec.model_validate(
        {
            "model": {"id": "tiny"},
            "prompts": ["x"] * len(lengths),
            "generation": {"max_new_tokens": new_tokens, "stop_at_eos": False},
            "capture": {
                "attention": False,
                "summary": True,
                "summary_params": {"sink_tokens": params.sink_tokens, "local_window": params.local_window},
            },
        }
    )
    layout = layout_for_job(spec, facts, lengths)
    metrics = HeadMetricsAccumulator(len(layout.layers), len(lengths), len(layout.heads), params)
    width = max(lengths)
    pads = [width - n for n in lengths]
    session = ExportSession(
        layout, spec.capture.resolved(), pads, lengths, lambda *a: None, observer=metrics, certifier=certifier
    )
    return session, metrics, pads


def _session(
    lengths: list[int], certifier: Certifier | None = None, new_tokens: int = 0
) -> tuple[ExportSession, HeadMetricsAccumulator, list[int]]:
    return summary_session(lengths, FACTS, PARAMS, new_tokens=new_tokens, certifier=certifier)


def _prefill(session: ExportSession, lengths: list[int]) -> None:
    batch, width = len(lengths), max(lengths)
    session.begin_step(0, [True] * batch)
    for layer in range(FACTS.num_layers):
        q = torch.empty(batch, FACTS.num_heads, width, FACTS.head_dim, device=META)
        k = torch.empty(batch, FACTS.num_kv_heads, width, FACTS.head_dim, device=META)
        output = torch.empty(batch, width, FACTS.num_heads, FACTS.head_dim, device=META)  # [B, T, H, Dv]
        call = AttentionCall(layer, q, k, torch.empty_like(k), None, 0.35, None, output=output)
        session.on_attention(call)


def test_summary_capture_reads_nothing_from_the_device_per_sequence() -> None:
    lengths = [40, 64, 33, 50, 64, 47]  # every sequence has eligible rows (≥ 32 visible keys)
    session, metrics, _ = _session(lengths)
    reads = DeviceReads()
    with torch.inference_mode(), reads:
        _prefill(session, lengths)
    assert dict(reads.blocking) == {}, f"the forward thread waits for the device: {dict(reads.blocking)}"

    with reads:
        summary = metrics.result()  # the one place that waits: the sums' copy, the quantiles' copy
    assert dict(reads.blocking) == {"blocking copy to host": 2}
    # the per-row values the quantiles need stay on the device (sorted there by result())
    assert reads.async_copies == 0
    assert summary.rows.tolist() == [[n - PARAMS.min_keys + 1 for n in lengths]] * FACTS.num_layers
    assert summary.context_max.tolist() == [lengths] * FACTS.num_layers


def test_values_past_the_device_budget_go_to_the_host_without_waiting(monkeypatch: Any) -> None:
    """With no room kept on the device, the quantile values go to the host asynchronously, one copy
    per row_metrics call (the blocks of one run of positions, every layer and the sequences of equal
    length, computed together in result()); result() still waits only for its two copies."""
    monkeypatch.setattr(metrics_module, "DEVICE_VALUES_BYTES", 0)
    lengths = [40, 64, 33, 50, 64, 47]
    session, metrics, _ = _session(lengths)
    reads = DeviceReads()
    with torch.inference_mode(), reads:
        _prefill(session, lengths)
        metrics.result()
    assert reads.async_copies == len(set(lengths))
    assert dict(reads.blocking) == {"blocking copy to host": 2}


def test_the_certifier_reads_nothing_from_the_device_until_settled() -> None:
    """The sampled-row checks of every (layer, sequence) keep their maxima on the device: the
    forward thread never waits for them (the certificate is read once, after the passes)."""
    lengths = [40, 64, 33]
    certifier = Certifier(tuple(range(FACTS.num_layers)), "bfloat16")
    session, _, _ = _session(lengths, certifier)
    reads = DeviceReads()
    with torch.inference_mode(), reads:
        _prefill(session, lengths)
    assert dict(reads.blocking) == {}, f"the forward thread waits for the device: {dict(reads.blocking)}"
    # every layer checked, its maxima waiting on the "device" (meta data cannot be read: settling is
    # what the certifier's own tests cover on real tensors)
    assert sorted(certifier._unread) == list(range(FACTS.num_layers))


def test_cpu_summary_matches_with_host_positions() -> None:
    """The same path on real CPU tensors: host positions give the metrics of device positions."""
    rng = np.random.default_rng(0)
    length, heads = 48, 2
    logits = torch.from_numpy(rng.normal(size=(heads, length, length)).astype(np.float32))
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
    host, device = (HeadMetricsAccumulator(1, 1, heads, PARAMS) for _ in range(2))
    for start, end in ((0, 20), (20, 41), (41, 48)):
        host.observe(0, 0, probs[:, start:end, :end], torch.arange(start, end))
        # positions out of order and not a run: the general (index_select) path
        order = torch.arange(end - 1, start - 1, -1)
        device.observe(0, 0, probs[:, order][:, :, :end], order.clone())
    a, b = host.result(), device.result()
    for name, values in a.means.items():
        np.testing.assert_allclose(values, b.means[name], rtol=1e-6, atol=1e-7, err_msg=name)
    for name, values in a.quantiles.items():
        np.testing.assert_allclose(values, b.quantiles[name], rtol=1e-6, atol=1e-7, err_msg=name)


def test_a_session_checks_only_the_sampled_sequences(monkeypatch: Any) -> None:
    """The session hands the certifier the sampled sequences' rows only, once per layer."""
    checked: list[int] = []
    for method in ("check", "check_block"):  # the fused path, or the probabilities' own rows
        monkeypatch.setattr(Certifier, method, lambda self, call, b, *a, **k: checked.append(b))
    lengths = [40, 64, 33, 50, 64, 47, 36]
    certifier = Certifier((0, 1, 2), "bfloat16")
    session, _, pads = _session(lengths, certifier)
    with torch.inference_mode():
        _prefill(session, lengths)
    sample = Certifier.sequences(pads, [True] * len(lengths))
    assert len(sample) == SAMPLE_SEQUENCES
    assert sorted(checked) == sorted(list(sample) * 3)


@pytest.fixture
def stubbed_kernels(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The fused path taken on "device" (meta) data, its kernels stubbed (meta data cannot run
    them): the query rows of each kernel call, in order."""
    from worker.capture import fused_metrics
    from worker.capture import session as session_module
    from worker.capture.metrics import ROW_METRICS

    rows: list[int] = []

    def kernels(query: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        rows.append(query.shape[2])
        return torch.empty((len(ROW_METRICS), query.shape[0], query.shape[1], query.shape[2]), device=META)

    monkeypatch.setattr(session_module, "fused_verified", lambda *a: True)
    monkeypatch.setattr(fused_metrics, "fused_row_metrics", kernels)
    return rows


def test_a_decoding_step_costs_each_layer_a_few_operators(
    monkeypatch: Any, stubbed_kernels: list[int]
) -> None:
    """Summary-only on the fused path (kernels stubbed: meta data cannot run them): after the first
    step, a decoding step's layer call runs the kernels and a handful of operators on the device
    (sum, its add to the layer's sums, the quantile metrics' selection), copies nothing to it, reads
    nothing from it,
    and does no per-sequence work; the bookkeeping a forward pass's layers share is done once."""
    kernel_calls = stubbed_kernels
    lengths = [40, 64, 33, 50]
    session, _, _ = _session(lengths)
    width, batch = max(lengths), len(lengths)
    rows_checked: list[int] = []
    rows = session._rows

    def counted_rows(b: int, q_len: int) -> tuple[int, int]:
        rows_checked.append(b)
        return rows(b, q_len)

    monkeypatch.setattr(session, "_rows", counted_rows)
    reads = DeviceReads()
    with torch.inference_mode(), reads:
        _prefill(session, lengths)
        for step in range(3):
            q = torch.empty(batch, FACTS.num_heads, 1, FACTS.head_dim, device=META)
            k = torch.empty(batch, FACTS.num_kv_heads, width + step + 1, FACTS.head_dim, device=META)
            output = torch.empty(batch, 1, FACTS.num_heads, FACTS.head_dim, device=META)
            calls = [
                AttentionCall(i, q, k, k, None, 0.35, None, output=output) for i in range(FACTS.num_layers)
            ]
            session.begin_step(width + step, [True] * batch)
            if step == 2:
                reads.operators.clear()
                reads.to_device = 0
                rows_checked.clear()
            for call in calls:
                session.on_attention(call)
    views = {"empty", "alias", "view", "slice", "select", "unsqueeze", "expand", "transpose"}  # no kernel
    per_layer = {name: n / FACTS.num_layers for name, n in reads.operators.items() if name not in views}
    assert kernel_calls[-FACTS.num_layers :] == [1] * FACTS.num_layers
    assert per_layer == {"sum": 1, "add_": 1, "index_select": 1}, per_layer
    assert reads.to_device == 0 and dict(reads.blocking) == {}
    assert len(rows_checked) == batch  # the wanted sequences, once for the step's every layer


def test_decoding_steps_another_step_follows_run_nothing_on_the_device(stubbed_kernels: list[int]) -> None:
    """Summary-only on the fused path (kernels stubbed), the generation loop saying another step
    follows (``rows_wait``): each layer's call keeps its query row and its mask row waiting and runs
    no operator at all; the last step's calls observe every waiting row at once, one kernel pair a
    layer, the steps' masks joined once for every layer (worker/capture/waiting_rows.py)."""
    kernel_rows = stubbed_kernels
    lengths, steps = [40, 64, 33, 50], 4
    session, _, _ = _session(lengths, new_tokens=steps)
    width, batch = max(lengths), len(lengths)
    reads = DeviceReads()
    ops: list[dict[str, int]] = []  # each decoding step's operators
    with torch.inference_mode(), reads:
        _prefill(session, lengths)
        for step in range(steps):
            keys = width + step + 1
            q = torch.empty(batch, FACTS.num_heads, 1, FACTS.head_dim, device=META)
            k = torch.empty(batch, FACTS.num_kv_heads, keys, FACTS.head_dim, device=META)
            mask = torch.empty(batch, 1, 1, keys, dtype=torch.bool, device=META)
            session.begin_step(width + step, [True] * batch, rows_wait=step < steps - 1)
            reads.operators.clear()
            if step < steps - 1:
                kernel_rows.clear()
            for layer in range(FACTS.num_layers):
                session.on_attention(AttentionCall(layer, q, k, k, mask, 0.35, None))
            ops.append(dict(reads.operators))
    assert ops[:-1] == [{}] * (steps - 1)  # nothing on the device while rows wait
    assert kernel_rows == [steps] * FACTS.num_layers  # every step's row, at the last step
    views = {"empty", "alias", "view", "slice", "select", "unsqueeze", "expand", "transpose"}  # no kernel
    last = {name: n for name, n in ops[-1].items() if name not in views}
    layers = FACTS.num_layers  # (a list of tensors, torch.cat is not seen by the dispatch mode)
    # the steps' masks joined once for every layer, a copy a step; each layer's rows added up
    assert last == {"copy_": steps, "sum": layers, "add_": layers, "index_select": layers}, last
    assert not session._waiting
    assert dict(reads.blocking) == {}
