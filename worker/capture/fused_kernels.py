"""The Triton kernels behind :func:`worker.capture.fused_metrics.fused_row_metrics` (the contract,
shapes and launch live there). Importing this module imports Triton: ``fused_metrics`` imports it
only when a capture takes the fused path.

- :func:`scores_kernel`: ``S = scaling · q kᵀ`` in fp32 for one tile of query rows, only the keys up
  to the tile's last row (causal), written once;
- :func:`rows_kernel`: one program per attention row, the row's visible scores held in registers
  (``BLOCK_K`` ≥ its key count, chosen per run of rows by the caller): softmax, the one-pass metrics,
  then ``k90`` and ``middle_k90`` by a search for the largest fp32 bit pattern θ whose weights ≥ θ
  reach the target mass (weights ≥ 0 order as their bit patterns do). The search halves a range of
  patterns, both metrics' searches in one reduction a round, from the row's largest weight down to
  a weight below which the row's keys cannot hold the mass that is missing (``(1 - target) / 2``
  spread over every key); once a range holds at most ``CANDIDATES`` keys, those are gathered (a
  prefix sum, through a per-program scratch) and the search ends on them alone, so a long row is
  read only by the first few rounds. The keys above θ count in full, the ties at θ one by one until
  the target is reached, as :func:`worker.capture.metrics.row_metrics`' sorted cumulative sum does.
"""

from __future__ import annotations

import inspect

import triton
import triton.language as tl

# Triton compiles a kernel again for each new pattern of its integer arguments (equal to 1 or not,
# a multiple of 16 or not) and of its pointers' 16-byte alignment. Arguments that change with a
# sequence's length or position are left unspecialised, so a job compiles each kernel once per
# width, not once per length; the scores' rows are padded to 16 keys so their strides and views
# keep one pattern. The innermost strides (always 1) stay specialised: contiguous loads.
_UNALIGNED = "do_not_specialize_on_alignment"  # a Triton without it compiles per alignment
_SCORES_VARYING = ["query_offset", "key_offset", "n_rows"]
_ROWS_VARYING = [
    *_SCORES_VARYING,
    "stride_mb",
    "stride_mh",
    "stride_mn",
    "stride_om",
    "stride_ob",
    "stride_oh",
]
_ROWS_UNALIGNED = ["out_ptr", "mask_ptr"]  # views starting at any row
_ROWS_OPTIONS: dict[str, list[str]] = {_UNALIGNED: _ROWS_UNALIGNED}
if _UNALIGNED not in inspect.signature(triton.jit).parameters:
    _ROWS_OPTIONS = {}


@triton.jit
def _sum4(w, x, y, z):
    """The sums of four ``[K]`` tensors in one reduction."""
    sums = tl.sum(tl.join(tl.join(w, x), tl.join(y, z)), 0)  # [2, 2]: (w, x) down, (·, ·) across
    wx, yz = tl.split(sums)
    sw, sx = tl.split(wx)
    sy, sz = tl.split(yz)
    return sw, sx, sy, sz


@triton.jit
def _narrow(  # type: ignore[no-untyped-def]
    bits,
    a,
    bits_m,
    a_m,
    lo,
    hi,
    n_in,
    mass_hi,
    count_hi,
    lo_m,
    hi_m,
    n_in_m,
    mass_hi_m,
    count_hi_m,
    target,
    target_m,
    LIMIT: tl.constexpr,
):
    """Both searches (``bits``/``a``: k90's keys, ``bits_m``/``a_m``: middle_k90's) halved together,
    one reduction a round, until each range ``[lo, hi)`` is one bit pattern wide or holds at most
    ``LIMIT`` keys. Invariant: the keys at or above ``lo`` reach the target, those at or above
    ``hi`` (``count_hi`` keys, ``mass_hi`` of the mass, whether in ``bits`` or not) do not;
    ``n_in`` keys lie in the range, all of them in ``bits``."""
    while ((hi - lo > 1) & (n_in > LIMIT)) | ((hi_m - lo_m > 1) & (n_in_m > LIMIT)):
        c = lo + (hi - lo) // 2
        c_m = lo_m + (hi_m - lo_m) // 2
        upper = (bits >= c) & (bits < hi)
        upper_m = (bits_m >= c_m) & (bits_m < hi_m)
        mass_up, count_up, mass_up_m, count_up_m = _sum4(
            tl.where(upper, a, 0.0), upper.to(tl.float32), tl.where(upper_m, a_m, 0.0), upper_m.to(tl.float32)
        )
        reached = mass_hi + mass_up >= target
        lo = tl.where(reached, c, lo)
        hi = tl.where(reached, hi, c)
        n_in = tl.where(reached, count_up, n_in - count_up)
        mass_hi = tl.where(reached, mass_hi, mass_hi + mass_up)
        count_hi = tl.where(reached, count_hi, count_hi + count_up)
        reached_m = mass_hi_m + mass_up_m >= target_m
        lo_m = tl.where(reached_m, c_m, lo_m)
        hi_m = tl.where(reached_m, hi_m, c_m)
        n_in_m = tl.where(reached_m, count_up_m, n_in_m - count_up_m)
        mass_hi_m = tl.where(reached_m, mass_hi_m, mass_hi_m + mass_up_m)
        count_hi_m = tl.where(reached_m, count_hi_m, count_hi_m + count_up_m)
    return lo, hi, n_in, mass_hi, count_hi, lo_m, hi_m, n_in_m, mass_hi_m, count_hi_m


