"""Pure tensor math for attention capture (no model, no I/O): testable on CPU.

Shapes are named in every docstring: B batch, H query heads, KVH kv heads, Tq query rows,
Tk keys, D head_dim.
"""

from __future__ import annotations

import torch


def expand_kv_heads(key: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``key [B, KVH, Tk, D]`` → ``[B, H, Tk, D]``: query head h reads kv head ``h // (H // KVH)``."""
    batch, kv_heads, seq_len, head_dim = key.shape
    if num_heads % kv_heads:
        raise ValueError(f"{num_heads} query heads is not a multiple of {kv_heads} kv heads")
    groups = num_heads // kv_heads
    if groups == 1:
        return key
    return (
        key[:, :, None]
        .expand(batch, kv_heads, groups, seq_len, head_dim)
        .reshape(batch, num_heads, seq_len, head_dim)
    )


def causal_allowed(
    q_positions: torch.Tensor, k_positions: torch.Tensor, sliding_window: int | None = None
) -> torch.Tensor:
    """Boolean ``[Tq, Tk]``: key j visible to query i iff ``k_j <= q_i`` (and ``q_i - k_j < window``)."""
    diff = q_positions[:, None] - k_positions[None, :]
    allowed = diff >= 0
    if sliding_window is not None:
        allowed &= diff < sliding_window
    return allowed


def attention_probs(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    scaling: float,
    allowed: torch.Tensor | None = None,
    additive_mask: torch.Tensor | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention probabilities in fp32 for one block of query rows.

    ``query [B, H, Tq, D]``, ``key [B, KVH, Tk, D]`` (grouped-query expanded here);
    ``allowed`` boolean broadcastable to ``[B, H, Tq, Tk]`` (True = attend), or ``additive_mask``
    (0 / large negative) of the same shape. Returns ``softmax(scaling · Q Kᵀ (+ soft-cap) + mask)``
    ``[B, H, Tq, Tk]`` float32; rows with no visible key (padding rows) are all zero, never NaN.
    """
    num_heads = query.shape[1]
    key_full = expand_kv_heads(key, num_heads)
    scores = torch.matmul(query.float(), key_full.float().transpose(-1, -2)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    allowed_mask: torch.Tensor | None = allowed
    if additive_mask is not None:
        scores = scores + additive_mask.float()
        allowed_mask = additive_mask > torch.finfo(additive_mask.dtype).min / 2
    if allowed_mask is not None:
        scores = scores.masked_fill(~allowed_mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.nan_to_num(probs, nan=0.0)
