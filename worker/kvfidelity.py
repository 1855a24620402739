"""Fidelity of a compressed KV cache, measured with the model's real post-RoPE queries.

Pure torch (device-agnostic, fp32 math); see the "Fidelity report" section of KV_COMPRESSION.md.
Shapes: G query heads reading one kv head, n query rows, T keys, d head_dim.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

METRICS: tuple[str, ...] = ("score_cosine", "top1", "top5", "kl", "tv", "output_rel_l2")
PERCENT_METRICS: frozenset[str] = frozenset({"top1", "top5"})
_TINY = 1e-30
CAUSAL_BLOCK_ROWS = 256  # query rows per block when blocks stop at their last visible key


def fidelity_block(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_scores_est: Tensor | None = None,
    k_hat: Tensor | None = None,
    *,
    v_hat: Tensor,
    scaling: float,
    allowed: Tensor,
    softcap: float | None = None,
    causal_offset: int | None = None,
    max_block_elements: int = 1 << 22,
) -> dict[str, Tensor]:
    """Per-row fidelity of estimated attention against exact attention for one kv head.

    ``q [G, n, d]`` real queries; ``k, v [T, d]`` exact keys / values; the estimate is either
    ``k_scores_est [G, n, T]`` (unscaled estimated scores q·k̃, e.g. TurboQuant-prod's unbiased
    estimator) or ``k_hat [T, d]`` (exactly one of the two); ``v_hat [T, d]`` the decoded values;
    ``allowed [n, T]`` bool (True = attend). ``scaling`` (and optional ``softcap``, applied as
    ``tanh(s/c)·c`` after scaling) shape the logits before softmax; the cosine uses raw scores.

    Returns float32 ``[G, n]`` tensors for every name in ``METRICS`` (``top1``/``top5`` are 0/1)
    plus ``valid [G, n]`` bool. Rows with no allowed key are invalid: every metric is NaN there.
    Query rows are processed in blocks so that one ``[G, rows, T]`` temporary holds at most
    ``max_block_elements`` elements. ``causal_offset``: keys are in position order and row ``i``
    sees no key past index ``i + causal_offset`` (``allowed`` says the same; causal attention),
    so a block of rows reads only the keys its last row can see: about half the work of a prefill.
    """
    if (k_scores_est is None) == (k_hat is None):
        raise ValueError("give exactly one of k_scores_est and k_hat")
    if q.dim() != 3 or k.dim() != 2 or v.dim() != 2 or v_hat.shape != v.shape:
        raise ValueError(f"bad shapes q={tuple(q.shape)} k={tuple(k.shape)} v={tuple(v.shape)}")
    groups, n, _ = q.shape
    t = k.shape[0]
    if allowed.shape != (n, t):
        raise ValueError(f"allowed is {tuple(allowed.shape)}, expected {(n, t)}")
    if k_scores_est is not None and k_scores_est.shape != (groups, n, t):
        raise ValueError(f"k_scores_est is {tuple(k_scores_est.shape)}, expected {(groups, n, t)}")
    if k_hat is not None and k_hat.shape != k.shape:
        raise ValueError(f"k_hat is {tuple(k_hat.shape)}, expected {tuple(k.shape)}")

    kf, vf, vhf = k.float(), v.float(), v_hat.float()
    khf = k_hat.float() if k_hat is not None else None
    rows = max(1, max_block_elements // max(1, groups * t))
    if causal_offset is not None:  # smaller blocks: each stops at its own last visible key
        rows = min(rows, CAUSAL_BLOCK_ROWS)
    parts: list[dict[str, Tensor]] = []
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        keys = t if causal_offset is None else max(1, min(t, stop + causal_offset))
        qb = q[:, start:stop].float()
        if khf is not None:
            est = qb @ khf[:keys].T
        else:
            assert k_scores_est is not None
            est = k_scores_est[:, start:stop, :keys].float()
        parts.append(
            _block_metrics(
                qb @ kf[:keys].T,
                est,
                vf[:keys],
                vhf[:keys],
                allowed[start:stop, :keys],
                scaling,
                softcap,
            )
        )
    return {name: torch.cat([p[name] for p in parts], dim=1) for name in (*METRICS, "valid")}


def _block_metrics(
    s: Tensor,
    s_est: Tensor,
    v: Tensor,
    v_hat: Tensor,
    allowed: Tensor,
    scaling: float,
    softcap: float | None,
) -> dict[str, Tensor]:
    """``s, s_est [G, b, T]`` raw scores, ``allowed [b, T]`` → metrics ``[G, b]``."""
    mask = allowed.to(device=s.device, dtype=torch.bool).expand_as(s)
    count = mask.sum(-1)
    valid = count > 0
    zero = torch.zeros((), device=s.device, dtype=s.dtype)
    neg_inf = torch.full((), float("-inf"), device=s.device, dtype=s.dtype)

    a, b = torch.where(mask, s, zero), torch.where(mask, s_est, zero)
    denom = (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(_TINY)
    cosine = (a * b).sum(-1) / denom

    ms, me = torch.where(mask, s, neg_inf), torch.where(mask, s_est, neg_inf)
    true_arg = ms.argmax(-1)
    top1 = (me.argmax(-1) == true_arg).float()
    # Disallowed keys sit at -inf, so with fewer than 5 allowed keys every allowed key is in the top-k.
    top_idx = me.topk(min(5, s.shape[-1]), dim=-1).indices
    top5 = (top_idx == true_arg[..., None]).any(-1).float()

    lp, lq = _log_probs(s, mask, scaling, softcap), _log_probs(s_est, mask, scaling, softcap)
    p, p_est = lp.exp(), lq.exp()
    kl = torch.where(mask, p * (lp - lq), zero).sum(-1).clamp_min(0.0)
    tv = 0.5 * (p - p_est).abs().sum(-1)

    out, out_est = p @ v, p_est @ v_hat
    rel = (out_est - out).norm(dim=-1) / out.norm(dim=-1).clamp_min(_TINY)

    nan = torch.full((), float("nan"), device=s.device, dtype=s.dtype)
    metrics = dict(score_cosine=cosine, top1=top1, top5=top5, kl=kl, tv=tv, output_rel_l2=rel)
    result = {name: torch.where(valid, m, nan) for name, m in metrics.items()}
    result["valid"] = valid
    return result


def _log_probs(scores: Tensor, mask: Tensor, scaling: float, softcap: float | None) -> Tensor:
    """Masked log-softmax of scaled (soft-capped) scores; disallowed keys (and empty rows) → -inf."""
    logits = scores * scaling
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    logp = torch.log_softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)
    return logp.nan_to_num(nan=float("-inf"))


@dataclass
class FidelityStats:
    """Running float64 sums of each metric over valid rows, per (layer, kv head), plus row counts."""

    num_layers: int
    num_kv_heads: int
    sums: dict[str, np.ndarray] = field(default_factory=dict)
    rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def __post_init__(self) -> None:
        shape = (self.num_layers, self.num_kv_heads)
        for name in METRICS:
            self.sums.setdefault(name, np.zeros(shape, dtype=np.float64))
        if self.rows.shape != shape:
            self.rows = np.zeros(shape, dtype=np.int64)

    def merge(self, other: FidelityStats) -> None:
        """Add another accumulator's sums (e.g. from another job shard) into this one."""
        if self.rows.shape != other.rows.shape:
            raise ValueError("cannot merge stats of different (layers, kv heads) shapes")
        for name in METRICS:
            self.sums[name] += other.sums[name]
        self.rows += other.rows


