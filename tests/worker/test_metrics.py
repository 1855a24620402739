"""Per-head summary metrics (HEAD_METRICS.md) against a plain per-row numpy reference, and pattern labels."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from storage.bundle.labels import SummaryParams, label_heads
from worker.capture.metrics import (
    QUANTILE_METRICS,
    QUANTILES,
    ROW_METRICS,
    HeadMetricsAccumulator,
    row_metrics,
)


def _k90_reference(a: np.ndarray) -> float:
    top, mass = np.sort(a)[::-1], 0.0
    for k, value in enumerate(top, start=1):
        mass += value
        if mass >= 0.9 - 1e-6:
            return float(k)
    return float(len(a))


def reference_row(row: np.ndarray, t: int, s: int, w: int) -> dict[str, float]:
    """One attention row (any width ≥ t + 1), straight from the spec text, in float64."""
    n = t + 1
    a = row[:n].astype(np.float64)
    a = a / a.sum()
    sink_set = set(range(min(s, n)))
    local_set = set(range(max(s, t - w + 1), t + 1))
    middle_set = [j for j in range(n) if j not in sink_set and j not in local_set]
    sink = sum(a[j] for j in sink_set)
    local = sum(a[j] for j in local_set)
    entropy = -sum(x * np.log(x) for x in a if x > 0)
    max_weight = a.max()
    middle = a[middle_set]
    mean_distance = sum(a[j] * (t - j) for j in range(n))
    return {
        "sink": sink,
        "bos": a[0],
        "local": local,
        "middle": 1.0 - sink - local,
        "prev": a[t - 1] if t >= 1 else 0.0,
        "self": a[t],
        "prev_argmax_rate": 1.0 if t >= 1 and int(np.argmax(a)) == t - 1 else 0.0,
        "max_weight": max_weight,
        "entropy": entropy,
        "entropy_norm": entropy / np.log(n) if n > 1 else 0.0,
        "effective_keys": np.exp(entropy),
        "k90": _k90_reference(a),
        "k90_frac": _k90_reference(a) / n,
        "sparsity_1pct": sum(1 for x in a if x < 0.01 * max_weight) / n,
        "mean_distance": mean_distance,
        "mean_distance_norm": mean_distance / t if t > 0 else 0.0,
        "middle_k90": _k90_reference(middle / middle.sum()) if middle.sum() > 0 else 0.0,
    }


def reference_block(probs: np.ndarray, positions: np.ndarray, s: int, w: int) -> dict[str, np.ndarray]:
    """``probs [H, n, K]`` → metric → ``[H, n]`` with a Python loop over every head and row."""
    heads, rows = probs.shape[:2]
    out = {name: np.zeros((heads, rows)) for name in ROW_METRICS}
    for h in range(heads):
        for i in range(rows):
            for name, value in reference_row(probs[h, i], int(positions[i]), s, w).items():
                out[name][h, i] = value
    return out


def random_attention(rng: np.random.Generator, heads: int, positions: np.ndarray, width: int) -> np.ndarray:
    """Causal softmax rows ``[H, n, width]`` (zero past each row's position); sharper for later heads."""
    probs = np.zeros((heads, len(positions), width), np.float32)
    for h in range(heads):
        scale = (0.3, 2.0, 6.0, 1.0)[h % 4]
        for i, t in enumerate(positions):
            logits = rng.standard_normal(t + 1) * scale
            e = np.exp(logits - logits.max())
            probs[h, i, : t + 1] = e / e.sum()
    return probs


@pytest.mark.parametrize(("s", "w"), [(4, 8), (1, 1), (3, 50)])
def test_row_metrics_match_numpy_reference(s: int, w: int) -> None:
    rng = np.random.default_rng(s * 100 + w)
    positions = np.array([0, 1, 2, 3, 5, 9, 12, 30, 52, 53, 57, 80, 119])  # t < s, windows clipped by S
    probs = random_attention(rng, 3, positions, width=140)  # K wider than t + 1
    got = row_metrics(torch.from_numpy(probs), torch.from_numpy(positions), sink_tokens=s, local_window=w)
    ref = reference_block(probs, positions, s, w)
    assert set(got) == set(ROW_METRICS)
    for name in ROW_METRICS:
        assert got[name].shape == (3, len(positions)) and got[name].dtype == torch.float32
        np.testing.assert_allclose(got[name].numpy(), ref[name], rtol=1e-5, atol=1e-5, err_msg=name)


def test_row_metrics_device_formulation_matches_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU's formulation (torch.sort and float64 torch.cumsum, xlogy), run on the CPU."""
    import worker.capture.metrics as metrics

    monkeypatch.setattr(metrics, "_host_kernels", lambda x: False)
    rng = np.random.default_rng(5)
    positions = np.array([0, 3, 9, 30, 52, 80, 119])
    probs = random_attention(rng, 4, positions, width=125)
    got = row_metrics(torch.from_numpy(probs), torch.from_numpy(positions), sink_tokens=4, local_window=8)
    ref = reference_block(probs, positions, 4, 8)
    for name in ROW_METRICS:
        np.testing.assert_allclose(got[name].numpy(), ref[name], rtol=1e-5, atol=1e-5, err_msg=name)


def test_row_metrics_k90_with_ties_and_mass_split_between_middle_and_window() -> None:
    """k90 merges the sorted middle with the sorted sink/local keys: exact where values tie (uniform
    and stepped rows), where the 0.9 crossing needs keys of both, and for early rows of a wide block."""
    positions = np.array([2, 7, 40, 150, 151, 299, 300])
    width, s, w = 301, 4, 64
    probs = np.zeros((5, len(positions), width), np.float32)
    rng = np.random.default_rng(11)
    for i, t in enumerate(positions):
        n = t + 1
        probs[0, i, :n] = 1.0 / n  # uniform: every value tied
        steps = np.where(np.arange(n) % 3 == 0, 4.0, 1.0)  # two tied levels, in every key set
        probs[1, i, :n] = steps / steps.sum()
        half = np.full(n, 1e-4)
        half[: min(s, n)] += 0.45 / min(s, n)  # sink 0.45, the rest over middle and local
        half[max(0, n - 3) :] += 0.3 / min(3, n)
        probs[2, i, :n] = half / half.sum()
        probs[3, i, :n] = rng.dirichlet(np.full(n, 0.05))  # very sharp
        probs[4, i, :n] = np.round(rng.dirichlet(np.full(n, 2.0)), 3) + 1e-3  # rounded: many ties
        probs[4, i, :n] /= probs[4, i, :n].sum()
    got = row_metrics(torch.from_numpy(probs), torch.from_numpy(positions), sink_tokens=s, local_window=w)
    ref = reference_block(probs, positions, s, w)
    for name in ("k90", "k90_frac", "middle_k90", "sink", "local", "middle", "sparsity_1pct", "entropy"):
        np.testing.assert_allclose(got[name].numpy(), ref[name], rtol=1e-5, atol=1e-5, err_msg=name)
    assert got["k90"][0].tolist() == [float(np.ceil((0.9 - 1e-6) * (t + 1))) for t in positions]


def test_row_metrics_runs_of_positions_share_their_geometry(monkeypatch: pytest.MonkeyPatch) -> None:
    """A run of positions (what the capture sends, every layer) is cached per device, run and window,
    within the byte budget; a cached run gives the reference's metrics for other probabilities."""
    import worker.capture.metrics as metrics

    monkeypatch.setattr(metrics, "_geometry_cache", metrics.OrderedDict())
    monkeypatch.setattr(metrics, "_geometry_bytes", [0])
    rng = np.random.default_rng(9)
    positions = np.arange(100, 140)
    for s, w in [(4, 8), (2, 16), (4, 8)]:
        probs = random_attention(rng, 2, positions, width=150)
        got = row_metrics(torch.from_numpy(probs), torch.from_numpy(positions), sink_tokens=s, local_window=w)
        ref = reference_block(probs, positions, s, w)
        for name in ROW_METRICS:
            np.testing.assert_allclose(got[name].numpy(), ref[name], rtol=1e-5, atol=1e-5, err_msg=name)
    cpu = torch.device("cpu")
    assert list(metrics._geometry_cache) == [(cpu, 100, 139, 2, 16), (cpu, 100, 139, 4, 8)]
    one = metrics._geometry_cache[(cpu, 100, 139, 4, 8)].nbytes()
    monkeypatch.setattr(metrics, "GEOMETRY_CACHE_BYTES", one + one // 2)
    positions = np.arange(101, 141)
    block = torch.from_numpy(random_attention(rng, 2, positions, width=150))
    row_metrics(block, torch.from_numpy(positions), sink_tokens=4, local_window=8)
    assert list(metrics._geometry_cache) == [(cpu, 101, 140, 4, 8)]  # the older ones dropped
    assert metrics._geometry_bytes[0] <= metrics.GEOMETRY_CACHE_BYTES


def test_row_metrics_renormalise_and_ignore_columns_past_t() -> None:
    rng = np.random.default_rng(7)
    positions = np.array([4, 20, 33])
    probs = random_attention(rng, 2, positions, width=40)
    dirty = probs * 0.7  # e.g. mass lost to a learned sink logit
    for i, t in enumerate(positions):
        dirty[:, i, t + 1 :] = 0.5  # garbage past the row's position
    clean = row_metrics(torch.from_numpy(probs), torch.from_numpy(positions), sink_tokens=2, local_window=5)
    got = row_metrics(torch.from_numpy(dirty), torch.from_numpy(positions), sink_tokens=2, local_window=5)
    for name in ROW_METRICS:
        np.testing.assert_allclose(got[name].numpy(), clean[name].numpy(), rtol=1e-5, atol=1e-6, err_msg=name)


def test_row_metrics_rejects_positions_outside_the_keys() -> None:
    with pytest.raises(ValueError, match="positions"):
        row_metrics(torch.zeros(1, 1, 4), torch.tensor([4]), sink_tokens=1, local_window=1)


# --- synthetic patterns -----------------------------------------------------------------------------

PATTERNS = (
    "uniform",
    "previous_token",
    "sink",
    "local",
    "streaming",
    "retrieval_candidate",
    "scattered",
    "mixed",
)
NEEDLES = [40, 90, 130, 170, 200]  # middle keys for every eligible row (t ≥ 271 with s = 4, W = 64)


def pattern_row(kind: str, t: int, rng: np.random.Generator, s: int = 4, w: int = 64) -> np.ndarray:
    """One attention row over keys ``0..t`` built to show ``kind`` (Yao Fu's patterns, HEAD_METRICS.md)."""
    n = t + 1
    j = np.arange(n)
    local = j >= max(s, t - w + 1)
    middle = np.flatnonzero((j >= s) & ~local)
    recency = np.where(local, np.exp(-(t - j) / 16.0), 0.0)  # peaks at the token itself, not t - 1
    recency /= recency.sum()
    a = np.zeros(n)
    if kind == "uniform":
        a[:] = 1.0 / n
    elif kind == "previous_token":
        a[:] = 0.4 / (n - 1)
        a[t - 1] = 0.6
    elif kind == "sink":
        a[:] = 0.1 / n
        a[:s] += 0.9 / s
    elif kind == "local":
        a = 0.05 / n + 0.95 * recency
    elif kind == "streaming":  # V-shape: sink + recent, little middle
        a[:s] = 0.6 / s
        a += 0.35 * recency
        a[middle] += 0.05 / len(middle)
    elif kind == "retrieval_candidate":  # concentrated middle: 5 keys
        a[:s] = 0.1 / s
        a += 0.1 * recency
        a[middle] += 0.02 / len(middle)
        a[NEEDLES] += 0.78 / len(NEEDLES)
    elif kind == "scattered":  # hundreds of middle keys
        keys = rng.choice(middle, size=min(200, len(middle)), replace=False)
        a[:s] = 0.1 / s
        a += 0.1 * recency
        a[keys] += 0.8 * rng.dirichlet(np.full(len(keys), 0.5))
    elif kind == "mixed":
        a[:s] = 0.4 / s
        a += 0.3 * recency
        a[middle] += 0.3 / len(middle)
    else:
        raise ValueError(kind)
    return a


def test_synthetic_patterns_get_their_labels() -> None:
    params = SummaryParams()
    rng = np.random.default_rng(0)
    prompt, generated = 1024, 8
    total = prompt + generated
    probs = np.zeros((len(PATTERNS), total, total), np.float32)
    for t in range(total):
        for h, kind in enumerate(PATTERNS):
            if t + 1 < params.min_keys:
                probs[h, t, t] = 1.0  # ineligible rows: would spoil every label if they were counted
            else:
                probs[h, t, : t + 1] = pattern_row(kind, t, rng)
    acc = HeadMetricsAccumulator(1, 1, len(PATTERNS), params)
    for start in range(0, prompt, 256):  # prefill blocks, keys 0..end-1
        end = start + 256
        acc.observe(0, 0, torch.from_numpy(probs[:, start:end, :end]), torch.arange(start, end))
    for t in range(prompt, total):  # one row per generated token
        acc.observe(0, 0, torch.from_numpy(probs[:, t : t + 1, : t + 1]), torch.tensor([t]))
    summary = acc.result()
    assert summary.rows.tolist() == [[total - params.min_keys + 1]]
    assert (summary.context_min[0, 0], summary.context_max[0, 0]) == (params.min_keys, total)
    labels = label_heads(summary.means, summary.rows[..., None], params)
    assert labels.shape == (1, 1, len(PATTERNS))
    assert labels[0, 0].tolist() == list(PATTERNS)
    pooled = label_heads(summary.pooled_means, summary.pooled_rows[:, None], params)
    assert pooled[0].tolist() == list(PATTERNS)


def test_short_prompt_is_undetermined() -> None:
    params = SummaryParams()
    positions = np.arange(100)  # every row has n < 4 (s + W) = 272 keys
    probs = random_attention(np.random.default_rng(1), 4, positions, width=100)
    acc = HeadMetricsAccumulator(2, 1, 4, params)
    for layer in range(2):
        acc.observe(layer, 0, torch.from_numpy(probs), torch.from_numpy(positions))
    summary = acc.result()
    assert summary.rows.tolist() == [[0], [0]] and summary.pooled_rows.tolist() == [0, 0]
    assert summary.context_min.tolist() == [[0], [0]] and summary.context_max.tolist() == [[0], [0]]
    for name in ROW_METRICS:
        assert summary.means[name].shape == (2, 1, 4) and np.isnan(summary.means[name]).all()
        assert np.isnan(summary.pooled_means[name]).all()
    for name in QUANTILE_METRICS:
        assert summary.quantiles[name].shape == (2, 1, 4, 3) and np.isnan(summary.quantiles[name]).all()
    labels = label_heads(summary.means, summary.rows[..., None], params)
    assert (labels == "undetermined").all()


# --- accumulation --------------------------------------------------------------------------------------

SMALL = SummaryParams(sink_tokens=2, local_window=6)  # min_keys = 32
LENGTHS = (60, 45)  # two sequences: 29 and 14 eligible rows


def _sequences(heads: int) -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    return [random_attention(rng, heads, np.arange(length), width=length) for length in LENGTHS]


def _feed(acc: HeadMetricsAccumulator, layer: int, batch: int, probs: np.ndarray, cuts: list[int]) -> None:
    for start, end in itertools.pairwise(cuts):
        acc.observe(layer, batch, torch.from_numpy(probs[:, start:end, :end]), torch.arange(start, end))


def test_blocks_equal_one_block_and_quantiles_match_reference() -> None:
    heads = 3
    seqs = _sequences(heads)
    blocks = HeadMetricsAccumulator(1, 2, heads, SMALL)
    whole = HeadMetricsAccumulator(1, 2, heads, SMALL)
    for b, probs in enumerate(seqs):
        length = probs.shape[1]
        # prefill blocks, then single rows
        _feed(blocks, 0, b, probs, [0, 20, 33, 40, *range(41, length + 1)])
        _feed(whole, 0, b, probs, [0, length])
    got, ref_summary = blocks.result(), whole.result()
    np.testing.assert_array_equal(got.rows, ref_summary.rows)
    np.testing.assert_array_equal(got.context_min, [[32, 32]])
    np.testing.assert_array_equal(got.context_max, [[60, 45]])
    for name in ROW_METRICS:
        np.testing.assert_allclose(got.means[name], ref_summary.means[name], rtol=1e-6, err_msg=name)
    for name in QUANTILE_METRICS:
        np.testing.assert_allclose(got.quantiles[name], ref_summary.quantiles[name], rtol=1e-6, err_msg=name)

    for b, probs in enumerate(seqs):
        positions = np.arange(SMALL.min_keys - 1, probs.shape[1])
        ref = reference_block(probs[:, positions], positions, SMALL.sink_tokens, SMALL.local_window)
        assert got.rows[0, b] == len(positions)
        for name in ROW_METRICS:
            np.testing.assert_allclose(got.means[name][0, b], ref[name].mean(-1), rtol=1e-5, atol=1e-5)
        for name in QUANTILE_METRICS:
            expected = np.quantile(ref[name], QUANTILES, axis=-1).T  # [H, 3]
            quantiles = got.quantiles[name][0, b]
            np.testing.assert_allclose(quantiles, expected, rtol=1e-5, atol=1e-5, err_msg=name)


def test_pooled_means_are_row_weighted() -> None:
    heads = 2
    seqs = _sequences(heads)
    acc = HeadMetricsAccumulator(2, 2, heads, SMALL)
    for layer in range(2):
        for b, probs in enumerate(seqs):
            _feed(acc, layer, b, probs, [0, 32, probs.shape[1]])
    summary = acc.result()
    rows = summary.rows.astype(np.float64)  # [L, B]
    assert rows.tolist() == [[29, 14], [29, 14]] and summary.pooled_rows.tolist() == [43, 43]
    for name in ROW_METRICS:
        means = summary.means[name].astype(np.float64)  # [L, B, H]
        weighted = (means * rows[..., None]).sum(1) / rows.sum(1)[:, None]
        np.testing.assert_allclose(summary.pooled_means[name], weighted, rtol=1e-5, atol=1e-6, err_msg=name)
    # the unweighted mean of the two sequences differs: the pooled mean is not that
    entropy = summary.means["entropy"]
    assert not np.allclose(summary.pooled_means["entropy"], entropy.mean(1), rtol=1e-4, atol=0)


def test_batched_blocks_equal_blocks_computed_one_by_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of the same run of positions wait and go through one row_metrics call (several layers and
    sequences at once); with no room to wait each block is computed alone: the same summary."""
    import worker.capture.metrics as metrics

    heads = 3
    seqs = _sequences(heads)

    def summary() -> metrics.HeadSummary:
        acc = HeadMetricsAccumulator(3, 2, heads, SMALL)
        for layer in range(3):
            for b, probs in enumerate(seqs):
                _feed(acc, layer, b, probs, [0, 40, probs.shape[1]])
        return acc.result()

    batched = summary()
    monkeypatch.setattr(metrics, "PENDING_BYTES", 0)  # every observation flushes at once
    alone = summary()
    np.testing.assert_array_equal(batched.rows, alone.rows)
    for name in ROW_METRICS:
        np.testing.assert_allclose(batched.means[name], alone.means[name], rtol=1e-6, atol=1e-7, err_msg=name)
    for name in QUANTILE_METRICS:
        np.testing.assert_allclose(batched.quantiles[name], alone.quantiles[name], rtol=1e-6, atol=1e-7)
    assert not np.allclose(batched.means["entropy"][0, 0], batched.means["entropy"][0, 1])  # 2 sequences


def test_blocks_flushed_in_inference_mode_then_outside() -> None:
    """The capture observes under ``torch.inference_mode`` (a full batch flushes there and creates the
    sums) and asks for the result outside it, where the last blocks are computed."""
    seqs = _sequences(2)
    inside, outside = HeadMetricsAccumulator(2, 1, 2, SMALL), HeadMetricsAccumulator(2, 1, 2, SMALL)
    with torch.inference_mode():
        _feed(inside, 0, 0, seqs[0], [0, 40])
        inside.flush()
        _feed(inside, 1, 0, seqs[0], [0, 40])  # waits for result()
    for layer in range(2):
        _feed(outside, layer, 0, seqs[0], [0, 40])
    a, b = inside.result(), outside.result()
    for name in ROW_METRICS:
        np.testing.assert_allclose(a.means[name], b.means[name], rtol=1e-6, atol=1e-7, err_msg=name)


def test_observe_checks_its_arguments() -> None:
    acc = HeadMetricsAccumulator(1, 1, 2, SMALL)
    with pytest.raises(IndexError):
        acc.observe(1, 0, torch.zeros(2, 1, 40), torch.tensor([39]))
    with pytest.raises(ValueError, match="probs"):
        acc.observe(0, 0, torch.zeros(3, 1, 40), torch.tensor([39]))


def test_a_rows_metrics_do_not_depend_on_the_rows_batched_with_it() -> None:
    """The accumulator batches blocks (layers, sequences) into one row_metrics call, and a job cut by
    layers batches fewer of them than one worker does: each row's metrics must be the same bits
    whatever it is batched with (a batched matmul's rounding is not: tests/worker/test_layer_shards.py
    compares the bundles byte for byte)."""
    rng = np.random.default_rng(7)
    positions = np.arange(79, 92)  # the shapes of the tiny model's layers, alone and two together
    one = torch.from_numpy(random_attention(rng, 4, positions, 92))
    others = torch.from_numpy(random_attention(rng, 4, positions, 92))
    alone = row_metrics(one, torch.from_numpy(positions), sink_tokens=4, local_window=16)
    batched = row_metrics(
        torch.cat([one, others]), torch.from_numpy(positions), sink_tokens=4, local_window=16
    )
    for name in ROW_METRICS:
        assert torch.equal(alone[name], batched[name][:4]), name
