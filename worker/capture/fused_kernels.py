"""The Triton kernels behind :func:`worker.capture.fused_metrics.fused_row_metrics` (the contract,
shapes and launch live there). Importing this module imports Triton: ``fused_metrics`` imports it
only when a capture takes the fused path.

- :func:`scores_kernel`: ``S = scaling · q kᵀ`` in fp32 for one tile of query rows, only the keys up
  to the tile's last row (causal), written once;
- :func:`rows_kernel`: one program per attention row, the row's visible scores held in registers
  (``BLOCK_K`` ≥ its key count, chosen per run of rows by the caller). It works on the weights
  ``w = exp(score - top)`` (the top key weighs exactly 1; the attention is ``w / Σw``): every sum
  of the one-pass metrics in two reductions, the entropy as ``ln Σw - Σ w·(score - top) / Σw`` (no
  log per key), ``bos``/``prev``/``self`` read as single keys. Then ``k90`` and ``middle_k90``: the
  fewest keys whose weights reach the target mass. Rows of at most ``CANDIDATES`` keys rank their
  keys against each other at once (``[S, S]``: key i comes after the heavier keys and after its ties
  in earlier slots; the first key in that order whose mass reaches the target ends the count). Longer
  rows narrow a range of fp32 bit patterns (weights ≥ 0 order as their patterns do) by halving,
  both searches in one reduction a round and a round only a compare, a select and an add per key:
  from the top weight down to a weight below which the row's keys cannot hold the mass that is
  missing (``(1 - target) / 2`` spread over every key), until the range's mass proves it holds at
  most one key (each key in it weighs at least its lower end); the keys at and above it are then
  counted (an exact-count halving goes on where rounding stopped the bound early), and that one key
  is the crossing — ties counted one by one, as :func:`worker.capture.metrics.row_metrics`' sorted
  cumulative sum does: a range narrowed to one bit pattern (many equal weights) counts its ties by
  division. Nothing is gathered to rank (an earlier form gathered the last 32 keys through a
  scratch buffer): the search holds only the weights and the middle keys' patterns, so a program
  needs fewer registers and more rows run at once on a multiprocessor (158 registers a thread for
  2,048 keys on 2 warps, against 240).
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
_HIDDEN = tl.constexpr(-1e30)  # a hidden key's score: finite, so its weight 0 times it is 0
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
def _sum2(x, y):
    """The sums of two ``[K]`` tensors in one reduction."""
    return tl.split(tl.sum(tl.join(x, y), 0))


@triton.jit
def _sum2_rows(x, y):
    """The row sums of two ``[S, S]`` tensors in one reduction."""
    return tl.split(tl.sum(tl.join(x, y), 1))


@triton.jit
def _value(pattern):
    """The fp32 value of a (non-negative) bit pattern."""
    return pattern.to(tl.float32, bitcast=True)


@triton.jit
def _bound_left(lo, hi, mass_lo, mass_hi, limit):
    """Whether a range ``[lo, hi)`` may still hold more than ``limit`` keys: each key in it weighs at
    least ``lo``'s value, so ``(mass_lo - mass_hi) / value(lo)`` bounds their number."""
    return (hi - lo > 1) & (mass_lo - mass_hi > limit * _value(lo))


@triton.jit
def _kept_half(reached, at_c, at_lo, at_hi):
    """A figure at a range's ends (the ends themselves, or the mass or count of the keys ≥ each) once
    the range is halved at c: ``[c, hi)`` where the keys ≥ c ``reached`` the target, else ``[lo, c)``."""
    return tl.where(reached, at_c, at_lo), tl.where(reached, at_hi, at_c)


@triton.jit
def _halve_by_mass(
    bits, w, bits_m, lo, hi, mass_lo, mass_hi, lo_m, hi_m, mass_lo_m, mass_hi_m, target, target_m, LIMIT
):
    """Both searches (``bits``: k90's keys, ``bits_m``: middle_k90's, -1 where not a middle key; ``w``
    the weights) halved together, one reduction of two masses a round, until each range ``[lo, hi)``
    is one bit pattern wide or, by :func:`_bound_left`, holds at most ``LIMIT`` keys. Invariant:
    ``mass_lo`` = the mass of the keys ≥ ``lo`` reaches the target, ``mass_hi`` (keys ≥ ``hi``) does
    not. A round costs a compare, a select and an add per key and search."""
    while _bound_left(lo, hi, mass_lo, mass_hi, LIMIT) | _bound_left(lo_m, hi_m, mass_lo_m, mass_hi_m, LIMIT):
        c = lo + (hi - lo) // 2
        c_m = lo_m + (hi_m - lo_m) // 2
        mass_c, mass_c_m = _sum2(tl.where(bits >= c, w, 0.0), tl.where(bits_m >= c_m, w, 0.0))
        reached, reached_m = mass_c >= target, mass_c_m >= target_m
        lo, hi = _kept_half(reached, c, lo, hi)
        mass_lo, mass_hi = _kept_half(reached, mass_c, mass_lo, mass_hi)
        lo_m, hi_m = _kept_half(reached_m, c_m, lo_m, hi_m)
        mass_lo_m, mass_hi_m = _kept_half(reached_m, mass_c_m, mass_lo_m, mass_hi_m)
    return lo, hi, mass_lo, mass_hi, lo_m, hi_m, mass_lo_m, mass_hi_m