@triton.jit
def _compact(bits, keep, base, slots, n_kept, SLOTS: tl.constexpr):  # type: ignore[no-untyped-def]
    """The ``bits`` where ``keep`` (at most ``SLOTS`` of them, ``n_kept``), gathered into ``[SLOTS]``
    through the program's scratch at ``base`` (-1 in the slots left over)."""
    place = tl.cumsum(keep.to(tl.int32), 0) - 1
    tl.store(base + place, bits, mask=keep & (place < SLOTS))
    tl.debug_barrier()  # every thread's stores are seen by every thread's loads
    return tl.load(base + slots, mask=slots < n_kept, other=-1)


@triton.jit
def _weights(bits):
    """The weights whose fp32 bit patterns ``bits`` are (0 where -1: no key)."""
    return tl.where(bits >= 0, bits.to(tl.float32, bitcast=True), 0.0)


@triton.jit
def _crossing(lo, n_in, mass_hi, count_hi, target):
    """How many of the largest weights reach ``target`` once the search has ended: the ``count_hi``
    keys above θ = ``lo``, then the ``n_in`` ties at θ one by one until the target is reached."""
    tie = tl.maximum(lo, 0).to(tl.float32, bitcast=True).to(tl.float64)
    need = tl.math.ceil((target.to(tl.float64) - mass_hi.to(tl.float64)) / tl.maximum(tie, 1e-30))
    return count_hi + tl.minimum(tl.maximum(need, 1.0), n_in.to(tl.float64)).to(tl.float32)


