"""Cases for the fused summary kernels (worker/capture/fused_metrics.py) against row_metrics and the
spec's numpy reference, run by tests/worker/test_fused_metrics.py in a process of their own: on the
CPU through Triton's interpreter (``TRITON_INTERPRET=1`` must be set before Triton is imported: its
own library functions are made interpreted or compiled then), or on CUDA
(``QKVAULT_TEST_FUSED_DEVICE=cuda``).

The interpreter runs each program in numpy, so the shapes here stay small (a few hundred rows)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import xarray as xr

from storage.bundle.labels import SummaryParams
from worker.capture.attention_math import attention_probs, causal_allowed
from worker.capture.metrics import QUANTILE_METRICS, ROW_METRICS, HeadMetricsAccumulator, row_metrics

from .test_metrics import reference_row


@pytest.fixture
def device() -> torch.device:
    """The device these cases run on: the CPU through Triton's interpreter, or CUDA."""
    from worker.capture.fused_metrics import fused_available

    chosen = torch.device(os.environ.get("QKVAULT_TEST_FUSED_DEVICE", "cpu"))
    assert fused_available(chosen), f"the fused kernels cannot run on {chosen} here (TRITON_INTERPRET?)"
    return chosen


def _reference(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, s: int, w: int, window: int | None = None
) -> dict[str, torch.Tensor]:
    """row_metrics of fp32 probabilities: ``q [H, n, D]``, ``k [KVH, K, D]`` (key j at position j)."""
    allowed = causal_allowed(positions, torch.arange(k.shape[1]), window)
    probs = attention_probs(q[None].float(), k[None].float(), scaling=q.shape[-1] ** -0.5, allowed=allowed)[0]
    return row_metrics(probs, positions, sink_tokens=s, local_window=w)


def _left_padded_mask(pads: list[int], length: int) -> torch.Tensor:
    """The model's boolean mask ``[B, 1, T, T]`` of a left-padded causal batch (True = attend)."""
    mask = torch.zeros(len(pads), 1, length, length, dtype=torch.bool)
    for b, pad in enumerate(pads):
        for i in range(pad, length):
            mask[b, 0, i, pad : i + 1] = True
    return mask


def _one_sequence(
    q: torch.Tensor,
    k: torch.Tensor,
    first: int,
    device: torch.device,
    s: int,
    w: int,
    window: int | None = None,
) -> torch.Tensor:
    """fused_row_metrics of one unpadded sequence's rows ``first ..`` (``q [H, T, D]``, ``k [KVH, T, D]``)."""
    from worker.capture.fused_metrics import fused_row_metrics

    return fused_row_metrics(
        q[None, :, first:].to(device),
        k[None].to(device),
        torch.tensor([0], device=device),
        torch.tensor([True], device=device),
        query_offset=first,
        key_offset=0,
        scaling=q.shape[-1] ** -0.5,
        sink_tokens=s,
        local_window=w,
        sliding_window=window,
    )


def _assert_close(got: torch.Tensor, want: dict[str, torch.Tensor], k90_slack: int = 0) -> None:
    """``got [M, H, n]`` in ROW_METRICS order; k90 counts exact unless ``k90_slack`` keys."""
    for i, name in enumerate(ROW_METRICS):
        g, r = got[i].cpu().double(), want[name].cpu().double()
        if name in ("k90", "middle_k90"):
            assert (g - r).abs().max() <= k90_slack, name
        elif name in ("prev_argmax_rate", "sparsity_1pct", "k90_frac"):
            np.testing.assert_allclose(g, r, atol=1e-3, err_msg=name)
        else:
            np.testing.assert_allclose(g, r, rtol=2e-4, atol=2e-5, err_msg=name)


