"""Attention probabilities reconstructed from post-RoPE q and k (``capture.attention="derived"``).

Pure math, numpy only; an optional torch path (same formula, same fp32 arithmetic) is used when
torch is already imported in the process or asked for explicitly — it is never imported at module
import time and never required.

For one query row at position ``i`` and the keys at positions ``j`` (docs/bundle-format.md):

    s_ij = scaling · (q_i · k_j)                      fp32
    s_ij = softcap · tanh(s_ij / softcap)             only with logit soft-capping
    visible(i, j) = j ≤ i  and  i − j < window        (no window: j ≤ i)
                    and  i // chunk == j // chunk      (chunked attention, Llama 4; no chunk: always)
    p_ij = exp(s_ij − max_visible s_i) / Σ_visible exp(s_ij − max_visible s_i), 0 where not visible
    with a learned sink logit σ (``attention_sinks``): the denominator gains exp(σ − m), where
    m = max(max_visible s_i, σ); the row then sums to 1 minus the sink's mass

A row with no visible key is all zero. The softmax needs every visible key of a row, so callers pass
the whole visible key range even when only a slice of keys is wanted.
"""

from __future__ import annotations

import sys
from typing import Any, Literal

import numpy as np

Backend = Literal["auto", "numpy", "torch"]
# Bound on one block's score matrix (rows × keys, fp32): 2**25 elements = 128 MiB.
BLOCK_ELEMENTS = 1 << 25
DEFAULT_BLOCK_ROWS = 256


