"""kvfidelity against a per-row numpy reference, plus exactness, monotonicity and accumulation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from worker.kvfidelity import METRICS, FidelityAccumulator, fidelity_block

G, N, T, D = 3, 7, 20, 16
SCALING = D**-0.5


def _data(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((T, D))
    v = rng.standard_normal((T, D))
    return {
        "q": rng.standard_normal((G, N, D)) * 2.0,
        "k": k,
        "v": v,
        "k_hat": k + 0.3 * rng.standard_normal((T, D)),
        "v_hat": v + 0.2 * rng.standard_normal((T, D)),
    }


def _causal(n: int = N, t: int = T) -> np.ndarray:
    """n query rows at the end of t keys: row i sees keys 0 .. t - n + i."""
    return np.arange(t)[None, :] <= (t - n + np.arange(n))[:, None]


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def _reference(d: dict[str, np.ndarray], allowed: np.ndarray) -> dict[str, np.ndarray]:
    out = {name: np.full((G, N), np.nan) for name in METRICS}
    for g in range(G):
        for i in range(N):
            idx = [j for j in range(T) if allowed[i, j]]
            if not idx:
                continue
            s = np.array([d["q"][g, i] @ d["k"][j] for j in idx])
            e = np.array([d["q"][g, i] @ d["k_hat"][j] for j in idx])
            out["score_cosine"][g, i] = s @ e / (np.linalg.norm(s) * np.linalg.norm(e))
            true = int(np.argmax(s))
            out["top1"][g, i] = float(true == int(np.argmax(e)))
            top = sorted(range(len(idx)), key=lambda j: -e[j])[:5]
            out["top5"][g, i] = float(true in top)
            p, pe = _softmax(SCALING * s), _softmax(SCALING * e)
            out["kl"][g, i] = sum(p[j] * np.log(p[j] / pe[j]) for j in range(len(idx)))
            out["tv"][g, i] = 0.5 * sum(abs(p[j] - pe[j]) for j in range(len(idx)))
            o = sum(p[j] * d["v"][idx[j]] for j in range(len(idx)))
            oe = sum(pe[j] * d["v_hat"][idx[j]] for j in range(len(idx)))
            out["output_rel_l2"][g, i] = np.linalg.norm(oe - o) / np.linalg.norm(o)
    return out


def _run(
    d: dict[str, np.ndarray],
    allowed: np.ndarray,
    block: int = 1 << 22,
    causal_offset: int | None = None,
    scores: bool = False,
) -> dict[str, torch.Tensor]:
    t = {name: torch.tensor(a, dtype=torch.float32) for name, a in d.items()}
    return fidelity_block(
        t["q"],
        t["k"],
        t["v"],
        t["q"] @ t["k_hat"].T if scores else None,
        None if scores else t["k_hat"],
        v_hat=t["v_hat"],
        scaling=SCALING,
        allowed=torch.from_numpy(allowed),
        causal_offset=causal_offset,
        max_block_elements=block,
    )


@pytest.mark.parametrize("block", [1 << 22, G * T * 2])
def test_matches_numpy_reference(block: int) -> None:
    d = _data()
    allowed = _causal()
    allowed[0] = False  # a row with no visible key: excluded
    allowed[1] = np.arange(T) < 3  # fewer than 5 keys: top-5 is "within all"
    allowed[2] = np.arange(T) < 6
    got = _run(d, allowed, block)
    ref = _reference(d, allowed)
    assert got["valid"].numpy().tolist() == np.broadcast_to(allowed.any(1), (G, N)).tolist()
    for name in METRICS:
        np.testing.assert_allclose(got[name].numpy(), ref[name], atol=1e-5, rtol=1e-5, err_msg=name)
    assert np.isnan(got["kl"][:, 0].numpy()).all()
    assert (got["top5"][:, 1].numpy() == 1.0).all()


@pytest.mark.parametrize("scores", [False, True])
@pytest.mark.parametrize("block", [1 << 22, G * T * 2])
def test_causal_blocks_read_only_their_visible_keys_and_equal_the_reference(block: int, scores: bool) -> None:
    """``causal_offset`` (rows at the end of the keys, as a prefill's or a decoding step's): each
    block stops at its last row's last visible key, with the same metrics as the numpy reference."""
    d = _data(5)
    allowed = _causal()
    got = _run(d, allowed, block, causal_offset=T - N, scores=scores)
    ref = _reference(d, allowed)
    for name in METRICS:
        np.testing.assert_allclose(got[name].numpy(), ref[name], atol=1e-5, rtol=1e-5, err_msg=name)
    assert got["valid"].all()


