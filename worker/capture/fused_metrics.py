"""Per-head summary metrics straight from q and k (Triton): :func:`worker.capture.metrics.row_metrics`
without materialised, renormalised and sorted probabilities.

:func:`fused_row_metrics` runs two kernels per call:

1. ``_scores_kernel``: ``S = scaling · q kᵀ`` in fp32 (tensor-core products, fp32 accumulation:
   bf16 and fp16 products are exact in fp32, so the scores equal an fp32 matmul of the upcast
   values up to summation order), only for the keys up to each block's last row — written once;
2. ``_rows_kernel``: one program per attention row, holding the row's visible scores in registers
   (at most :data:`MAX_FUSED_KEYS` keys): softmax, then every :data:`ROW_METRICS` value in one
   pass, ``k90`` and ``middle_k90`` by a bisection on the fp32 bit patterns of the weights (weights
   ≥ 0 order as their bit patterns do), masses in float64 — the same crossing of 0.9 − tolerance as
   :func:`row_metrics`' float64 cumulative sum of the sorted row, ties at the crossing counted as
   one by one.

Every row is read once from the scores, and no per-row sort is made: the metrics' memory traffic
is one fp32 write and one read per visible (row, key) where :func:`row_metrics` makes ≈ 13 passes
and a sort. Results equal :func:`row_metrics` on the same rows within fp32 rounding (``exp`` and
``log`` are the GPU's fast forms; a crossing that falls within that rounding may move ``k90`` by
one key) — ``tests/worker/test_fused_metrics.py``.

Triton is optional: :func:`fused_available` says whether a device can take this path (CUDA with
Triton installed, or Triton's CPU interpreter when ``TRITON_INTERPRET=1``, which the tests use),
and :func:`fused_verified` whether the kernels, compiled by the Triton the worker has, give
:func:`row_metrics`' values there (checked once per process, device and dtype; the capture keeps
the probability path where they do not).

Shapes: B sequences, H query heads, KVH kv heads, n query rows, K keys, D head_dim, M metrics.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from typing import Any

import torch

from worker.capture.metrics import K90_MASS, K90_TOLERANCE, ROW_METRICS, SPARSITY_FRACTION

MAX_FUSED_KEYS = 8192  # a row's visible scores live in one program's registers (32 a thread at 8 warps)
SCORES_BUDGET_BYTES = 256 << 20  # fp32 scores written by one call at most (rows are taken in slabs)
_BLOCK_M = 16  # query rows of one scores tile (tl.dot's smallest)
_BLOCK_N = 64  # keys of one scores tile


log = logging.getLogger(__name__)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def fused_available(device: torch.device) -> bool:
    """Whether :func:`fused_row_metrics` can run on ``device``: Triton importable, and ``device`` a
    CUDA device (or the CPU under ``TRITON_INTERPRET=1``, Triton's interpreter)."""
    if importlib.util.find_spec("triton") is None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and _interpreting())