class FidelityAccumulator:
    """Accumulates ``fidelity_block`` metrics over blocks / steps, per (layer position, kv head)."""

    def __init__(self, num_layers: int, num_kv_heads: int) -> None:
        self.stats = FidelityStats(num_layers, num_kv_heads)

    def add(self, layer_pos: int, kv_head: int, metrics: dict[str, Tensor]) -> None:
        """Add the valid rows of one ``fidelity_block`` result (``valid`` key, else finite rows)."""
        if not (0 <= layer_pos < self.stats.num_layers and 0 <= kv_head < self.stats.num_kv_heads):
            raise IndexError(f"(layer {layer_pos}, kv head {kv_head}) is out of range")
        host = {name: metrics[name].detach().to("cpu", torch.float64) for name in METRICS}
        if "valid" in metrics:
            valid = metrics["valid"].detach().to("cpu", torch.bool)
        else:
            valid = torch.stack([torch.isfinite(host[name]) for name in METRICS]).all(0)
        for name in METRICS:
            self.stats.sums[name][layer_pos, kv_head] += float(host[name][valid].sum())
        self.stats.rows[layer_pos, kv_head] += int(valid.sum())

    def result(self) -> dict[str, np.ndarray]:
        """Metric → ``[L, KVH]`` mean over valid rows (top1/top5 in %; NaN where no rows), plus
        ``rows [L, KVH]`` int64. The row-weighted overall means are in ``aggregate()``."""
        rows = self.stats.rows
        out: dict[str, np.ndarray] = {}
        for name in METRICS:
            with np.errstate(invalid="ignore", divide="ignore"):
                out[name] = np.where(rows > 0, self.stats.sums[name] / rows, np.nan) * _scale(name)
        out["rows"] = rows.copy()
        return out

    def aggregate(self) -> dict[str, float]:
        """Metric → mean over every valid row of every (layer, kv head) (top1/top5 in %), plus
        ``rows`` (the total count, as float); NaN means when nothing was added."""
        total = int(self.stats.rows.sum())
        out = {
            name: float(self.stats.sums[name].sum() / total * _scale(name)) if total else float("nan")
            for name in METRICS
        }
        out["rows"] = float(total)
        return out


def _scale(name: str) -> float:
    return 100.0 if name in PERCENT_METRICS else 1.0
