"""Per-head summary metrics straight from q and k (Triton): :func:`worker.capture.metrics.row_metrics`
without materialised, renormalised and sorted probabilities.

:func:`fused_row_metrics` runs two kernels (:mod:`worker.capture.fused_kernels`) per slab of rows:

1. ``scores_kernel``: ``S = scaling · q kᵀ`` in fp32 (tensor-core products, fp32 accumulation:
   bf16 and fp16 products are exact in fp32, so the scores equal an fp32 matmul of the upcast
   values up to summation order), only for the keys up to each block's last row — written once;
2. ``rows_kernel``: one program per attention row, holding the row's visible scores in registers
   (at most :data:`MAX_FUSED_KEYS` keys; each run of rows launched with the smallest power-of-two
   width that holds its keys, :func:`row_runs`, so a causal prefill's early rows do not pay for the
   last row's width): softmax, then every :data:`ROW_METRICS` value in one pass, ``k90`` and
   ``middle_k90`` by halving a range of the weights' fp32 bit patterns (weights ≥ 0 order as their
   bit patterns do), both at once, until one key is left in it (rows of at most
   :data:`SEARCH_CANDIDATES` keys rank them all at once instead) — the same crossing of
   0.9 − tolerance as :func:`row_metrics`' float64 cumulative sum of the sorted row, ties at the
   crossing counted one by one.

Every row is read once from the scores, and no per-row sort is made: the metrics' memory traffic
is one fp32 write and one read per visible (row, key) where :func:`row_metrics` makes ≈ 13 passes
and a sort. Results equal :func:`row_metrics` on the same rows within fp32 rounding (``exp`` and
``log`` are the GPU's fast forms, the masses fp32 sums; a crossing that falls within that rounding
may move ``k90`` by one key) — ``tests/worker/test_fused_metrics.py``.

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

import torch

from worker.capture.metrics import K90_MASS, K90_TOLERANCE, ROW_METRICS, SPARSITY_FRACTION

MAX_FUSED_KEYS = 8192  # a row's visible scores live in one program's registers (32 a thread at 8 warps)
# fp32 scores written by one call at most (rows are taken in slabs, each slab's kernels a launch of
# their own: 256 MiB cut a micro-batch of 8 x 2,048 tokens into 16 slabs, 1.5 ms of the forward
# thread a layer call on an H100 host, 1 GiB into 4: 1.0 ms)
SCORES_BUDGET_BYTES = 1 << 30
_BLOCK_M = 16  # query rows of one scores tile (tl.dot's smallest): decoding steps, short chunks
_BLOCK_M_PREFILL = 64  # a prefill's: each key tile read once for 4× the rows
_BLOCK_N = 64  # keys of one scores tile
_MIN_ROW_KEYS = 16  # the narrowest rows program
KEYS_PER_WARP = 1024  # a rows program's warps: one per this many keys of its width (1 to 16)
SEARCH_CANDIDATES = 32  # rows of at most this many keys rank them all at once (no search)
# a longer row's search halves by mass alone while its range may hold more than this many keys (< 2:
# until it holds one), then counts them (an exact count narrows further only where rounding stopped
# it early); any value gives the same metrics, only the number of rounds of each kind changes
MASS_BOUND_KEYS = 1.5


log = logging.getLogger(__name__)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def fused_available(device: torch.device) -> bool:
    """Whether :func:`fused_row_metrics` can run on ``device``: Triton importable, and ``device`` a
    CUDA device (or the CPU under ``TRITON_INTERPRET=1``, Triton's interpreter)."""
    if importlib.util.find_spec("triton") is None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and _interpreting())


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def row_runs(n_rows: int, first_keys: int, max_width: int) -> list[tuple[int, int, int]]:
    """``(start, end, width)`` runs of rows ``0 .. n_rows - 1``, where row r has at most
    ``first_keys + r`` keys (at most ``max_width``, a power of two): each run's rows fit the
    power-of-two ``width`` (≥ 16), the smallest that holds the run's last row."""
    runs = []
    row = 0
    while row < n_rows:
        width = min(max_width, max(_MIN_ROW_KEYS, _next_power_of_two(first_keys + row)))
        end = n_rows if width == max_width else min(n_rows, width - first_keys + 1)
        runs.append((row, end, width))
        row = end
    return runs


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
    min_pad: int = 0,
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
    those). The call's key count must be ≤ :data:`MAX_FUSED_KEYS`. ``min_pad``: the fewest
    padding tokens of a wanted sequence, if the caller knows it (a host int; 0, the default, is
    always right): it sizes the rows' programs.
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
    from worker.capture.fused_kernels import rows_kernel, scores_kernel  # imports Triton

    precision = "ieee" if query.dtype == torch.float32 else "tf32"
    max_width = max(_MIN_ROW_KEYS, _next_power_of_two(width))
    padded_width = -(-width // _MIN_ROW_KEYS) * _MIN_ROW_KEYS
    block_m = _BLOCK_M_PREFILL if n_rows >= _BLOCK_M_PREFILL else _BLOCK_M
    slab = min(n_rows, max(1, SCORES_BUDGET_BYTES // (4 * batch * heads * padded_width)))
    if slab < n_rows:
        slab = max(block_m, slab // block_m * block_m)
    wanted = wanted.view(torch.uint8) if wanted.dtype == torch.bool else wanted  # bytes, no copy
    mask_strides = (0, 0, 0, 0) if mask is None else tuple(mask.stride())
    if mask is not None and mask.shape[1] == 1:
        mask_strides = (mask_strides[0], 0, mask_strides[2], mask_strides[3])
    for r0 in range(0, n_rows, slab):
        r1 = min(n_rows, r0 + slab)
        q = query[:, :, r0:r1]
        # rows padded to 16 keys: every view of them is 64-byte aligned, one compiled pattern
        scores = torch.empty((batch, heads, r1 - r0, padded_width), dtype=torch.float32, device=device)
        scores_kernel[(-(-(r1 - r0) // block_m), heads, batch)](
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
            BLOCK_M=block_m,
            BLOCK_N=_BLOCK_N,
            PRECISION=precision,
        )
        for a, b, block_k in row_runs(r1 - r0, query_offset + r0 + 1 - min_pad, max_width):
            warps = min(16, max(1, block_k // KEYS_PER_WARP))
            part = out[:, :, :, r0 + a : r0 + b]
            rows_kernel[(b - a, heads, batch)](
                scores[:, :, a:b],
                part,
                pads,
                wanted,
                query_offset + r0 + a,
                key_offset,
                scores if mask is None else mask[:, :, r0 + a : r0 + b].view(torch.uint8),  # no copy
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
                MASS_BOUND_KEYS,
                TARGET=K90_MASS - K90_TOLERANCE,
                BLOCK_K=block_k,
                CANDIDATES=SEARCH_CANDIDATES,
                HAS_MASK=mask is not None,
                **{name.upper(): i for i, name in enumerate(ROW_METRICS)},  # a new metric fails here
                num_warps=warps,
            )
    return out


# The self-check's case: grouped-query heads of very different sharpness, one left-padded sequence
# whose rows see 121 to 140 keys: both rows programs a prefill launches (up to 128 keys, the whole
# whole row ranked at once; 256, the search narrowed to one key).
_CHECK_SHAPE = {"heads": 4, "kv_heads": 2, "head_dim": 16, "keys": 143, "first": 123, "pad": 3}
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