@pytest.mark.parametrize(("s", "w", "window"), [(2, 4, None), (3, 6, 9)])
def test_fused_rows_equal_row_metrics(device: torch.device, s: int, w: int, window: int | None) -> None:
    """Grouped-query heads, one sequence, rows from position 20: every metric of every row."""

    gen = torch.Generator().manual_seed(s * 10 + w)
    heads, kv_heads, dim, length, first = 4, 2, 16, 48, 20
    q = torch.randn(heads, length, dim, generator=gen) * torch.tensor([0.3, 1.0, 2.5, 4.0])[:, None, None]
    k = torch.randn(kv_heads, length, dim, generator=gen)
    got = _one_sequence(q, k, first, device, s, w, window)
    assert got.shape == (len(ROW_METRICS), 1, heads, length - first)
    _assert_close(got[:, 0], _reference(q[:, first:], k, torch.arange(first, length), s, w, window))


def test_fused_rows_of_a_padded_batch_with_its_mask(device: torch.device) -> None:
    """Two left-padded sequences through one call with the model's boolean mask: each sequence's rows
    equal its own computation alone (padding keys never seen)."""
    from worker.capture.fused_metrics import fused_row_metrics

    gen = torch.Generator().manual_seed(7)
    heads, dim, length, pads, first = 2, 16, 32, [0, 9], 12
    q = torch.randn(2, heads, length, dim, generator=gen) * 2
    k = torch.randn(2, heads, length, dim, generator=gen)
    mask = _left_padded_mask(pads, length)

    def run(wanted: list[int]) -> torch.Tensor:
        return fused_row_metrics(
            q[:, :, first:].to(device),
            k.to(device),
            torch.tensor(pads, device=device),
            torch.tensor(wanted, dtype=torch.uint8, device=device),
            query_offset=first,
            key_offset=0,
            scaling=dim**-0.5,
            sink_tokens=2,
            local_window=4,
            mask=mask[:, :, first:].to(device),
        )

    got = run([1, 1])
    for b, pad in enumerate(pads):
        positions = torch.arange(first - pad, length - pad)
        want = _reference(q[b, :, first:], k[b, :, pad:], positions, 2, 4)
        _assert_close(got[:, b], want)
    alone = run([0, 1])  # sequence 0 not wanted: sequence 1's rows unchanged
    torch.testing.assert_close(alone[:, 1], got[:, 1], rtol=0, atol=0)


