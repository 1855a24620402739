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
    """Boolean ``[..., Tq, Tk]``: key j visible to query i iff ``k_j <= q_i`` (and ``q_i - k_j <
    window``), for positions ``[..., Tq]`` and ``[..., Tk]`` (the leading dimensions broadcast)."""
    diff = q_positions[..., :, None] - k_positions[..., None, :]
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
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention probabilities in fp32 for one block of query rows.

    ``query [B, H, Tq, D]``, ``key [B, KVH, Tk, D]`` (grouped-query expanded here);
    ``allowed`` boolean broadcastable to ``[B, H, Tq, Tk]`` (True = attend), or ``additive_mask``
    (0 / large negative, or a bias such as ALiBi) of the same shape. ``softcap``: logits become
    ``softcap · tanh(logits / softcap)`` before the mask (Gemma 2). ``sinks [H]``: one learned logit
    per head that joins every row's softmax without being a key (gpt-oss): rows then sum to
    ``1 - sink mass``. Returns ``softmax(scaling · Q Kᵀ (+ soft-cap) + mask (, sink))`` over the keys,
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
    if sinks is not None:
        return _softmax_with_sinks(scores, sinks.float())
    probs = torch.softmax(scores, dim=-1)
    return torch.nan_to_num(probs, nan=0.0)


def _softmax_with_sinks(scores: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """``scores [B, H, Tq, Tk]`` and ``sinks [H]``: the key columns of
    ``softmax([scores, sink])`` (the sink's own column dropped), as the model normalises them."""
    sink = sinks.view(1, -1, 1, 1)
    top = torch.maximum(scores.amax(dim=-1, keepdim=True), sink)  # finite: the sink is always there
    weights = torch.exp(scores - top)
    return weights / (weights.sum(dim=-1, keepdim=True) + torch.exp(sink - top))


def causal_block_probs(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    scaling: float,
    q_start: int,
    k_start: int,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Causal attention probabilities in fp32 for one block of query rows of one sequence.

    ``query [H, n, D]``: rows at positions ``q_start .. q_start + n - 1``; ``key [KVH, K, D]``: keys at
    positions ``k_start .. k_start + K - 1``. Equals :func:`attention_probs` with
    :func:`causal_allowed` (and the window), but cheaper: grouped-query heads share their kv head
    through a reshape instead of an expanded copy, and only the columns where some row can be
    masked (right of the first row, or too old for the last row's window) are masked. Every row
    must see at least one key (its own position is in ``key``); returns ``[H, n, K]``.
    """
    num_heads, rows, head_dim = query.shape
    kv_heads, n_keys, _ = key.shape
    if num_heads % kv_heads:
        raise ValueError(f"{num_heads} query heads is not a multiple of {kv_heads} kv heads")
    if not k_start <= q_start + rows - 1 < k_start + n_keys:
        raise ValueError("the last row's own position must be among the keys")
    groups = num_heads // kv_heads
    # scaling applied to q ([H, n, D]) rather than to the scores ([H, n, K]): K/D times fewer products
    q = (query.float() * scaling).reshape(kv_heads, groups * rows, head_dim)  # head h = kv * groups + g
    scores = torch.matmul(q, key.float().transpose(-1, -2)).view(num_heads, rows, n_keys)
    q_pos = torch.arange(q_start, q_start + rows, device=query.device)
    first_future = max(0, q_start + 1 - k_start)  # columns before it are in every row's past
    if first_future < n_keys:
        k_pos = torch.arange(k_start + first_future, k_start + n_keys, device=query.device)
        scores[:, :, first_future:].masked_fill_(k_pos[None, :] > q_pos[:, None], float("-inf"))
    if sliding_window is not None:
        too_old = min(n_keys, q_start + rows - sliding_window - k_start)  # columns some row cannot see
        if too_old > 0:
            k_pos = torch.arange(k_start, k_start + too_old, device=query.device)
            hidden = q_pos[:, None] - k_pos[None, :] >= sliding_window
            scores[:, :, :too_old].masked_fill_(hidden, float("-inf"))
    # softmax in place (one [H, n, K] buffer): every row has a finite maximum (its own key)
    scores.sub_(scores.amax(dim=-1, keepdim=True)).exp_()
    return scores.div_(scores.sum(dim=-1, keepdim=True))
