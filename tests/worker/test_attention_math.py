"""attention_math against plain numpy formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from worker.capture.attention_math import (
    attention_probs,
    causal_allowed,
    causal_block_probs,
    expand_kv_heads,
)


def _numpy_reference(
    q: np.ndarray,
    k: np.ndarray,
    scaling: float,
    allowed: np.ndarray,
    softcap: float | None = None,
    bias: np.ndarray | None = None,
    sinks: np.ndarray | None = None,
) -> np.ndarray:
    """q [H, Tq, D], k [KVH, Tk, D], allowed [Tq, Tk] (or [H, Tq, Tk]) → probs [H, Tq, Tk] (float64).

    ``bias`` [H, Tq, Tk]: added to the (soft-capped) scores of the visible keys (ALiBi);
    ``sinks`` [H]: p_ij = exp(s_ij) / (Σ_visible exp(s_ij) + exp(sink_h)), 0 where not visible."""
    heads, kv_heads = q.shape[0], k.shape[0]
    allowed = np.broadcast_to(allowed, (heads, q.shape[1], k.shape[1]))
    out = np.zeros((heads, q.shape[1], k.shape[1]))
    for h in range(heads):
        s = scaling * q[h].astype(np.float64) @ k[h // (heads // kv_heads)].astype(np.float64).T
        if softcap is not None:
            s = np.tanh(s / softcap) * softcap
        if bias is not None:
            s = s + bias[h].astype(np.float64)
        s = np.where(allowed[h], s, -np.inf)
        if sinks is None:
            with np.errstate(invalid="ignore"):
                e = np.exp(s - s.max(-1, keepdims=True))
                p = e / e.sum(-1, keepdims=True)
        else:
            sink = float(sinks[h])
            m = np.maximum(s.max(-1, keepdims=True), sink)  # finite: the sink is always there
            e = np.exp(s - m)
            p = e / (e.sum(-1, keepdims=True) + np.exp(sink - m))
        out[h] = np.nan_to_num(p)
    return out


def _numpy_sink_mass(
    q: np.ndarray,
    k: np.ndarray,
    scaling: float,
    allowed: np.ndarray,
    sinks: np.ndarray,
    softcap: float | None = None,
    bias: np.ndarray | None = None,
) -> np.ndarray:
    """[H, Tq]: exp(sink_h) / (Σ_visible exp(s_ij) + exp(sink_h)), straight from the formula."""
    heads, kv_heads = q.shape[0], k.shape[0]
    allowed = np.broadcast_to(allowed, (heads, q.shape[1], k.shape[1]))
    out = np.zeros((heads, q.shape[1]))
    for h in range(heads):
        for i in range(q.shape[1]):
            total = np.exp(float(sinks[h]))
            for j in range(k.shape[1]):
                if allowed[h, i, j]:
                    s = scaling * float(q[h, i].astype(np.float64) @ k[h // (heads // kv_heads), j])
                    if softcap is not None:
                        s = np.tanh(s / softcap) * softcap
                    if bias is not None:
                        s += float(bias[h, i, j])
                    total += np.exp(s)
            out[h, i] = np.exp(float(sinks[h])) / total
    return out


def test_gqa_probs_match_numpy() -> None:
    rng = np.random.default_rng(0)
    q = rng.standard_normal((6, 5, 8)).astype(np.float32)
    k = rng.standard_normal((2, 9, 8)).astype(np.float32)
    q_pos, k_pos = torch.arange(4, 9), torch.arange(9)
    allowed = causal_allowed(q_pos, k_pos)
    got = attention_probs(torch.from_numpy(q)[None], torch.from_numpy(k)[None], scaling=0.3, allowed=allowed)
    ref = _numpy_reference(q, k, 0.3, allowed.numpy())
    np.testing.assert_allclose(got[0].numpy(), ref, atol=1e-6)


def test_sliding_window_and_softcap() -> None:
    rng = np.random.default_rng(1)
    q = rng.standard_normal((2, 7, 4)).astype(np.float32) * 5
    k = rng.standard_normal((2, 7, 4)).astype(np.float32) * 5
    allowed = causal_allowed(torch.arange(7), torch.arange(7), sliding_window=3)
    assert allowed.numpy().sum(-1).tolist() == [1, 2, 3, 3, 3, 3, 3]
    got = attention_probs(
        torch.from_numpy(q)[None], torch.from_numpy(k)[None], scaling=0.5, allowed=allowed, softcap=2.0
    )
    np.testing.assert_allclose(got[0].numpy(), _numpy_reference(q, k, 0.5, allowed.numpy(), 2.0), atol=1e-6)


def test_additive_mask_and_fully_masked_rows_are_zero() -> None:
    rng = np.random.default_rng(2)
    q = torch.from_numpy(rng.standard_normal((1, 2, 3, 4)).astype(np.float32))
    k = torch.from_numpy(rng.standard_normal((1, 1, 3, 4)).astype(np.float32))
    additive = torch.zeros(1, 1, 3, 3)
    additive[..., 0, :] = torch.finfo(torch.float32).min  # a padding row: nothing visible
    additive[..., 2, 1] = torch.finfo(torch.float32).min
    probs = attention_probs(q, k, scaling=1.0, additive_mask=additive)
    assert torch.all(probs[..., 0, :] == 0)
    assert torch.all(probs[..., 2, 1] == 0)
    torch.testing.assert_close(probs[..., 1:, :].sum(-1), torch.ones(1, 2, 2))


def test_expand_kv_heads_maps_h_to_h_over_group() -> None:
    key = torch.arange(3).float().view(1, 3, 1, 1).expand(1, 3, 2, 1)
    expanded = expand_kv_heads(key, 6)
    assert expanded[0, :, 0, 0].tolist() == [0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize(
    ("q_start", "rows", "k_start", "n_keys", "window"),
    [
        (0, 4, 0, 4, None),  # first block of a prompt: square, fully causal
        (8, 4, 0, 16, None),  # later block, keys rounded up past the last row (masked columns)
        (8, 4, 0, 12, 3),  # sliding window shorter than the block
        (5, 1, 2, 4, None),  # a decode step reading a cache window that starts at position 2
        (20, 6, 10, 16, 7),  # window, keys starting late, columns on both sides masked
    ],
)
def test_causal_block_probs_match_the_numpy_formula(
    q_start: int, rows: int, k_start: int, n_keys: int, window: int | None
) -> None:
    rng = np.random.default_rng(q_start + rows)
    q = rng.standard_normal((6, rows, 8)).astype(np.float32)
    k = rng.standard_normal((2, n_keys, 8)).astype(np.float32)
    q_pos = np.arange(q_start, q_start + rows)
    k_pos = np.arange(k_start, k_start + n_keys)
    diff = q_pos[:, None] - k_pos[None, :]
    allowed = (diff >= 0) & (diff < window if window is not None else True)
    got = causal_block_probs(
        torch.from_numpy(q),
        torch.from_numpy(k),
        scaling=0.3,
        q_start=q_start,
        k_start=k_start,
        sliding_window=window,
    )
    np.testing.assert_allclose(got.numpy(), _numpy_reference(q, k, 0.3, allowed), atol=1e-6)


def test_causal_block_probs_refuses_rows_without_their_own_key() -> None:
    with pytest.raises(ValueError, match="own position"):
        causal_block_probs(torch.zeros(2, 3, 4), torch.zeros(1, 2, 4), scaling=1.0, q_start=5, k_start=0)


@pytest.mark.parametrize(
    ("softcap", "additive"),
    [(None, False), (2.0, False), (None, True), (2.0, True)],
    ids=["sinks", "sinks+softcap", "sinks+alibi", "sinks+softcap+alibi"],
)
def test_sinks_match_numpy_with_gqa(softcap: float | None, additive: bool) -> None:
    """gpt-oss sinks: one logit per head joins each row's softmax as an extra column, then dropped;
    grouped-query heads (H=4, KVH=2), optionally with soft-capping and an additive mask (a per-head
    ALiBi bias plus torch.finfo(float32).min on the hidden keys)."""
    rng = np.random.default_rng(3)
    heads, kv_heads, rows, n_keys, dim = 4, 2, 5, 9, 8
    q = rng.standard_normal((heads, rows, dim)).astype(np.float32) * 2
    k = rng.standard_normal((kv_heads, n_keys, dim)).astype(np.float32) * 2
    sinks = np.array([0.5, -1.0, 2.0, 4.0], dtype=np.float32)  # mass from a few % to most of the row
    allowed = causal_allowed(torch.arange(4, 9), torch.arange(9), sliding_window=4).numpy()
    bias = None
    kwargs: dict[str, torch.Tensor] = {}
    if additive:
        distance = (np.arange(4, 9)[:, None] - np.arange(9)[None, :]).astype(np.float32)
        slopes = np.array([0.5, 0.25, 0.125, 0.0625], dtype=np.float32)
        bias = -slopes[:, None, None] * distance[None]  # ALiBi: [H, Tq, Tk]
        mask = np.where(allowed[None], bias, np.finfo(np.float32).min).astype(np.float32)
        kwargs["additive_mask"] = torch.from_numpy(mask)[None]
    else:
        kwargs["allowed"] = torch.from_numpy(allowed)
    got = attention_probs(
        torch.from_numpy(q)[None],
        torch.from_numpy(k)[None],
        scaling=0.3,
        softcap=softcap,
        sinks=torch.from_numpy(sinks),
        **kwargs,
    )
    assert got.dtype == torch.float32 and got.shape == (1, heads, rows, n_keys)
    ref = _numpy_reference(q, k, 0.3, allowed, softcap, bias, sinks)
    np.testing.assert_allclose(got[0].numpy(), ref, atol=1e-6)
    assert np.all(got[0].numpy()[:, ~allowed] == 0)
    mass = _numpy_sink_mass(q, k, 0.3, allowed, sinks, softcap, bias)
    assert mass.min() > 1e-4 and mass.max() < 1 - 1e-3 and mass.mean() > 0.05  # the sink matters
    np.testing.assert_allclose(got[0].sum(-1).numpy(), 1.0 - mass, atol=1e-6)


def test_sinks_row_without_visible_key_is_zero() -> None:
    rng = np.random.default_rng(4)
    q = torch.from_numpy(rng.standard_normal((1, 4, 3, 8)).astype(np.float32))
    k = torch.from_numpy(rng.standard_normal((1, 2, 3, 8)).astype(np.float32))
    sinks = torch.tensor([0.0, 1.0, -2.0, 30.0])
    allowed = torch.tensor([[False, False, False], [True, False, False], [True, True, True]])
    probs = attention_probs(q, k, scaling=0.5, allowed=allowed, sinks=sinks)
    assert not torch.isnan(probs).any()
    assert torch.all(probs[..., 0, :] == 0)  # a padding row: nothing visible, the sink takes it all
    assert torch.all(probs[..., 1, 1:] == 0)
    additive = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)
    same = attention_probs(q, k, scaling=0.5, additive_mask=additive, sinks=sinks)
    assert not torch.isnan(same).any()
    torch.testing.assert_close(same, probs)
    ref = _numpy_reference(q[0].numpy(), k[0].numpy(), 0.5, allowed.numpy(), sinks=sinks.numpy())
    np.testing.assert_allclose(probs[0].numpy(), ref, atol=1e-6)
    assert float(probs[0, 3, 1:].sum(-1).max()) < 1e-6  # a huge sink leaves almost nothing on keys