@pytest.mark.parametrize("mass_bound_keys", [None, 0.0, 1e9])
def test_long_rows_narrow_the_k90_search_to_one_key(
    device: torch.device, mass_bound_keys: float | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows of 251–262 keys (two runs: the 256- and 512-key programs) narrow a range of weights
    until one key is left in it; a uniform head (q = 0) leaves hundreds of ties at the crossing, a
    range of one bit pattern. Every metric as row_metrics, k90 exact — with the search's
    usual mass bound, with none (halving by mass down to one bit pattern) and with one that stops at
    once (the exact-count halving, which otherwise runs only after rounding, does all of it)."""
    from worker.capture import fused_metrics
    from worker.capture.fused_metrics import SEARCH_CANDIDATES, row_runs

    if mass_bound_keys is not None:
        monkeypatch.setattr(fused_metrics, "MASS_BOUND_KEYS", mass_bound_keys)
    gen = torch.Generator().manual_seed(11)
    heads, kv_heads, dim, length, first = 6, 3, 16, 262, 250
    sharpness = torch.tensor([0.3, 1.0, 2.5, 4.0, 8.0, 0.0])[:, None, None]
    q = torch.randn(heads, length, dim, generator=gen) * sharpness
    k = torch.randn(kv_heads, length, dim, generator=gen)
    runs = row_runs(length - first, first + 1, 512)
    assert [width for _, _, width in runs] == [256, 512] and SEARCH_CANDIDATES < 256
    got = _one_sequence(q, k, first, device, 4, 16)
    _assert_close(got[:, 0], _reference(q[:, first:], k, torch.arange(first, length), 4, 16))


def test_fused_k90_counts_ties_one_by_one(device: torch.device) -> None:
    """Uniform rows (q = 0: every visible weight equal) and a row split between two keys: k90 and
    middle_k90 follow the spec's numpy reference, ties at the crossing counted one by one."""
    from worker.capture.fused_metrics import fused_row_metrics

    heads, dim, length, first = 1, 16, 40, 16
    q = torch.zeros(2, heads, length, dim)
    k = torch.zeros(2, heads, length, dim)
    k[1, 0, 5, 0] = k[1, 0, 30, 0] = 30.0  # row attends keys 5 and 30 (once visible) almost only
    q[1, 0, :, 0] = 1.0
    got = fused_row_metrics(
        q[:, :, first:].to(device),
        k.to(device),
        torch.zeros(2, dtype=torch.long, device=device),
        torch.ones(2, dtype=torch.bool, device=device),
        query_offset=first,
        key_offset=0,
        scaling=1.0,
        sink_tokens=2,
        local_window=4,
    ).cpu()
    for b in range(2):
        probs = (
            attention_probs(
                q[b : b + 1],
                k[b : b + 1],
                scaling=1.0,
                allowed=causal_allowed(torch.arange(length), torch.arange(length)),
            )[0, 0]
            .double()
            .numpy()
        )
        for i, t in enumerate(range(first, length)):
            want = reference_row(probs[t], t, 2, 4)
            for name in ("k90", "middle_k90", "k90_frac", "max_weight", "entropy"):
                value = float(got[ROW_METRICS.index(name), b, 0, i])
                assert value == pytest.approx(want[name], rel=1e-4, abs=1e-6), (b, t, name)


@pytest.mark.parametrize("pads", [[0, 5], [0, 24, 5]], ids=["every-sequence", "one-too-short"])
def test_accumulator_observe_qk_equals_observe_probs(device: torch.device, pads: list[int]) -> None:
    """observe_qk (fused, one call for the batch) gives the summaries observe (probabilities) gives:
    rows counted from each sequence's first eligible position, means and quantiles; a sequence
    with no eligible row (12 tokens) gets none, and the others' sums go to their own slots."""
    gen = torch.Generator().manual_seed(3)
    params = SummaryParams(sink_tokens=1, local_window=3)  # eligible from 16 keys
    heads, dim, length, batch = 2, 16, 36, len(pads)
    q = torch.randn(batch, heads, length, dim, generator=gen) * 2
    k = torch.randn(batch, heads, length, dim, generator=gen)
    mask = _left_padded_mask(pads, length)
    fused = HeadMetricsAccumulator(1, batch, heads, params)
    fused.observe_qk(
        0,
        q.to(device),
        k.to(device),
        pads,
        list(range(batch)),
        query_offset=0,
        key_offset=0,
        scaling=dim**-0.5,
        mask=mask.to(device),
    )
    plain = HeadMetricsAccumulator(1, batch, heads, params)
    for b, pad in enumerate(pads):
        positions = torch.arange(length - pad)
        allowed = causal_allowed(positions, positions)
        probs = attention_probs(
            q[b : b + 1, :, pad:], k[b : b + 1, :, pad:], scaling=dim**-0.5, allowed=allowed
        )
        plain.observe(0, b, probs[0], positions)
    got, want = fused.result(), plain.result()
    np.testing.assert_array_equal(got.rows, want.rows)
    assert want.rows.tolist() == [[max(0, length - pad - 16 + 1) for pad in pads]]
    _assert_same_summary(got, want)


def _assert_same_summary(got: Any, want: Any) -> None:
    """Two :class:`HeadSummary` of the same rows: equal counts and context, means and quantiles
    within fp32 rounding."""
    np.testing.assert_array_equal(got.rows, want.rows)
    np.testing.assert_array_equal(got.context_min, want.context_min)
    np.testing.assert_array_equal(got.context_max, want.context_max)
    for name in ROW_METRICS:
        np.testing.assert_allclose(got.means[name], want.means[name], rtol=2e-4, atol=2e-5, err_msg=name)
    for name in QUANTILE_METRICS:
        np.testing.assert_allclose(
            got.quantiles[name], want.quantiles[name], rtol=2e-4, atol=2e-5, err_msg=name
        )


def _summary_spec(model: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": {"id": model},
        "prompts": ["The quick fox.", "Hi you?"],
        "generation": {"max_new_tokens": 2, "stop_at_eos": False},
        "capture": {"detail": "summary", "summary_params": {"sink_tokens": 1, "local_window": 1}, **extra},
    }


def test_summary_export_takes_the_fused_path_and_equals_the_probability_path(
    device: torch.device, tiny_model_dir: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A summary-only export of a padded batch with generated tokens, through the interpreter's
    fused kernels (every layer call, prefill and decoding steps: rows that waited for the last
    step), stores the summary the probability path stores."""
    from worker.capture import session
    from worker.capture.metrics import HeadMetricsAccumulator as Accumulator

    from .export_helpers import export

    model = str(tiny_model_dir("llama"))
    monkeypatch.setattr(session, "fused_verified", lambda _device, _dtype: False)
    export(_summary_spec(model), tmp_path / "plain.zarr", device=str(device))  # probabilities
    monkeypatch.undo()
    calls: list[tuple[int, ...]] = []
    real = Accumulator.observe_qk

    def counted(self: Accumulator, layer_pos: int, query: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        calls.append(tuple(query.shape))
        real(self, layer_pos, query, *args, **kwargs)

    monkeypatch.setattr(Accumulator, "observe_qk", counted)
    export(_summary_spec(model), tmp_path / "fused.zarr", device=str(device))
    # each layer: the prefill, then the 2 decoding steps' rows at once (the first step's waited)
    assert len(calls) == 2 * 2 and calls[-1][2] == 2
    plain = xr.open_zarr(str(tmp_path / "plain.zarr"), group="summary", zarr_format=3).load()
    fused = xr.open_zarr(str(tmp_path / "fused.zarr"), group="summary", zarr_format=3).load()
    assert set(plain.data_vars) == set(fused.data_vars)
    for name in plain.data_vars:
        if not np.issubdtype(plain[name].dtype, np.number):  # the labels
            assert (plain[name].values == fused[name].values).all(), name
        else:
            np.testing.assert_allclose(
                fused[name].values, plain[name].values, rtol=2e-4, atol=2e-5, err_msg=name
            )


def test_the_self_check_passes_on_this_device(device: torch.device) -> None:
    """The check a capture makes before its first fused call: the kernels compiled by this Triton
    agree with row_metrics (fp32 inputs; and the models' half dtypes where they are compiled)."""
    from worker.capture.fused_metrics import fused_verified

    dtypes = [torch.float32] + ([torch.bfloat16, torch.float16] if device.type == "cuda" else [])
    for dtype in dtypes:
        assert fused_verified(device, dtype), dtype


def test_new_lengths_and_positions_compile_no_new_kernels(
    device: torch.device, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job's sequences have every length: once a width's kernels are compiled, prefills of other
    lengths, padded batches and decoding steps at other positions reuse them (counted as the
    entries a compilation writes into Triton's cache directory). CUDA only: the interpreter
    compiles nothing."""
    from worker.capture.fused_metrics import fused_row_metrics

    if device.type != "cuda":
        pytest.skip("Triton's interpreter compiles nothing")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    gen = torch.Generator().manual_seed(5)
    heads, kv_heads, dim = 8, 2, 64

    def run(length: int, first: int, pads: list[int]) -> None:
        q = torch.randn(len(pads), heads, length, dim, generator=gen).to(device, torch.bfloat16)
        k = torch.randn(len(pads), kv_heads, length, dim, generator=gen).to(device, torch.bfloat16)
        fused_row_metrics(
            q[:, :, first:],
            k,
            torch.tensor(pads, device=device),
            torch.ones(len(pads), dtype=torch.uint8, device=device),
            query_offset=first,
            key_offset=0,
            scaling=dim**-0.5,
            sink_tokens=4,
            local_window=16,
            min_pad=min(pads),
        )
        torch.cuda.synchronize(device)

    run(300, 0, [0])  # every width up to 512, and a decoding step's 512-key program
    run(300, 299, [0])
    compiled = sorted(os.listdir(tmp_path))
    for length, first, pads in [(333, 0, [0]), (371, 0, [0, 17]), (400, 0, [3]), (465, 0, [0, 40, 1])]:
        run(length, first, pads)
    for length in (330, 331, 352, 497):
        run(length, length - 1, [0, 5])
    assert sorted(os.listdir(tmp_path)) == compiled


def test_decoding_rows_that_wait_for_the_last_step_give_the_probability_path_summary(
    device: torch.device, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A session's decoding steps whose rows wait for a later step (worker/capture/waiting_rows.py):
    a padded batch with its mask, a sequence that stops early, a buffer filled on the way (its rows
    observed by the call that fills it), and the last step observing the rest — the summary the
    probability path gives for the same calls, row for row (counts, means, quantiles)."""
    from storage.models.facts import ModelFacts
    from worker.capture import session as session_module
    from worker.capture import waiting_rows
    from worker.capture.hook import AttentionCall

    from .test_device_syncs import summary_session

    monkeypatch.setattr(waiting_rows, "MAX_WAITING_ROWS", 3)  # steps 0-2 fill a buffer, 3-4 wait for 5
    facts = ModelFacts("llama", 2, 4, 2, 16, hidden_size=64)
    params = SummaryParams(sink_tokens=1, local_window=1)  # rows count from 8 keys
    # no prompt row has the 8 keys a row needs to count (the interpreter's time goes to decoding
    # rows); sequences 0 and 2 count from steps 2 and 1, sequence 2 has no row from step 4
    lengths, steps, stops_after = [5, 7, 6], 6, {2: 3}
    width = max(lengths)
    gen = torch.Generator().manual_seed(11)
    total = width + steps
    q_all = torch.randn(len(lengths), facts.num_heads, total, facts.head_dim, generator=gen) * 2
    k_all = torch.randn(len(lengths), facts.num_kv_heads, total, facts.head_dim, generator=gen)

    def run(fused: bool) -> Any:
        monkeypatch.setattr(session_module, "fused_verified", lambda _device, _dtype: fused)
        session, metrics, pads = summary_session(lengths, facts, params, new_tokens=steps)
        observed: list[int] = []
        real = metrics.observe_qk

        def counted(layer_pos: int, query: torch.Tensor, *args: Any, **kwargs: Any) -> None:
            observed.append(query.shape[2])
            real(layer_pos, query, *args, **kwargs)

        metrics.observe_qk = counted  # type: ignore[method-assign]
        mask = _left_padded_mask(pads, total)
        for step in range(-1, steps):  # -1: the prefill
            q0, q1 = (0, width) if step < 0 else (width + step, width + step + 1)
            active = [step <= stops_after.get(b, steps) for b in range(len(lengths))]
            session.begin_step(q0, active, rows_wait=0 <= step < steps - 1)
            for layer in range(facts.num_layers):
                q = q_all[:, :, q0:q1].to(device)
                k = k_all[:, :, :q1].to(device)
                call = AttentionCall(
                    layer, q, k, k, mask[:, :, q0:q1, :q1].to(device), facts.head_dim**-0.5, None
                )
                session.on_attention(call)
        session.flush()
        return metrics.result(), observed

    (got, observed), (want, _) = run(fused=True), run(fused=False)
    # each layer: the prefill, the 3 rows that filled the buffer, then at the last step two runs:
    # step 3 (sequence 2's last row) and steps 4-5 (without it)
    assert observed == [width, width, 3, 3, 1, 2, 1, 2], observed
    assert want.rows[0].tolist() == [4, 6, 3]
    _assert_same_summary(got, want)