@triton.jit
def _halve_by_count(  # type: ignore[no-untyped-def]
    bits,
    w,
    bits_m,
    lo,
    hi,
    mass_hi,
    count_lo,
    count_hi,
    lo_m,
    hi_m,
    mass_hi_m,
    count_lo_m,
    count_hi_m,
    target,
    target_m,
    LIMIT: tl.constexpr,
):
    """:func:`_halve_by_mass` with exact counts (``count_lo``/``count_hi``: the keys ≥ ``lo``/``hi``),
    until each range is one pattern wide or holds at most ``LIMIT`` keys. Runs only where rounding
    made the mass bound stop too early (no round in a usual row)."""
    while ((hi - lo > 1) & (count_lo - count_hi > LIMIT)) | (
        (hi_m - lo_m > 1) & (count_lo_m - count_hi_m > LIMIT)
    ):
        c = lo + (hi - lo) // 2
        c_m = lo_m + (hi_m - lo_m) // 2
        up = bits >= c
        up_m = bits_m >= c_m
        mass_c, count_c, mass_c_m, count_c_m = _sum4(
            tl.where(up, w, 0.0), up.to(tl.float32), tl.where(up_m, w, 0.0), up_m.to(tl.float32)
        )
        reached, reached_m = mass_c >= target, mass_c_m >= target_m
        lo, hi = _kept_half(reached, c, lo, hi)
        count_lo, count_hi = _kept_half(reached, count_c, count_lo, count_hi)
        mass_hi = tl.where(reached, mass_hi, mass_c)
        lo_m, hi_m = _kept_half(reached_m, c_m, lo_m, hi_m)
        count_lo_m, count_hi_m = _kept_half(reached_m, count_c_m, count_lo_m, count_hi_m)
        mass_hi_m = tl.where(reached_m, mass_hi_m, mass_c_m)
    return lo, hi, mass_hi, count_lo, count_hi, lo_m, hi_m, mass_hi_m, count_lo_m, count_hi_m


@triton.jit
def _ranked_crossing(found, slots, mass_hi, count_hi, n_in, target):
    """How many of the largest weights reach ``target``, the range's keys ``found`` (``[S]`` bit
    patterns, -1 in empty slots) ranked against each other at once (``[S, S]``): key i comes after
    the keys of larger weight and after its ties in earlier slots (ties counted one by one); the
    first key in that order whose mass, with the ``count_hi`` keys above the range (``mass_hi``),
    reaches the target ends the count. Where rounding leaves no key reaching it: the whole range
    (``n_in`` keys)."""
    weight = tl.where(found >= 0, _value(tl.maximum(found, 0)), 0.0)
    mine = found[None, :]  # [1, S]: a slot's key along axis 1, the others along axis 0
    other = found[:, None]
    before = (other > mine) | ((other == mine) & (slots[:, None] < slots[None, :]))
    mass_before = tl.sum(tl.where(before, weight[:, None], 0.0), 0)
    rank = tl.sum(before.to(tl.float32), 0)
    crosses = (found >= 0) & (mass_hi + mass_before + weight >= target)
    first = tl.min(tl.where(crosses, rank, float(1 << 30)), 0)
    return count_hi + tl.where(first < (1 << 30), first + 1.0, n_in)