@functools.cache
def _kernels() -> tuple[Any, Any]:
    """Compile-on-first-use kernels (Triton is imported here, not when this module is)."""
    import triton
    import triton.language as tl

    @triton.jit
    def scores_kernel(  # type: ignore[no-untyped-def]  # Triton kernels: tensors and constexprs, untyped
        q_ptr,
        k_ptr,
        s_ptr,
        pads_ptr,
        wanted_ptr,
        query_offset,
        key_offset,
        stride_qb,
        stride_qh,
        stride_qn,
        stride_qd,
        stride_kb,
        stride_kh,
        stride_kn,
        stride_kd,
        stride_sb,
        stride_sh,
        stride_sn,
        n_rows,
        head_dim,
        groups,
        scaling,
        D: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        block = tl.program_id(0)
        head = tl.program_id(1)
        seq = tl.program_id(2)
        pad = tl.load(pads_ptr + seq)
        first_key = pad - key_offset  # key index of the sequence's real position 0
        # real position of query row 0; a sequence not wanted: before any key (nothing computed)
        first_pos = tl.where(tl.load(wanted_ptr + seq) != 0, query_offset - pad, -(1 << 40))
        rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
        dims = tl.arange(0, D)
        row_ok = rows < n_rows
        q = tl.load(
            q_ptr
            + seq * stride_qb
            + head * stride_qh
            + rows[:, None] * stride_qn
            + dims[None, :] * stride_qd,
            mask=row_ok[:, None] & (dims[None, :] < head_dim),
            other=0.0,
        )
        last_row = tl.minimum(block * BLOCK_M + BLOCK_M, n_rows) - 1
        key_end = first_pos + last_row + 1  # real key positions 0 .. key_end - 1 (causal)
        k_base = k_ptr + seq * stride_kb + (head // groups) * stride_kh
        for start in range(0, key_end, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            col_ok = cols < key_end
            k = tl.load(
                k_base + (first_key + cols)[None, :] * stride_kn + dims[:, None] * stride_kd,
                mask=col_ok[None, :] & (dims[:, None] < head_dim),
                other=0.0,
            )
            scores = tl.dot(q, k, input_precision=PRECISION) * scaling
            tl.store(
                s_ptr + seq * stride_sb + head * stride_sh + rows[:, None] * stride_sn + cols[None, :],
                scores,
                mask=row_ok[:, None] & col_ok[None, :],
            )

    @triton.jit
    def rows_kernel(  # type: ignore[no-untyped-def]
        s_ptr,
        out_ptr,
        pads_ptr,
        wanted_ptr,
        query_offset,
        key_offset,
        mask_ptr,
        stride_mb,
        stride_mh,
        stride_mn,
        stride_mk,
        window,
        stride_sb,
        stride_sh,
        stride_sn,
        stride_om,
        stride_ob,
        stride_oh,
        sink_tokens,
        local_window,
        sparsity,
        TARGET: tl.constexpr,
        BLOCK_K: tl.constexpr,
        HAS_MASK: tl.constexpr,
        # where each metric goes: its index in ROW_METRICS (the caller passes them by name)
        SINK: tl.constexpr,
        BOS: tl.constexpr,
        LOCAL: tl.constexpr,
        MIDDLE: tl.constexpr,
        PREV: tl.constexpr,
        SELF: tl.constexpr,
        PREV_ARGMAX_RATE: tl.constexpr,
        MAX_WEIGHT: tl.constexpr,
        ENTROPY: tl.constexpr,
        ENTROPY_NORM: tl.constexpr,
        EFFECTIVE_KEYS: tl.constexpr,
        K90: tl.constexpr,
        K90_FRAC: tl.constexpr,
        SPARSITY_1PCT: tl.constexpr,
        MEAN_DISTANCE: tl.constexpr,
        MEAN_DISTANCE_NORM: tl.constexpr,
        MIDDLE_K90: tl.constexpr,
    ):
        row = tl.program_id(0)
        head = tl.program_id(1)
        seq = tl.program_id(2)
        pad = tl.load(pads_ptr + seq)
        # the row's real position (< 0: a padding row, or a sequence not wanted)
        t = tl.where(tl.load(wanted_ptr + seq) != 0, query_offset - pad + row, -1)
        t = tl.maximum(t, 0)
        cols = tl.arange(0, BLOCK_K)
        reach = tl.where(window > 0, window, t + 1)  # keys a row can see back: its window, or all
        visible = (cols <= t) & (t - cols < reach)
        if HAS_MASK:  # the model's boolean mask (True = attend), at the sequence's key indices
            first_key = pad - key_offset
            allowed = tl.load(
                mask_ptr
                + seq * stride_mb
                + head * stride_mh
                + row * stride_mn
                + (first_key + cols) * stride_mk,
                mask=visible,
                other=0,
            )
            visible = visible & (allowed != 0)
        scores = tl.load(
            s_ptr + seq * stride_sb + head * stride_sh + row * stride_sn + cols,
            mask=visible,
            other=-float("inf"),
        )
        top = tl.max(scores, 0)
        top = tl.where(top == -float("inf"), 0.0, top)  # a row with no visible key: zeros, never NaN
        weights = tl.where(visible, tl.exp(scores - top), 0.0)
        p = weights / tl.maximum(tl.sum(weights, 0), 1e-30)
        a = p / tl.maximum(tl.sum(p, 0), 1e-30)  # renormalised as row_metrics does
        n_keys = (t + 1).to(tl.float32)

        local_start = tl.maximum(t - local_window + 1, sink_tokens)
        is_sink = visible & (cols < sink_tokens)
        is_local = visible & (cols >= local_start)
        is_middle = visible & (cols >= sink_tokens) & (cols < local_start)
        max_weight = tl.max(a, 0)
        argmax = tl.min(tl.where(visible & (a == max_weight), cols, BLOCK_K), 0)
        plogp = tl.where(a > 0, a * tl.log(tl.maximum(a, 1e-30)), 0.0)
        entropy = -tl.sum(plogp, 0)
        log_n = tl.log(n_keys)
        # keys 0..t a window or mask hides weigh 0: below 1% of the maximum, as row_metrics counts them
        below = tl.sum(((cols <= t) & (a < sparsity * max_weight)).to(tl.int32), 0)
        distance = (t - cols).to(tl.float32)
        mean_distance = tl.sum(tl.where(visible, a * distance, 0.0), 0)

        # k90 and middle_k90: the largest bit pattern θ whose weights ≥ θ reach the target mass
        wide = a.to(tl.float64)
        bits = a.to(tl.int32, bitcast=True)  # a ≥ 0: bit patterns order as the values
        middle_bits = tl.where(is_middle, bits, -1)
        middle = tl.sum(tl.where(is_middle, wide, 0.0), 0)
        target = tl.full((), TARGET, tl.float64)  # float64, as row_metrics' threshold
        target_middle = target * middle
        lo = 0
        hi = 0x3F800001  # above 1.0's pattern: no weight reaches it
        lo_m = 0
        hi_m = 0x3F800001
        for _ in range(31):
            c = (lo + hi) // 2
            reached = tl.sum(tl.where(bits >= c, wide, 0.0), 0) >= target
            lo = tl.where(reached, c, lo)
            hi = tl.where(reached, hi, c)
            c_m = (lo_m + hi_m) // 2
            reach_m = tl.sum(tl.where(middle_bits >= c_m, wide, 0.0), 0) >= target_middle
            lo_m = tl.where(reach_m, c_m, lo_m)
            hi_m = tl.where(reach_m, hi_m, c_m)
        # above θ: all of them; at θ (ties): one by one until the target is reached
        above = bits > lo
        mass_above = tl.sum(tl.where(above, wide, 0.0), 0)
        at = bits == lo
        tie_value = tl.max(tl.where(at, wide, 0.0), 0)
        ties = tl.sum(at.to(tl.int32), 0)
        need = tl.math.ceil((target - mass_above) / tl.maximum(tie_value, 1e-30))
        k90 = tl.sum(above.to(tl.int32), 0) + tl.minimum(tl.maximum(need, 1.0), ties.to(tl.float64)).to(
            tl.int32
        )
        k90 = tl.minimum(k90.to(tl.float32), n_keys)
        above_m = middle_bits > lo_m
        mass_above_m = tl.sum(tl.where(above_m, wide, 0.0), 0)
        at_m = middle_bits == lo_m
        tie_m = tl.max(tl.where(at_m, wide, 0.0), 0)
        ties_m = tl.sum(at_m.to(tl.int32), 0)
        need_m = tl.math.ceil((target_middle - mass_above_m) / tl.maximum(tie_m, 1e-30))
        middle_k90 = tl.sum(above_m.to(tl.int32), 0) + tl.minimum(
            tl.maximum(need_m, 1.0), ties_m.to(tl.float64)
        ).to(tl.int32)
        middle_k90 = tl.where(middle > 0, middle_k90.to(tl.float32), 0.0)

        out = out_ptr + seq * stride_ob + head * stride_oh + row
        has_prev = t >= 1
        tl.store(out + SINK * stride_om, tl.sum(tl.where(is_sink, a, 0.0), 0))
        tl.store(out + BOS * stride_om, tl.sum(tl.where(cols == 0, a, 0.0), 0))
        tl.store(out + LOCAL * stride_om, tl.sum(tl.where(is_local, a, 0.0), 0))
        tl.store(out + MIDDLE * stride_om, middle.to(tl.float32))
        tl.store(out + PREV * stride_om, tl.sum(tl.where(has_prev & (cols == t - 1), a, 0.0), 0))
        tl.store(out + SELF * stride_om, tl.sum(tl.where(cols == t, a, 0.0), 0))
        tl.store(out + PREV_ARGMAX_RATE * stride_om, tl.where(has_prev & (argmax == t - 1), 1.0, 0.0))
        tl.store(out + MAX_WEIGHT * stride_om, max_weight)
        tl.store(out + ENTROPY * stride_om, entropy)
        tl.store(out + ENTROPY_NORM * stride_om, tl.where(log_n > 0, entropy / tl.maximum(log_n, 1e-30), 0.0))
        tl.store(out + EFFECTIVE_KEYS * stride_om, tl.exp(entropy))
        tl.store(out + K90 * stride_om, k90)
        tl.store(out + K90_FRAC * stride_om, k90 / n_keys)
        tl.store(out + SPARSITY_1PCT * stride_om, below.to(tl.float32) / n_keys)
        tl.store(out + MEAN_DISTANCE * stride_om, mean_distance)
        tl.store(
            out + MEAN_DISTANCE_NORM * stride_om,
            tl.where(has_prev, mean_distance / tl.maximum(t.to(tl.float32), 1.0), 0.0),
        )
        tl.store(out + MIDDLE_K90 * stride_om, middle_k90)

    return scores_kernel, rows_kernel


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def fused_row_metrics(
    query: torch.Tensor,
    key: torch.Tensor,
    pads: torch.Tensor,
    wanted: torch.Tensor,
    *,
    query_offset: int,
    key_offset: int,
    scaling: float,
    sink_tokens: int,
    local_window: int,
    mask: torch.Tensor | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Every :data:`ROW_METRICS` value of each query row: ``[M, B, H, n]`` float32 on the query's
    device, in :data:`ROW_METRICS`' order.

    ``query [B, H, n, D]``, ``key [B, KVH, Kc, D]`` (grouped-query: head h reads kv head
    ``h // (H // KVH)``), in a left-padded batch: ``pads [B]`` (long, on the device) padding tokens of
    each sequence, ``wanted [B]`` (uint8 or bool, on the device) the sequences to compute (others
    get values that mean nothing, at almost no cost). Query row i is at padded position
    ``query_offset + i``, key index j at ``key_offset + j``: sequence b's row i is at real position
    ``t = query_offset + i - pads[b]`` and sees real keys ``0 .. t`` (key index ``pads[b] -
    key_offset + position``), within ``sliding_window`` if set, and where ``mask [B, 1|H, n, Kc]``
    (bool, True = attend, at key indices) allows. Rows at a negative position (padding) or with no
    visible key get values that mean nothing. Softmax of the plain
    scaled scores only: no soft-cap, sinks or additive bias (callers take :func:`row_metrics` for
    those). The call's key count must be ≤ :data:`MAX_FUSED_KEYS`.
    """
    batch, heads, n_rows, head_dim = query.shape
    kv_heads = key.shape[1]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads is not a multiple of {kv_heads} kv heads")
    if mask is not None and mask.dtype != torch.bool:
        raise ValueError(f"mask must be boolean, got {mask.dtype}")
    device = query.device
    out = torch.empty((len(ROW_METRICS), batch, heads, n_rows), dtype=torch.float32, device=device)
    if n_rows == 0 or batch == 0:
        return out
    width = int(key.shape[2])  # no row sees more keys than the call has
    if width > MAX_FUSED_KEYS:
        raise ValueError(f"{width} keys is over MAX_FUSED_KEYS = {MAX_FUSED_KEYS}")
    scores_kernel, rows_kernel = _kernels()
    precision = "ieee" if query.dtype == torch.float32 else "tf32"
    block_k = max(16, _next_power_of_two(width))
    slab = min(n_rows, max(1, SCORES_BUDGET_BYTES // (4 * batch * heads * width)))
    if slab < n_rows:
        slab = max(_BLOCK_M, slab // _BLOCK_M * _BLOCK_M)
    wanted = wanted.view(torch.uint8) if wanted.dtype == torch.bool else wanted  # bytes, no copy
    mask_strides = (0, 0, 0, 0) if mask is None else tuple(mask.stride())
    if mask is not None and mask.shape[1] == 1:
        mask_strides = (mask_strides[0], 0, mask_strides[2], mask_strides[3])
    for r0 in range(0, n_rows, slab):
        r1 = min(n_rows, r0 + slab)
        q = query[:, :, r0:r1]
        scores = torch.empty((batch, heads, r1 - r0, width), dtype=torch.float32, device=device)
        scores_kernel[(-(-(r1 - r0) // _BLOCK_M), heads, batch)](
            q,
            key,
            scores,
            pads,
            wanted,
            query_offset + r0,
            key_offset,
            *q.stride(),
            *key.stride(),
            scores.stride(0),
            scores.stride(1),
            scores.stride(2),
            r1 - r0,
            head_dim,
            heads // kv_heads,
            scaling,
            D=max(16, _next_power_of_two(head_dim)),
            BLOCK_M=_BLOCK_M,
            BLOCK_N=_BLOCK_N,
            PRECISION=precision,
        )
        part = out[:, :, :, r0:r1]
        rows_kernel[(r1 - r0, heads, batch)](
            scores,
            part,
            pads,
            wanted,
            query_offset + r0,
            key_offset,
            scores if mask is None else mask[:, :, r0:r1].view(torch.uint8),  # bytes, no copy
            *mask_strides,
            sliding_window or 0,
            scores.stride(0),
            scores.stride(1),
            scores.stride(2),
            part.stride(0),
            part.stride(1),
            part.stride(2),
            sink_tokens,
            local_window,
            SPARSITY_FRACTION,
            TARGET=K90_MASS - K90_TOLERANCE,
            BLOCK_K=block_k,
            HAS_MASK=mask is not None,
            **{name.upper(): i for i, name in enumerate(ROW_METRICS)},  # a new metric fails here
            num_warps=4 if block_k <= 2048 else 8,
        )
    return out


# The self-check's case: grouped-query heads of very different sharpness, one left-padded sequence.
_CHECK_SHAPE = {"heads": 4, "kv_heads": 2, "head_dim": 16, "keys": 40, "first": 8, "pad": 3}
_CHECK_SINK_TOKENS, _CHECK_LOCAL_WINDOW = 2, 4


@functools.cache
def fused_verified(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether :func:`fused_row_metrics` runs on ``device`` for ``dtype`` inputs and equals
    :func:`row_metrics` of the probabilities on a small case (every metric within fp32 rounding,
    ``k90`` within one key). Run once per (device, dtype) in a process, when a capture first could
    take the fused path: a Triton that cannot compile the kernels, or compiles them wrongly, costs
    the probability path's speed, never a job or a wrong summary. A failure is logged as a warning
    with its reason."""
    if not fused_available(device):
        return False
    try:
        problem = _check(device, dtype)
    except Exception as exc:  # any compile or launch failure means "not here"
        problem = f"{type(exc).__name__}: {exc}"
    if problem:
        log.warning("fused summary kernels not used on %s for %s: %s", device, dtype, problem)
    return not problem


def _check(device: torch.device, dtype: torch.dtype) -> str:
    """'' when the fused kernels agree with :func:`row_metrics` on the self-check's case."""
    from worker.capture.attention_math import attention_probs, causal_allowed
    from worker.capture.metrics import row_metrics

    shape = _CHECK_SHAPE
    heads, kv_heads, dim = shape["heads"], shape["kv_heads"], shape["head_dim"]
    keys, first, pad = shape["keys"], shape["first"], shape["pad"]
    gen = torch.Generator().manual_seed(0)
    sharpness = torch.tensor([0.3, 1.0, 2.5, 4.0])[:heads, None, None]
    q = (torch.randn(heads, keys, dim, generator=gen) * sharpness).to(dtype)
    k = torch.randn(kv_heads, keys, dim, generator=gen).to(dtype)
    scaling = dim**-0.5
    positions = torch.arange(first, keys) - pad  # the real positions of the padded rows first..
    got = (
        fused_row_metrics(
            q[None, :, first:].to(device),
            k[None].to(device),
            torch.tensor([pad], device=device),
            torch.tensor([True], device=device),
            query_offset=first,
            key_offset=0,
            scaling=scaling,
            sink_tokens=_CHECK_SINK_TOKENS,
            local_window=_CHECK_LOCAL_WINDOW,
        )[:, 0]
        .cpu()
        .double()
    )
    allowed = causal_allowed(positions, torch.arange(keys - pad))
    probs = attention_probs(
        q[None, :, first:].float(), k[None, :, pad:].float(), scaling=scaling, allowed=allowed
    )[0]
    want = row_metrics(probs, positions, sink_tokens=_CHECK_SINK_TOKENS, local_window=_CHECK_LOCAL_WINDOW)
    for i, name in enumerate(ROW_METRICS):
        g, w = got[i], want[name].cpu().double()
        if not torch.isfinite(g).all():
            return f"{name} is not finite"
        slack = 1.0 if name in ("k90", "middle_k90") else 1e-3 + 1e-3 * float(w.abs().max())
        worst = float((g - w).abs().max())
        if worst > slack:
            return f"{name} differs from row_metrics by {worst:.3g} (allowed {slack:.3g})"
    return ""