def test_exact_reconstruction_is_perfect() -> None:
    d = _data(1)
    d["k_hat"], d["v_hat"] = d["k"], d["v"]
    acc = FidelityAccumulator(1, 1)
    acc.add(0, 0, _run(d, _causal()))
    agg = acc.aggregate()
    assert agg["score_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert agg["top1"] == 100.0 and agg["top5"] == 100.0
    for name in ("kl", "tv", "output_rel_l2"):
        assert agg[name] == pytest.approx(0.0, abs=1e-6)


def test_degrades_monotonically_with_noise() -> None:
    rng = np.random.default_rng(99)  # not _data's seed: noise must be independent of k, v
    d = _data(2)
    noise_k, noise_v = rng.standard_normal((T, D)), rng.standard_normal((T, D))
    prev: dict[str, float] | None = None
    for level in (0.0, 0.05, 0.2, 0.5, 1.0):
        d["k_hat"], d["v_hat"] = d["k"] + level * noise_k, d["v"] + level * noise_v
        m = _run(d, _causal())
        cur = {name: float(np.nanmean(m[name].numpy())) for name in METRICS}
        if prev is not None:
            assert cur["score_cosine"] < prev["score_cosine"]
            for name in ("kl", "tv", "output_rel_l2"):
                assert cur[name] > prev[name], name
        prev = cur


def test_score_estimate_path_equals_k_hat_path() -> None:
    d = _data(3)
    allowed = torch.from_numpy(_causal())
    t = {name: torch.tensor(a, dtype=torch.float32) for name, a in d.items()}
    via_k = fidelity_block(
        t["q"], t["k"], t["v"], k_hat=t["k_hat"], v_hat=t["v_hat"], scaling=SCALING, allowed=allowed
    )
    scores = t["q"] @ t["k_hat"].T
    via_s = fidelity_block(t["q"], t["k"], t["v"], scores, v_hat=t["v_hat"], scaling=SCALING, allowed=allowed)
    for name in (*METRICS, "valid"):
        torch.testing.assert_close(via_s[name], via_k[name], equal_nan=True, msg=name)
    with pytest.raises(ValueError):
        fidelity_block(t["q"], t["k"], t["v"], v_hat=t["v_hat"], scaling=SCALING, allowed=allowed)


def test_accumulating_blocks_equals_one_big_block() -> None:
    d = _data(4)
    allowed = _causal()
    whole = FidelityAccumulator(2, 3)
    whole.add(1, 2, _run(d, allowed))
    pieces = FidelityAccumulator(2, 3)
    for lo, hi in ((0, 2), (2, 3), (3, N)):
        part = {**d, "q": d["q"][:, lo:hi]}
        pieces.add(1, 2, _run(part, allowed[lo:hi]))
    a, b = whole.result(), pieces.result()
    # fp32 scores of differently shaped blocks round differently: equal to ~1e-7, not bit-exact.
    assert a["rows"].tolist() == b["rows"].tolist() and int(a["rows"][1, 2]) == G * N
    assert np.isnan(a["kl"][0, 0]) and a["rows"][0, 0] == 0
    for name in METRICS:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-6, equal_nan=True)
        assert whole.aggregate()[name] == pytest.approx(pieces.aggregate()[name], rel=1e-6)
        assert whole.aggregate()[name] == pytest.approx(float(a[name][1, 2]), rel=1e-12)
    assert whole.aggregate()["rows"] == G * N