@triton.jit
def _tied_crossing(lo, n_in, mass_hi, count_hi, target):
    """How many of the largest weights reach ``target`` when the range is one bit pattern, θ = ``lo``:
    the ``count_hi`` keys above θ, then the ``n_in`` ties at θ one by one until the target is reached."""
    tie = _value(tl.maximum(lo, 0)).to(tl.float64)
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
    mass_limit,
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
    first_col = t - reach + 1
    visible = (cols <= t) & (cols >= first_col)
    first_key = pad - key_offset
    mask_row = mask_ptr + seq * stride_mb + head * stride_mh + row * stride_mn
    if HAS_MASK:  # the model's boolean mask (True = attend), at the sequence's key indices
        allowed = tl.load(mask_row + (first_key + cols) * stride_mk, mask=visible, other=0)
        visible = visible & (allowed != 0)
    s_row = s_ptr + seq * stride_sb + head * stride_sh + row * stride_sn
    # hidden keys score _HIDDEN: a weight of exactly 0 and, times their (finite) score, no NaN
    scores = tl.load(s_row + cols, mask=visible, other=_HIDDEN)
    top = tl.max(scores, 0)
    top = tl.where(top < 0.5 * _HIDDEN, 0.0, top)  # a row with no visible key: zeros, never NaN
    # the weights relative to the top key's (1): a = w / Σw is the row's attention
    logit = scores - top
    w = tl.exp(logit)
    n_keys = (t + 1).to(tl.float32)
    local_start = tl.maximum(t - local_window + 1, sink_tokens)
    is_middle = (cols >= sink_tokens) & (cols < local_start)
    distance = t.to(tl.float32) - cols.to(tl.float32)  # exact: both below 2^24
    # every sum of the row in two reductions (a log a = a · (logit - ln Σw): no log per key)
    total, sink, local, middle = _sum4(
        w,
        tl.where(cols < sink_tokens, w, 0.0),
        tl.where(cols >= local_start, w, 0.0),
        tl.where(is_middle, w, 0.0),
    )
    w_logit, w_distance, kept, _ = _sum4(
        w * logit, w * distance, (w >= sparsity).to(tl.float32), tl.zeros_like(w)
    )
    argmax = tl.min(tl.where(w == 1.0, cols, BLOCK_K), 0)  # the first key of the top weight
    scale = 1.0 / tl.maximum(total, 1e-30)  # w → a
    has_prev = t >= 1
    entropy = tl.log(tl.maximum(total, 1e-30)) - scale * w_logit
    log_n = tl.log(n_keys)
    out = out_ptr + seq * stride_ob + head * stride_oh + row
    tl.store(out + SINK * stride_om, sink * scale)
    tl.store(
        out + BOS * stride_om,
        _weight_at(0, t, first_col, top, s_row, mask_row, first_key, stride_mk, HAS_MASK) * scale,
    )
    tl.store(out + LOCAL * stride_om, local * scale)
    tl.store(out + MIDDLE * stride_om, middle * scale)
    prev = _weight_at(t - 1, t, first_col, top, s_row, mask_row, first_key, stride_mk, HAS_MASK)
    tl.store(out + PREV * stride_om, tl.where(has_prev, prev * scale, 0.0))
    tl.store(
        out + SELF * stride_om,
        _weight_at(t, t, first_col, top, s_row, mask_row, first_key, stride_mk, HAS_MASK) * scale,
    )
    tl.store(out + PREV_ARGMAX_RATE * stride_om, tl.where(has_prev & (argmax == t - 1), 1.0, 0.0))
    tl.store(out + MAX_WEIGHT * stride_om, tl.where(total > 0, scale, 0.0))
    tl.store(out + ENTROPY * stride_om, entropy)
    tl.store(out + ENTROPY_NORM * stride_om, tl.where(log_n > 0, entropy / tl.maximum(log_n, 1e-30), 0.0))
    tl.store(out + EFFECTIVE_KEYS * stride_om, tl.exp(entropy))
    # keys 0..t a window or mask hides weigh 0: below 1% of the maximum, as row_metrics counts them
    tl.store(out + SPARSITY_1PCT * stride_om, (n_keys - kept) / n_keys)
    mean_distance = w_distance * scale
    tl.store(out + MEAN_DISTANCE * stride_om, mean_distance)
    tl.store(
        out + MEAN_DISTANCE_NORM * stride_om,
        tl.where(has_prev, mean_distance / tl.maximum(t.to(tl.float32), 1.0), 0.0),
    )

    k90, middle_k90 = _search(w, is_middle, total, middle, n_keys, mass_limit, TARGET, BLOCK_K, CANDIDATES)
    tl.store(out + K90 * stride_om, tl.minimum(k90, n_keys))
    tl.store(out + K90_FRAC * stride_om, tl.minimum(k90, n_keys) / n_keys)
    tl.store(out + MIDDLE_K90 * stride_om, tl.where(middle > 0, middle_k90, 0.0))


