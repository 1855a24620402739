"""Rows only an observer reads are computed from the first position it reads.

On the probability path (the CPU, or a model the fused kernels do not cover) a summary-only capture
computes each row's probabilities for the per-head metrics alone, and the metrics drop every row
with fewer than ``4 (s + W)`` keys: those rows are not computed at all. The summary is the one of
every row's eager probabilities, and a prompt shorter than the first eligible row costs nothing.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from tests.worker.test_device_syncs import FACTS, PARAMS, summary_session
from worker.capture.attention_math import attention_probs, causal_allowed
from worker.capture.hook import AttentionCall
from worker.capture.induction import InductionObserver
from worker.capture.metrics import HeadMetricsAccumulator
from worker.capture.session import ExportSession

LENGTHS = [40, 25, 70]  # PARAMS: rows from position 31 (32 keys) are eligible; 25 tokens never are
SCALING = 0.35


def _layer_tensors(gen: torch.Generator, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, heads, kv_heads, dim = len(LENGTHS), FACTS.num_heads, FACTS.num_kv_heads, FACTS.head_dim
    q = torch.randn(batch, heads, width, dim, generator=gen) * 2.0
    k = torch.randn(batch, kv_heads, width, dim, generator=gen)
    return q, k, torch.randn(batch, kv_heads, width, dim, generator=gen)


def _padded_mask(pads: list[int], width: int) -> torch.Tensor:
    """Bool ``[B, 1, T, T]``: causal, no padding key; a padding row sees only itself (its value does
    not matter: the capture computes no padding row)."""
    slots = torch.arange(width)
    causal = slots[None, :] <= slots[:, None]
    masks = [causal & (slots[None, :] >= pad) | torch.eye(width, dtype=torch.bool) for pad in pads]
    return torch.stack(masks)[:, None]


def test_a_summary_computes_no_row_before_the_first_eligible_one(monkeypatch: pytest.MonkeyPatch) -> None:
    session, metrics, pads = summary_session(LENGTHS, FACTS, PARAMS)
    assert metrics.first_position == PARAMS.min_keys - 1 == 31
    computed: list[tuple[int, int, int]] = []  # (sequence, first real row, rows) of each call
    real = ExportSession._capture_attention

    def spy(self: ExportSession, lp: int, b: int, call: AttentionCall, row0: int, i0: int, *a: Any) -> None:
        computed.append((b, row0, call.query.shape[2] - i0))
        real(self, lp, b, call, row0, i0, *a)

    monkeypatch.setattr(ExportSession, "_capture_attention", spy)
    width = max(LENGTHS)
    mask = _padded_mask(pads, width)
    reference = HeadMetricsAccumulator(FACTS.num_layers, len(LENGTHS), FACTS.num_heads, PARAMS)
    gen = torch.Generator().manual_seed(0)
    session.begin_step(0, [True] * len(LENGTHS))
    for layer in range(FACTS.num_layers):
        q, k, v = _layer_tensors(gen, width)
        session.on_attention(AttentionCall(layer, q, k, v, mask, SCALING, None))
        for b, (pad, length) in enumerate(zip(pads, LENGTHS, strict=True)):
            positions = torch.arange(length)
            probs = attention_probs(
                q[b : b + 1, :, pad:],
                k[b : b + 1, :, pad:],
                scaling=SCALING,
                allowed=causal_allowed(positions, positions),
            )[0]
            reference.observe(layer, b, probs, positions)  # every row: the accumulator drops the early ones
    want = [(0, 31, 9), (2, 31, 39)] * FACTS.num_layers  # the 25-token prompt: nothing computed
    assert computed == want
    got, expected = metrics.result(), reference.result()
    assert set(got.means) == set(expected.means)
    for name, values in expected.means.items():
        np.testing.assert_allclose(got.means[name], values, rtol=1e-5, atol=1e-6, err_msg=name)
    for name, values in expected.quantiles.items():
        np.testing.assert_allclose(got.quantiles[name], values, rtol=1e-5, atol=1e-6, err_msg=name)
    assert np.isnan(got.means["entropy"][:, 1]).all()  # no eligible row: undetermined, as before


def test_the_induction_probe_reads_from_its_second_copy() -> None:
    observer = InductionObserver(num_layers=1, num_heads=2, prefix_len=1, length=10)
    assert observer.first_position == 12  # BOS, R (10 tokens), then R's second token again