def visible_key_range(
    query_positions: np.ndarray, window: int | None, chunk: int | None = None
) -> tuple[int, int]:
    """``[lo, hi)`` of key positions visible to at least one of ``query_positions`` (non-empty)."""
    first = int(query_positions.min())
    hi = int(query_positions.max()) + 1
    lo = max(0, first - window + 1) if window else 0
    if chunk:
        lo = max(lo, first // chunk * chunk)
    return lo, hi


def use_torch(backend: Backend) -> bool:
    """``auto``: torch only when the process has already imported it (no surprise import cost)."""
    if backend == "numpy":
        return False
    if backend == "torch":
        return True
    return "torch" in sys.modules


def probabilities(
    q_rows: np.ndarray,
    keys: np.ndarray,
    query_positions: np.ndarray,
    key0: int,
    *,
    scaling: float,
    window: int | None,
    softcap: float | None = None,
    sink: float | None = None,
    chunk: int | None = None,
    backend: Backend = "auto",
    device: str | None = None,
) -> np.ndarray:
    """One block: ``q_rows [n, D]`` at ``query_positions [n]``, ``keys [K, D]`` at positions
    ``key0 .. key0 + K - 1`` → probabilities ``[n, K]`` float32 (zero where not visible)."""
    if use_torch(backend):
        return _probabilities_torch(
            q_rows,
            keys,
            query_positions,
            key0,
            scaling=scaling,
            window=window,
            softcap=softcap,
            sink=sink,
            chunk=chunk,
            device=device,
        )
    q32 = np.asarray(q_rows, dtype=np.float32)
    k32 = np.asarray(keys, dtype=np.float32)
    scores = (q32 @ k32.T) * np.float32(scaling)
    if softcap:
        scores = np.tanh(scores / np.float32(softcap)) * np.float32(softcap)
    hidden = _hidden(np.asarray(query_positions, dtype=np.int64), key0, keys.shape[0], window, chunk)
    scores[hidden] = -np.inf
    row_max = scores.max(axis=-1, keepdims=True)
    if sink is not None:
        row_max = np.maximum(row_max, np.float32(sink))
    row_max[~np.isfinite(row_max)] = 0.0  # rows with no visible key: all -inf, become zeros below
    np.exp(scores - row_max, out=scores)
    total = scores.sum(axis=-1, keepdims=True)
    if sink is not None:
        total += np.exp(np.float32(sink) - row_max)
    scores /= np.where(total > 0, total, 1.0).astype(np.float32)
    return scores


def _hidden(
    query_positions: np.ndarray, key0: int, num_keys: int, window: int | None, chunk: int | None
) -> np.ndarray:
    """Boolean ``[n, K]``: True where the key at position ``key0 + c`` is not visible to the row at
    ``query_positions[r]`` (later, outside the window, or in another chunk)."""
    keys = key0 + np.arange(num_keys, dtype=np.int64)[None, :]
    rows = query_positions[:, None]
    hidden: np.ndarray = keys > rows
    if window:
        hidden |= keys <= rows - window
    if chunk:
        hidden |= keys // chunk != rows // chunk
    return hidden


def _probabilities_torch(
    q_rows: np.ndarray,
    keys: np.ndarray,
    query_positions: np.ndarray,
    key0: int,
    *,
    scaling: float,
    window: int | None,
    softcap: float | None,
    sink: float | None,
    chunk: int | None,
    device: str | None,
) -> np.ndarray:
    import torch  # optional: only when asked for, or already imported by the caller

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    q32 = torch.from_numpy(np.ascontiguousarray(q_rows, dtype=np.float32)).to(dev)
    k32 = torch.from_numpy(np.ascontiguousarray(keys, dtype=np.float32)).to(dev)
    scores = torch.matmul(q32, k32.T) * scaling
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    hidden = torch.from_numpy(
        _hidden(np.asarray(query_positions, dtype=np.int64), key0, keys.shape[0], window, chunk)
    ).to(dev)
    scores = scores.masked_fill(hidden, float("-inf"))
    if sink is not None:  # the sink's column joins the softmax, then is dropped
        sink_column = torch.full_like(scores[:, :1], float(sink))
        probs = torch.softmax(torch.cat([scores, sink_column], dim=-1), dim=-1)[:, :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    out: np.ndarray = torch.nan_to_num(probs, nan=0.0).cpu().numpy()
    return out


def attention_block(
    q_rows: np.ndarray,
    keys: np.ndarray,
    query_positions: np.ndarray,
    key_positions: np.ndarray,
    *,
    length: int,
    key0: int = 0,
    scaling: float,
    window: int | None,
    softcap: float | None = None,
    sink: float | None = None,
    chunk: int | None = None,
    block_rows: int = DEFAULT_BLOCK_ROWS,
    backend: Backend = "auto",
    device: str | None = None,
    stats: dict[str, int] | None = None,
) -> np.ndarray:
    """Probabilities of one head ``[n, m]`` for rows at ``query_positions [n]`` and the keys at
    ``key_positions [m]`` (any order, repeats allowed).

    ``q_rows [n, D]``: the query vectors of those rows; ``keys [K, D]``: the head's keys at
    positions ``key0 .. key0 + K - 1``, covering every key visible to the valid rows (an array-like:
    only the visible range of each block is read).
    Rows at or past ``length`` and keys past ``length`` are zero. Rows are computed in blocks of at
    most ``block_rows`` rows and :data:`BLOCK_ELEMENTS` scores, each over every key visible to it;
    ``stats`` (optional) counts ``rows`` and ``blocks`` computed.
    """
    query_positions = np.asarray(query_positions, dtype=np.int64)
    key_positions = np.asarray(key_positions, dtype=np.int64)
    out = np.zeros((query_positions.size, key_positions.size), dtype=np.float32)
    valid = np.flatnonzero((query_positions >= 0) & (query_positions < length))
    if valid.size and visible_key_range(query_positions[valid], window, chunk)[0] < key0:
        raise ValueError(f"keys start at position {key0}: the rows need keys from an earlier position")
    if valid.size == 0 or key_positions.size == 0:
        return out
    order = valid[np.argsort(query_positions[valid], kind="stable")]
    start = 0
    while start < order.size:
        step = min(block_rows, order.size - start)
        while True:  # halve the block until its scores fit in BLOCK_ELEMENTS (one row always fits)
            block = order[start : start + step]
            positions = query_positions[block]
            key_lo, key_hi = visible_key_range(positions, window, chunk)
            if step == 1 or step * (key_hi - key_lo) <= BLOCK_ELEMENTS:
                break
            step //= 2
        probs = probabilities(
            np.asarray(q_rows)[block],
            np.asarray(keys[key_lo - key0 : key_hi - key0]),
            positions,
            key_lo,
            scaling=scaling,
            window=window,
            softcap=softcap,
            sink=sink,
            chunk=chunk,
            backend=backend,
            device=device,
        )
        wanted = (key_positions >= key_lo) & (key_positions < key_hi)
        if wanted.any():
            out[np.ix_(block, np.flatnonzero(wanted))] = probs[:, key_positions[wanted] - key_lo]
        if stats is not None:
            stats["rows"] = stats.get("rows", 0) + int(block.size)
            stats["blocks"] = stats.get("blocks", 0) + 1
        start += step
    return out


def materialised_bytes(layers: int, heads: int, lengths: list[int], itemsize: int = 2) -> int:
    """Bytes the causal lower triangle (diagonal included) of the same attention would take:
    ``layers × heads × Σ T (T + 1) / 2 × itemsize``."""
    return layers * heads * sum(n * (n + 1) // 2 for n in lengths) * itemsize


def describe() -> dict[str, Any]:
    """The reconstruction recipe, as recorded in the bundle's ``derived_attention`` attribute."""
    return {
        "formula": "p = softmax_j(scaling * q_i . k_j [softcap * tanh(./softcap)]) over visible j "
        "[and the layer's sink logit attention_sinks[layer, head], whose column is dropped], fp32",
        "visible": "j <= i and i - j < window (attention_window 0: no window) "
        "and i // chunk == j // chunk (attention_chunk 0: no chunks)",
        "gqa": "query head h reads kv head h // (num_heads // num_kv_heads)",
    }