@triton.jit
def _weight_at(col, t, first_col, top, s_row, mask_row, first_key, stride_mk, HAS_MASK: tl.constexpr):  # type: ignore[no-untyped-def]
    """The weight (relative to the top key's) of one key of the row: 0 where hidden or past ``t``."""
    seen = (col >= 0) & (col <= t) & (col >= first_col)
    if HAS_MASK:
        seen = seen & (tl.load(mask_row + (first_key + col) * stride_mk, mask=seen, other=0) != 0)
    return tl.where(seen, tl.exp(tl.load(s_row + col, mask=seen, other=_HIDDEN) - top), 0.0)


@triton.jit
def _search(  # type: ignore[no-untyped-def]
    w,
    is_middle,
    total,
    middle,
    n_keys,
    mass_limit,
    TARGET: tl.constexpr,
    BLOCK_K: tl.constexpr,
    CANDIDATES: tl.constexpr,
):
    """``(k90, middle_k90)`` of one row of weights ``w`` (the top key's 1, ``total`` in all, ``middle``
    on the ``is_middle`` keys): the fewest keys whose weights reach ``TARGET`` of the row's mass,
    and of its middle keys' mass. Rows of at most ``CANDIDATES`` keys are ranked whole
    (:func:`_ranked_crossing`); longer rows narrow a range of bit patterns by halving
    (:func:`_halve_by_mass`, from the top weight down to the weight below which every key together
    holds at most ``(1 - TARGET) / 2`` of the mass) until its mass proves it holds at most one key
    (``mass_limit`` < 2: each key in it weighs at least its lower end), then count the keys at and
    above it (an exact-count halving goes on where rounding left more): the one key in the range is
    the crossing, or the range is one bit pattern whose ties are counted by division. Nothing is
    gathered: the search holds only the weights and the middle keys' patterns, so the program's
    registers stay few."""
    bits = w.to(tl.int32, bitcast=True)  # w ≥ 0: patterns order as values; hidden keys 0
    bits_m = tl.where(is_middle, bits, -1)
    target = TARGET * total
    target_m = TARGET * middle
    if BLOCK_K <= CANDIDATES:  # the row's own keys are the candidates
        slots = tl.arange(0, BLOCK_K)
        found = tl.where(bits > 0, bits, -1)
        found_m = tl.where(bits_m > 0, bits_m, -1)
        zero = tl.zeros((), tl.float32)
        n_in, n_in_m = _sum2((found >= 0).to(tl.float32), (found_m >= 0).to(tl.float32))
        k90 = _ranked_crossing(found, slots, zero, zero, n_in, target)
        middle_k90 = _ranked_crossing(found_m, slots, zero, zero, n_in_m, target_m)
    else:
        spread = 0.5 * (1.0 - TARGET) / n_keys  # below it, every key together holds ≤ (1 - TARGET) / 2
        hi = tl.max(bits, 0) + 1
        lo = tl.minimum((spread * total).to(tl.int32, bitcast=True), hi - 1)
        hi_m = tl.max(bits_m, 0) + 1
        lo_m = tl.minimum((spread * middle).to(tl.int32, bitcast=True), hi_m - 1)
        mass_lo, mass_lo_m = total, middle  # the mass of the keys ≥ lo: at most that (the bound's start)
        zero = tl.zeros((), tl.float32)
        lo, hi, mass_lo, mass_hi, lo_m, hi_m, mass_lo_m, mass_hi_m = _halve_by_mass(
            bits, w, bits_m, lo, hi, mass_lo, zero, lo_m, hi_m, mass_lo_m, zero, target, target_m, mass_limit
        )
        count_lo, count_hi, count_lo_m, count_hi_m = _sum4(
            (bits >= lo).to(tl.float32),
            (bits >= hi).to(tl.float32),
            (bits_m >= lo_m).to(tl.float32),
            (bits_m >= hi_m).to(tl.float32),
        )
        lo, hi, mass_hi, count_lo, count_hi, lo_m, hi_m, mass_hi_m, count_lo_m, count_hi_m = _halve_by_count(
            bits,
            w,
            bits_m,
            lo,
            hi,
            mass_hi,
            count_lo,
            count_hi,
            lo_m,
            hi_m,
            mass_hi_m,
            count_lo_m,
            count_hi_m,
            target,
            target_m,
            1,
        )
        # at most one key in a range wider than one pattern: with it, the keys reach the target
        k90 = tl.where(
            hi - lo > 1, count_lo, _tied_crossing(lo, count_lo - count_hi, mass_hi, count_hi, target)
        )
        middle_k90 = tl.where(
            hi_m - lo_m > 1,
            count_lo_m,
            _tied_crossing(lo_m, count_lo_m - count_hi_m, mass_hi_m, count_hi_m, target_m),
        )
    return k90, middle_k90
