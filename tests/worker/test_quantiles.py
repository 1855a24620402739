"""worker/capture/quantiles.py against numpy.quantile, and the accumulator's quantiles kept on a GPU
or spilled to the host against the same rows on the CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from storage.bundle.labels import SummaryParams
from worker.capture import metrics
from worker.capture.metrics import QUANTILE_METRICS, ROW_METRICS, HeadMetricsAccumulator
from worker.capture.quantiles import linear_quantiles

QS = (0.1, 0.5, 0.9)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_each_series_equals_numpy_quantile_exactly(dtype: type) -> None:
    """Random series of 0 to R values (ties in a third of them; garbage past each count) give
    numpy's figures bit for bit; an empty series gives NaN."""
    rng = np.random.default_rng(0)
    for trial in range(200):
        series, width = int(rng.integers(1, 7)), int(rng.integers(1, 50))
        values = rng.random((series, width)).astype(dtype) * 10.0 ** rng.integers(-8, 4)
        if trial % 3 == 0:
            values = np.round(values * 4) / 4
        counts = rng.integers(0, width + 1, size=series)
        garbage = values.copy()
        for s in range(series):
            garbage[s, counts[s] :] = -1e30 if trial % 2 else 1e30
        got = linear_quantiles(torch.from_numpy(garbage), torch.from_numpy(counts), QS).numpy()
        for s in range(series):
            if counts[s] == 0:
                assert np.isnan(got[s]).all()
                continue
            want = np.quantile(values[s, : counts[s]].astype(np.float64), QS, method="linear")
            np.testing.assert_array_equal(got[s], want)


def test_counts_broadcast_over_the_leading_axes() -> None:
    """``[B, Q, H, R]`` values with one count per sequence ``[B, 1, 1]``: every (metric, head) of a
    sequence cut at its count; no values at all give NaN."""
    rng = np.random.default_rng(1)
    values = rng.random((3, 2, 4, 9))
    counts = np.array([9, 4, 1])
    got = linear_quantiles(torch.from_numpy(values), torch.from_numpy(counts)[:, None, None], QS).numpy()
    assert got.shape == (3, 2, 4, 3)
    for b in range(3):
        want = np.moveaxis(np.quantile(values[b, :, :, : counts[b]], QS, axis=-1, method="linear"), 0, -1)
        np.testing.assert_array_equal(got[b], want)
    empty = linear_quantiles(torch.zeros(2, 5, 0), torch.zeros(2, 1, dtype=torch.long), QS)
    assert empty.shape == (2, 5, 3) and bool(empty.isnan().all())


def _observe_all(acc: HeadMetricsAccumulator, device: torch.device, seed: int = 0) -> None:
    """Two layers, three sequences of different lengths: prefill blocks, then generated rows, then
    a block of one sequence alone (the accumulator's usual arrivals)."""
    gen = torch.Generator().manual_seed(seed)
    heads, lengths = acc.num_heads, (40, 23, 31)
    for layer in range(acc.num_layers):
        for b, length in enumerate(lengths):
            logits = torch.randn(heads, length, length, generator=gen) * (1 + b)
            logits = logits.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))
            probs = torch.softmax(logits, dim=-1).to(device)
            for start, end in ((0, length - 5), *((t, t + 1) for t in range(length - 5, length))):
                acc.observe(layer, b, probs[:, start:end, :end], torch.arange(start, end))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("kept_bytes", [1 << 30, 0, 20_000])
def test_quantiles_on_a_gpu_kept_or_spilled_equal_the_cpu(
    kept_bytes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Values kept on the GPU, all copied to the host, or some of each: the same quantiles and
    means as the same rows on the CPU."""
    monkeypatch.setattr(metrics, "DEVICE_VALUES_BYTES", kept_bytes)
    params = SummaryParams(sink_tokens=1, local_window=2)  # rows from 12 keys are eligible
    cpu = HeadMetricsAccumulator(2, 3, 4, params)
    gpu = HeadMetricsAccumulator(2, 3, 4, params)
    _observe_all(cpu, torch.device("cpu"))
    _observe_all(gpu, torch.device("cuda"))
    want, got = cpu.result(), gpu.result()
    for name in QUANTILE_METRICS:
        got_q, want_q = got.quantiles[name], want.quantiles[name]
        np.testing.assert_allclose(got_q, want_q, rtol=1e-5, atol=1e-6, err_msg=name)
    for name in ROW_METRICS:
        np.testing.assert_allclose(got.means[name], want.means[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_inf_padded_series_may_have_their_values_anywhere() -> None:
    """``inf_padded``: a series' values mixed with +inf entries (rows skipped, padding) give the
    quantiles of the values alone."""
    rng = np.random.default_rng(2)
    values = rng.random((4, 12))
    present = rng.random((4, 12)) < 0.6
    present[3] = False
    mixed = np.where(present, values, np.inf)
    got = linear_quantiles(
        torch.from_numpy(mixed), torch.from_numpy(present.sum(-1)), QS, inf_padded=True
    ).numpy()
    for s in range(3):
        want = np.quantile(values[s][present[s]], QS, method="linear")
        np.testing.assert_array_equal(got[s], want)
    assert np.isnan(got[3]).all()


@pytest.mark.parametrize(
    "sort_bytes", [1 << 30, 15_000, 1_000], ids=["all-layers", "two-layers", "per-sequence"]
)
def test_layers_laid_out_alike_are_sorted_together_with_each_layer_s_figures(
    sort_bytes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Layers whose kept values are laid out alike (a prefill's fused calls: the same sequences and
    skips in one block a layer) are gathered and sorted together, as many as the sort's budget
    takes, or a layer's sequences a few at a time under it; a layer laid out otherwise on its own:
    every figure is numpy's quantile of that layer's, sequence's and head's own values."""
    monkeypatch.setattr(metrics, "QUANTILE_SORT_BYTES", sort_bytes)
    layers, batch, heads, n = 5, 3, 2, 9
    acc = HeadMetricsAccumulator(layers, batch, heads, SummaryParams(sink_tokens=1, local_window=2))
    rng = np.random.default_rng(4)
    values = rng.random((layers, len(ROW_METRICS), 2, heads, n)).astype(np.float32)
    layout = {lp: ((0, 2), [0, 3]) for lp in range(layers - 1)}
    layout[layers - 1] = ((1, 2), [2, 0])  # the last layer: other sequences, other skips
    for lp, (owners, skips) in layout.items():
        acc._add_rows(lp, owners, skips, torch.from_numpy(values[lp]))
    got = acc.result().quantiles
    for lp, (owners, skips) in layout.items():
        for i, b in enumerate(owners):
            for name in QUANTILE_METRICS:
                series = values[lp, ROW_METRICS.index(name), i, :, skips[i] :]  # [H, rows]
                want = np.quantile(series.astype(np.float64), metrics.QUANTILES, axis=-1, method="linear").T
                np.testing.assert_allclose(got[name][lp, b], want, rtol=1e-6, err_msg=f"{lp} {b} {name}")
        absent = next(b for b in range(batch) if b not in owners)
        assert np.isnan(got["entropy"][lp, absent]).all()