@triton.jit(do_not_specialize=_SCORES_VARYING)
def scores_kernel(  # type: ignore[no-untyped-def]
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
        q_ptr + seq * stride_qb + head * stride_qh + rows[:, None] * stride_qn + dims[None, :] * stride_qd,
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


@triton.jit(do_not_specialize=_ROWS_VARYING, **_ROWS_OPTIONS)
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
    scratch_ptr,
    n_heads,
    n_rows,
    TARGET: tl.constexpr,
    BLOCK_K: tl.constexpr,
    CANDIDATES: tl.constexpr,
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
            mask_ptr + seq * stride_mb + head * stride_mh + row * stride_mn + (first_key + cols) * stride_mk,
            mask=visible,
            other=0,
        )
        visible = visible & (allowed != 0)
    scores = tl.load(
        s_ptr + seq * stride_sb + head * stride_sh + row * stride_sn + cols, mask=visible, other=-float("inf")
    )
    top = tl.max(scores, 0)
    top = tl.where(top == -float("inf"), 0.0, top)  # a row with no visible key: zeros, never NaN
    weights = tl.where(visible, tl.exp(scores - top), 0.0)
    p = weights / tl.maximum(tl.sum(weights, 0), 1e-30)
    a = p / tl.maximum(tl.sum(p, 0), 1e-30)  # renormalised as row_metrics does
    n_keys = (t + 1).to(tl.float32)

    # the one-pass metrics, stored before the k90 search (their registers are free for it)
    local_start = tl.maximum(t - local_window + 1, sink_tokens)
    is_middle = visible & (cols >= sink_tokens) & (cols < local_start)
    max_weight = tl.max(a, 0)
    argmax = tl.min(tl.where(visible & (a == max_weight), cols, BLOCK_K), 0)
    has_prev = t >= 1
    wide = a.to(tl.float64)  # these sums in float64: middle sets middle_k90's target
    sink, local, middle, mean_distance = _sum4(
        tl.where(visible & (cols < sink_tokens), wide, 0.0),
        tl.where(visible & (cols >= local_start), wide, 0.0),
        tl.where(is_middle, wide, 0.0),
        tl.where(visible, wide * (t - cols).to(tl.float64), 0.0),
    )
    bos, prev, self_weight, entropy = _sum4(
        tl.where(cols == 0, a, 0.0),
        tl.where(has_prev & (cols == t - 1), a, 0.0),
        tl.where(cols == t, a, 0.0),
        -tl.where(a > 0, a * tl.log(tl.maximum(a, 1e-30)), 0.0),
    )
    # keys 0..t a window or mask hides weigh 0: below 1% of the maximum, as row_metrics counts them
    below = tl.sum(((cols <= t) & (a < sparsity * max_weight)).to(tl.int32), 0)
    log_n = tl.log(n_keys)
    out = out_ptr + seq * stride_ob + head * stride_oh + row
    tl.store(out + SINK * stride_om, sink.to(tl.float32))
    tl.store(out + BOS * stride_om, bos)
    tl.store(out + LOCAL * stride_om, local.to(tl.float32))
    tl.store(out + MIDDLE * stride_om, middle.to(tl.float32))
    tl.store(out + PREV * stride_om, prev)
    tl.store(out + SELF * stride_om, self_weight)
    tl.store(out + PREV_ARGMAX_RATE * stride_om, tl.where(has_prev & (argmax == t - 1), 1.0, 0.0))
    tl.store(out + MAX_WEIGHT * stride_om, max_weight)
    tl.store(out + ENTROPY * stride_om, entropy)
    tl.store(out + ENTROPY_NORM * stride_om, tl.where(log_n > 0, entropy / tl.maximum(log_n, 1e-30), 0.0))
    tl.store(out + EFFECTIVE_KEYS * stride_om, tl.exp(entropy))
    tl.store(out + SPARSITY_1PCT * stride_om, below.to(tl.float32) / n_keys)
    tl.store(out + MEAN_DISTANCE * stride_om, mean_distance.to(tl.float32))
    tl.store(
        out + MEAN_DISTANCE_NORM * stride_om,
        tl.where(has_prev, mean_distance.to(tl.float32) / tl.maximum(t.to(tl.float32), 1.0), 0.0),
    )

    # k90 and middle_k90: the largest bit pattern θ whose weights ≥ θ reach the target mass
    bits = tl.where(visible, a.to(tl.int32, bitcast=True), -1)  # a ≥ 0: patterns order as values
    middle_bits = tl.where(is_middle, bits, -1)
    target = tl.full((), TARGET, tl.float32)
    target_m = TARGET * middle
    spread = 0.5 * (1.0 - TARGET) / n_keys  # below it, every key together holds ≤ (1 - TARGET) / 2
    hi = tl.max(bits, 0) + 1
    lo = tl.minimum(spread.to(tl.int32, bitcast=True), hi - 1)
    hi_m = tl.max(middle_bits, 0) + 1
    lo_m = tl.minimum((spread * middle.to(tl.float32)).to(tl.int32, bitcast=True), hi_m - 1)
    n_in, n_in_m, _, _ = _sum4((bits >= lo).to(tl.float32), (middle_bits >= lo_m).to(tl.float32), a, a)
    zero = tl.zeros((), tl.float32)
    lo, hi, n_in, mass_hi, count_hi, lo_m, hi_m, n_in_m, mass_hi_m, count_hi_m = _narrow(
        bits,
        a,
        middle_bits,
        a,
        lo,
        hi,
        n_in,
        zero,
        zero,
        lo_m,
        hi_m,
        n_in_m,
        zero,
        zero,
        target,
        target_m,
        CANDIDATES,
    )
    if CANDIDATES > 0:  # the rest of the search on the ≤ CANDIDATES keys left in each range
        base = scratch_ptr + ((seq * n_heads + head) * n_rows + row) * (2 * CANDIDATES)
        slots = tl.arange(0, CANDIDATES)
        found = _compact(bits, (bits >= lo) & (bits < hi), base, slots, n_in, CANDIDATES)
        found_m = _compact(
            middle_bits,
            (middle_bits >= lo_m) & (middle_bits < hi_m),
            base + CANDIDATES,
            slots,
            n_in_m,
            CANDIDATES,
        )
        lo, hi, n_in, mass_hi, count_hi, lo_m, hi_m, n_in_m, mass_hi_m, count_hi_m = _narrow(
            found,
            _weights(found),
            found_m,
            _weights(found_m),
            lo,
            hi,
            n_in,
            mass_hi,
            count_hi,
            lo_m,
            hi_m,
            n_in_m,
            mass_hi_m,
            count_hi_m,
            target,
            target_m,
            0,
        )
    k90 = tl.minimum(_crossing(lo, n_in, mass_hi, count_hi, target), n_keys)
    middle_k90 = tl.where(middle > 0, _crossing(lo_m, n_in_m, mass_hi_m, count_hi_m, target_m), 0.0)
    tl.store(out + K90 * stride_om, k90)
    tl.store(out + K90_FRAC * stride_om, k90 / n_keys)
    tl.store(out + MIDDLE_K90 * stride_om, middle_k90)
