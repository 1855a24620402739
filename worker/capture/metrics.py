"""Per-head attention summary metrics (``HEAD_METRICS.md``), computed from attention rows as they stream.

:func:`row_metrics` turns one block of attention rows into per-row metrics on the device the rows
live on (CPU or CUDA); :class:`HeadMetricsAccumulator` keeps the eligible rows' running sums (float64)
and the per-row values the quantiles need (on the rows' device, up to a budget; the rest on the host),
sorted once per layer for exact quantiles. Labels come from :mod:`storage.bundle.labels`.

Shapes: L exported layers, B sequences, H exported query heads, n query rows, K key columns.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, get_args

import numpy as np
import torch

from storage.bundle.labels import SummaryParams
from storage.jobs.capture import RankMetric
from worker.capture.hostcopy import device_ints, read_to_host, to_device
from worker.capture.quantiles import linear_quantiles

ROW_METRICS: tuple[str, ...] = get_args(RankMetric)  # declared once, with the spec's ranking names
QUANTILE_METRICS: tuple[str, ...] = (
    "sink",
    "local",
    "middle",
    "prev",
    "max_weight",
    "entropy",
    "k90",
    "mean_distance",
)
QUANTILES: tuple[float, ...] = (0.1, 0.5, 0.9)

K90_MASS = 0.9
K90_TOLERANCE = 1e-6  # top-k mass >= 0.9 - tolerance counts as reaching 0.9 (fp rounding of the cumsum)
SPARSITY_FRACTION = 0.01  # H2O: entries below 1% of the row maximum count as zero
_TINY = 1e-30


def _host_kernels(x: torch.Tensor) -> bool:
    """Whether :func:`_top_mass` and :func:`_entropy` take their CPU formulation for ``x`` (the
    tests run the other devices' formulation on the CPU by replacing this)."""
    return x.device.type == "cpu"


def _top_mass(negated: torch.Tensor) -> torch.Tensor:
    """``negated [..., m]``: values ≥ 0, negated → ``[..., m]`` float64: element i is the mass of
    the i + 1 largest values, non-decreasing along the last dimension.

    Sorting the negated values ascending sorts the values descending; the cumulative sums are
    float64 so the 0.9 crossing does not drift. On the CPU numpy sorts (vectorised, values only:
    ≈ 18× faster than ``torch.sort`` on a [32, 128, 2048] block) and sums (no float64 copy);
    elsewhere ``torch.sort`` and ``torch.cumsum``."""
    if _host_kernels(negated):
        ordered = np.sort(negated.contiguous().numpy(), axis=-1)
        total = np.cumsum(ordered, axis=-1, dtype=np.float64)
        return torch.from_numpy(np.negative(total, out=total))
    return torch.cumsum(torch.sort(negated, dim=-1).values, dim=-1, dtype=torch.float64).neg_()


def _entropy(a: torch.Tensor) -> torch.Tensor:
    """``-Σ a ln a`` over the last dimension (0 ln 0 = 0). CPU: ``log`` of ``a`` clamped to 1e-30 (a
    vectorised log: ≈ 1.5× faster than ``xlogy`` there; entries below 1e-30 add < 7e-29 each); other
    devices: ``xlogy``, one elementwise pass fewer."""
    if _host_kernels(a):
        return -a.clamp_min(_TINY).log_().mul_(a).sum(-1)
    return -torch.special.xlogy(a, a).sum(-1)


def _count_reaching(top_mass: torch.Tensor, target: torch.Tensor, never: int) -> torch.Tensor:
    """Fewest largest values whose mass reaches ``target [..., j]`` (float64), per target, from
    ``top_mass [..., m]`` (:func:`_top_mass`): 0 where ``target ≤ 0``, ``never`` where even all
    ``m`` of them fall short."""
    count = torch.searchsorted(top_mass, target.contiguous(), side="left") + 1
    count = torch.where(count > top_mass.shape[-1], never, count)
    return torch.where(target <= 0, 0, count)


def _device_positions(positions: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, int, int, bool]:
    """``positions`` as a long tensor on ``device``, their min and max, read where they live, and
    whether they are the run ``min..max`` on the host: host positions cost no device
    synchronisation (a run is made on the device)."""
    host = positions.device.type == "cpu"
    lo, hi = int(positions.min()), int(positions.max())  # on the host when positions are
    n = positions.shape[0]
    if host and hi - lo + 1 == n and (n < 2 or bool((positions[1:] > positions[:-1]).all())):
        return torch.arange(lo, hi + 1, device=device), lo, hi, True
    return to_device(positions.long(), device), lo, hi, False


def _rows_kept(skips: list[int], n: int, device: torch.device) -> torch.Tensor:
    """``[N, n]`` bool on ``device``: row ``j`` of sequence ``i`` is counted (``j ≥ skips[i]``)."""
    return to_device(torch.arange(n)[None, :] >= torch.tensor(skips)[:, None], device)


@dataclass(frozen=True)
class _Geometry:
    """What :func:`row_metrics` needs of a block's positions ``t [n]`` alone (never of the
    probabilities): the same for every layer, so a run of positions is built once and cached.
    ``K = hi + 1`` keys, ``m = s + W`` sink/local keys, ``Km`` middle columns ``s .. mid_end - 1``."""

    invisible: torch.Tensor  # [n, K] bool: key past the row's position
    n_keys: torch.Tensor  # [n] float32, t + 1
    log_n: torch.Tensor  # [n] float32
    has_prev: torch.Tensor  # [n] bool, t ≥ 1
    prev_col: torch.Tensor  # [n, 1] long, max(t - 1, 0)
    self_col: torch.Tensor  # [n, 1] long, t
    past_t: torch.Tensor  # [n] int32, keys past t
    t_norm: torch.Tensor  # [n] float32, max(t, 1)
    distance: torch.Tensor  # [n, K] float32, max(t - j, 0)
    near_cols: torch.Tensor  # [n, m] long: sink keys 0..s-1, then local keys from local_start
    near_ok: torch.Tensor  # [n, m] float32: 1 where that key is in the row's sink or local set
    mid_end: int
    mid_sign: torch.Tensor  # [n, Km] float32: -1 where column s + c is a middle key of the row, else 0
    taken: torch.Tensor  # [m + 1] long, 0..m

    def nbytes(self) -> int:
        tensors = [v for v in vars(self).values() if isinstance(v, torch.Tensor)]
        return sum(v.numel() * v.element_size() for v in tensors)


def _geometry(t: torch.Tensor, hi: int, sink_tokens: int, local_window: int) -> _Geometry:
    device = t.device
    width = hi + 1
    cols = torch.arange(width, device=device)
    local_start = torch.clamp(t - local_window + 1, min=sink_tokens)  # [n]
    band = torch.arange(local_window, device=device)
    sink_cols = torch.arange(sink_tokens, device=device)[None].expand(t.shape[0], -1)
    near_cols = torch.cat([sink_cols, local_start[:, None] + band[None]], dim=1)
    mid_end = max(sink_tokens + 1, min(width, hi - local_window + 1))
    mid_cols = torch.arange(sink_tokens, mid_end, device=device)
    n_keys = (t + 1).float()
    return _Geometry(
        invisible=cols[None, :] > t[:, None],
        n_keys=n_keys,
        log_n=torch.log(n_keys),
        has_prev=t >= 1,
        prev_col=(t - 1).clamp_min(0)[:, None],
        self_col=t[:, None],
        past_t=(width - 1 - t).int(),
        t_norm=t.float().clamp_min(1.0),
        distance=(t[:, None] - cols[None, :]).clamp_min(0).float(),
        near_cols=near_cols.clamp_max(width - 1),
        near_ok=(near_cols <= t[:, None]).float(),
        mid_end=mid_end,
        mid_sign=-(mid_cols[None, :] < local_start[:, None]).float(),
        taken=torch.arange(sink_tokens + local_window + 1, device=device),
    )


PENDING_BYTES = 64 << 20  # fp32 rows an accumulator holds back to batch its row_metrics calls
DEVICE_VALUES_BYTES = 1 << 30  # quantile values an accumulator keeps on a GPU (the rest: on the host)
QUANTILE_SORT_BYTES = 256 << 20  # one sort of quantile values at most (values, order, padding)
GEOMETRY_CACHE_BYTES = 64 << 20  # position tensors kept for runs of positions, all devices together
_geometry_cache: OrderedDict[tuple[torch.device, int, int, int, int], _Geometry] = OrderedDict()
_geometry_bytes = [0]
_geometry_lock = threading.Lock()


def _cached_geometry(
    t: torch.Tensor, lo: int, hi: int, sink_tokens: int, local_window: int, run: bool
) -> _Geometry:
    """:func:`_geometry`, from a least-recently-used cache of ≤ :data:`GEOMETRY_CACHE_BYTES` when the
    positions are the run ``lo..hi`` (every layer of a sequence sends the same runs)."""
    if not run:
        return _geometry(t, hi, sink_tokens, local_window)
    key = (t.device, lo, hi, sink_tokens, local_window)
    with _geometry_lock:
        found = _geometry_cache.get(key)
        if found is not None:
            _geometry_cache.move_to_end(key)
            return found
    built = _geometry(t, hi, sink_tokens, local_window)
    size = built.nbytes()
    with _geometry_lock:
        if key not in _geometry_cache and size <= GEOMETRY_CACHE_BYTES:
            _geometry_cache[key] = built
            _geometry_bytes[0] += size
            while _geometry_bytes[0] > GEOMETRY_CACHE_BYTES:
                _, dropped = _geometry_cache.popitem(last=False)
                _geometry_bytes[0] -= dropped.nbytes()
    return built


def row_metrics(
    probs: torch.Tensor, positions: torch.Tensor, *, sink_tokens: int, local_window: int
) -> dict[str, torch.Tensor]:
    """Every :data:`ROW_METRICS` metric of each row: name → ``[H, n]`` float32 on ``probs.device``.

    ``probs [H, n, K]``: row i is the attention of the token at position ``t_i = positions[i]`` over
    keys ``0..K-1`` (``K ≥ t_i + 1``); columns past ``t_i`` are ignored and the visible part is
    renormalised to sum 1. With ``n_i = t_i + 1`` visible keys, sink set ``S = {0..s-1}``, local set
    ``R = {max(s, t-W+1)..t}`` and middle ``M`` = the rest of ``0..t`` (definitions in HEAD_METRICS.md).
    ``prev_argmax_rate`` is per row 1.0 when the (first) argmax is ``t-1``, else 0.0; ``prev`` is 0 at
    ``t = 0``; ``entropy_norm`` and ``mean_distance_norm`` are 0 where ``ln n`` or ``t`` is 0;
    ``middle_k90`` is 0 where the middle mass is 0. Memory O(H·n·K); no loop over rows.

    Passes over ``[H, n, K]``: one masked float32 copy normalised in place, then max, entropy,
    the sparsity count, the mean distance (a product and a per-row sum, whatever the rows batched
    with it), and one values-only sort of the middle columns with its float64
    cumulative mass (``middle``, ``middle_k90``, and ``k90`` merged with the ≤ s + W sink/local
    keys, which are gathered for ``sink`` and ``local``). With
    ``positions`` on the host (CPU) and ``probs`` on a GPU nothing waits for the GPU: the positions'
    range is read on the host and the metrics stay on the device.
    """
    if probs.dim() != 3:
        raise ValueError(f"probs must be [H, n, K], got shape {tuple(probs.shape)}")
    heads, n_rows, width = probs.shape
    if positions.shape != (n_rows,):
        raise ValueError(f"positions must be [{n_rows}], got shape {tuple(positions.shape)}")
    if sink_tokens < 1 or local_window < 1:
        raise ValueError("sink_tokens and local_window must be >= 1")
    device = probs.device
    if n_rows == 0:
        return {name: torch.zeros(heads, 0, device=device) for name in ROW_METRICS}
    t, lo, hi, run = _device_positions(positions, device)
    if lo < 0 or hi >= width:
        raise ValueError(f"positions must lie in 0..{width - 1} (K = {width}), got {lo}..{hi}")
    g = _cached_geometry(t, lo, hi, sink_tokens, local_window, run)

    width = hi + 1  # keys past the last row's position carry no weight
    # the one [H, n, K] float32 copy: visible weights, renormalised to sum 1 (in place)
    a = probs[:, :, :width].float().masked_fill(g.invisible, 0.0)
    a.div_(a.sum(-1, keepdim=True).clamp_min(_TINY))

    # sink and local keys: at most s + W per row, gathered ([H, n, s + W]; 0 where not in the set)
    near = a.gather(-1, g.near_cols.expand(heads, -1, -1)).mul_(g.near_ok)
    out: dict[str, torch.Tensor] = {}
    out["sink"] = near[..., :sink_tokens].sum(-1)
    out["local"] = near[..., sink_tokens:].sum(-1)
    out["bos"] = a[:, :, 0].clone()
    out["prev"] = a.gather(-1, g.prev_col.expand(heads, -1, -1)).squeeze(-1).mul_(g.has_prev)
    out["self"] = a.gather(-1, g.self_col.expand(heads, -1, -1)).squeeze(-1)
    max_weight, argmax = a.max(dim=-1)  # first maximal index on ties
    out["prev_argmax_rate"] = ((argmax == g.prev_col[:, 0]) & g.has_prev).float()
    out["max_weight"] = max_weight

    entropy = _entropy(a)
    out["entropy"] = entropy
    out["entropy_norm"] = torch.where(g.log_n > 0, entropy / g.log_n.clamp_min(_TINY), 0.0)
    out["effective_keys"] = torch.exp(entropy)

    # entries past t are exact zeros, below any positive threshold: count all, subtract those
    below = (a < SPARSITY_FRACTION * max_weight[..., None]).sum(-1, dtype=torch.int32) - g.past_t
    out["sparsity_1pct"] = below.clamp_min(0).float() / g.n_keys

    # a product and a reduction per row, not a batched matmul: a matmul's blocking (hence its
    # rounding) depends on how many rows are batched together, and a row's metric must not (the
    # accumulator batches layers; a job cut by layers batches fewer of them)
    mean_distance = (a * g.distance).sum(-1)  # [H, n]
    out["mean_distance"] = mean_distance
    out["mean_distance_norm"] = torch.where(g.has_prev, mean_distance / g.t_norm, 0.0)

    # middle keys: columns s .. local_start - 1 of each row, one sort; the row's k90 merges them with
    # the ≤ s + W sorted sink/local values (the k largest of a union of two sets are the i largest of
    # one and the k - i largest of the other for the best i)
    mid = a[:, :, sink_tokens : g.mid_end]
    if mid.shape[-1] < g.mid_sign.shape[-1]:  # width ≤ s: no middle column at all
        mid = torch.nn.functional.pad(mid, (0, g.mid_sign.shape[-1] - mid.shape[-1]))
    mid_top = _top_mass(mid * g.mid_sign)  # [H, n, Km] float64; other columns are 0
    middle_mass = mid_top[..., -1:]
    out["middle"] = middle_mass[..., 0].float()
    threshold = K90_MASS - K90_TOLERANCE
    never = width + sink_tokens + local_window + 1  # more keys than any row has
    middle_k90 = _count_reaching(mid_top, threshold * middle_mass, never)[..., 0]
    out["middle_k90"] = torch.where(middle_mass[..., 0] > 0, middle_k90, 0).float()

    near_top = _top_mass(near.neg_())  # [H, n, s + W]
    taken = torch.nn.functional.pad(near_top, (1, 0))  # the j largest, j = 0..s+W
    k90 = (g.taken + _count_reaching(mid_top, threshold - taken, never)).amin(-1).float()
    k90 = torch.minimum(k90, g.n_keys)
    out["k90"] = k90
    out["k90_frac"] = k90 / g.n_keys
    return {name: out[name].float().contiguous() for name in ROW_METRICS}


@dataclass
class HeadSummary:
    """Per-head summary of one job (numpy, what the bundle stores).

    ``means``: metric → ``[L, B, H]`` float32, mean over eligible rows (NaN where none);
    ``quantiles``: :data:`QUANTILE_METRICS` metric → ``[L, B, H, 3]`` float32 at :data:`QUANTILES`
    (linear interpolation; NaN where none); ``rows`` ``[L, B]`` int32 eligible rows seen;
    ``context_min`` / ``context_max`` ``[L, B]`` int32, min / max visible keys over eligible rows
    (0 where none); ``pooled_means``: metric → ``[L, H]`` float32 over every sequence's eligible rows
    (row-weighted; NaN where none); ``pooled_rows`` ``[L]`` int32.
    """

    means: dict[str, np.ndarray]
    quantiles: dict[str, np.ndarray]
    rows: np.ndarray
    context_min: np.ndarray
    context_max: np.ndarray
    pooled_means: dict[str, np.ndarray]
    pooled_rows: np.ndarray


@dataclass
class _QkPlan:
    """One forward pass's bookkeeping for :meth:`HeadMetricsAccumulator.observe_qk` (its layers
    share it): the sequences with eligible rows (``owners``), the first row computed, each one's
    rows skipped before its first eligible one, the device tensors the kernels and the sums read,
    and what :meth:`HeadMetricsAccumulator._count` books per layer."""

    owners: tuple[int, ...]
    start: int
    skips: list[int]
    pads: torch.Tensor
    wanted: torch.Tensor
    owner_index: torch.Tensor | None  # None: every sequence of the batch is an owner
    keep: torch.Tensor | None  # [1, N, 1, n'] rows counted; None: all
    min_pad: int
    counts: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


@dataclass
class _Piece:
    """The part of one kept block ``[Q, N, H, n]`` that belongs to one layer: its owner slots, their
    sequences and the rows each skips."""

    block: torch.Tensor
    slots: list[int]
    sequences: list[int]
    skips: list[int]


def _layout_key(pieces: list[_Piece], device: torch.device) -> tuple[Any, ...]:
    """What decides how one layer's kept values are gathered: layers with equal keys are gathered
    and sorted together (:meth:`HeadMetricsAccumulator._gathered`)."""
    layout = tuple(
        (tuple(p.slots), tuple(p.sequences), tuple(p.skips), tuple(p.block.shape), p.block.device)
        for p in pieces
    )
    return (device, layout)


def _gathered_width(pieces: list[_Piece], batch: int) -> int:
    """The columns one layer's gathered values take: its longest sequence's kept rows, padded."""
    filled = np.zeros(batch, dtype=np.int64)
    for piece in pieces:
        filled[piece.sequences] += piece.block.shape[-1]
    return int(filled.max())


class HeadMetricsAccumulator:
    """Accumulates :func:`row_metrics` of eligible rows (``t + 1 ≥ params.min_keys``) per (layer, sequence).

    Rows of one (layer, sequence) may arrive in any number of :meth:`observe` calls (prefill blocks,
    then one row per generated token). Sums are float64, kept on the rows' device; the per-row values
    of :data:`QUANTILE_METRICS` are kept as float32 (``4 · 8 · H`` bytes per eligible row and layer)
    so the quantiles are exact: on the rows' device up to :data:`DEVICE_VALUES_BYTES`, past it
    copied to the host (asynchronously, into pinned memory); :meth:`result` sorts them there, one
    layer at a time, instead of a numpy call per (layer, sequence) on the host (≈ 4 µs of host time
    per row and layer for an 8B model: longer than the model itself). With host ``positions`` an
    observation never waits for the GPU: :meth:`result` waits for its two copies to the host (the
    sums, the quantiles; values copied to the host are never read there, only sent back).

    Blocks whose eligible rows are the same run of positions (every layer, and the sequences of a
    micro-batch that reach it, send the same runs) wait, up to :data:`PENDING_BYTES` of rows, and
    go through one :func:`row_metrics` call together: per call the cost is mostly operator dispatch
    (on an H200, ≈ 90 kernels and 1.3–2 ms a call for blocks up to 128 × 2,048 keys against
    0.2–1.3 ms of kernel time). A waiting block is a view of the caller's ``probs``: callers must
    not modify it in place after :meth:`observe` (the capture never does).
    """

    def __init__(self, num_layers: int, batch: int, num_heads: int, params: SummaryParams) -> None:
        if min(num_layers, batch, num_heads) < 1:
            raise ValueError("num_layers, batch and num_heads must be >= 1")
        self.num_layers, self.batch, self.num_heads = num_layers, batch, num_heads
        self.params = params
        # [M, L, B, H] float64 per device the rows came from (a model placed over several GPUs sends
        # each layer's rows from that layer's device); added up on the host by result()
        self._sums: dict[torch.device, torch.Tensor] = {}
        self._rows = np.zeros((num_layers, batch), dtype=np.int64)
        self._context_min = np.zeros((num_layers, batch), dtype=np.int64)
        self._context_max = np.zeros((num_layers, batch), dtype=np.int64)
        self._quantile_index = tuple(ROW_METRICS.index(name) for name in QUANTILE_METRICS)
        # the quantile metrics' values: (owners (l, b), rows skipped per owner, [Q, N, H, n] with
        # owner i at [:, i] on the rows' device or the host, the rows' device); gathered per layer
        # (on the rows' device) only by result()
        self._value_blocks: list[
            tuple[tuple[tuple[int, int], ...], tuple[int, ...], torch.Tensor, torch.device]
        ] = []
        self._device_value_bytes = 0
        self._last_plan: tuple[tuple[object, ...], _QkPlan | None] | None = None
        self._qk_counts: list[tuple[int, tuple[np.ndarray, ...]]] = []  # observe_qk's, for _count
        # (device, first, last position) → [(l, b, rows [H, n, K])] waiting for one row_metrics call
        self._pending: dict[tuple[torch.device, int, int], list[tuple[int, int, torch.Tensor]]] = {}
        self._pending_bytes = 0
        # small integer tensors on a device, by value (pads, sequence and metric indices)
        self._device_ints: dict[tuple[tuple[int, ...], torch.device], torch.Tensor] = {}

    @property
    def first_position(self) -> int:
        """The first real position whose row is eligible (``t + 1 ≥ params.min_keys``): earlier
        rows are dropped, so a capture need not compute them for the metrics."""
        return self.params.min_keys - 1

    def observe(self, layer_pos: int, batch_index: int, probs: torch.Tensor, positions: torch.Tensor) -> None:
        """Add one block of rows: ``probs [H, n, K]`` (any device) at ``positions [n]`` (best on the
        host: then nothing here waits for the device); see :func:`row_metrics`."""
        if not (0 <= layer_pos < self.num_layers and 0 <= batch_index < self.batch):
            raise IndexError(f"(layer_pos, batch_index) = ({layer_pos}, {batch_index}) out of range")
        if probs.dim() != 3 or probs.shape[0] != self.num_heads:
            raise ValueError(f"probs must be [{self.num_heads}, n, K], got shape {tuple(probs.shape)}")
        host_positions = positions.detach().to("cpu", torch.long)
        eligible = host_positions >= self.first_position
        if not bool(eligible.any()):
            return
        rows = probs.detach()
        if bool(eligible.all()):
            kept_positions = host_positions
        else:
            keep = torch.nonzero(eligible).flatten()
            kept_positions = host_positions[keep]
            first = int(keep[0])
            if int(keep[-1]) - first + 1 == keep.numel():  # a run of rows (the usual case): a view
                rows = rows[:, first : first + keep.numel()]
            else:
                rows = rows.index_select(1, to_device(keep, rows.device))
        lo, hi = int(kept_positions[0]), int(kept_positions.max())
        rows = rows[:, :, : hi + 1]  # later keys carry no weight
        if hi - lo + 1 == len(kept_positions) and bool((kept_positions[1:] > kept_positions[:-1]).all()):
            self._pending.setdefault((rows.device, lo, hi), []).append((layer_pos, batch_index, rows))
            self._pending_bytes += rows.numel() * 4
            if self._pending_bytes > PENDING_BYTES:
                self.flush()
        else:
            self._compute({(rows.device, lo, hi): [(layer_pos, batch_index, rows)]}, kept_positions)
        n_keys = kept_positions.numpy() + 1
        self._count(layer_pos, np.array([batch_index]), n_keys.min(), n_keys.max(), len(n_keys))

    def _count(
        self,
        layer_pos: int,
        batch_indices: np.ndarray,
        low: np.ndarray | int,
        high: np.ndarray | int,
        rows: np.ndarray | int,
    ) -> None:
        """Book ``rows`` eligible rows of (layer, sequence) seeing ``low .. high`` keys, for each of
        the (distinct) sequences ``batch_indices``."""
        seen = self._rows[layer_pos, batch_indices] > 0
        least = np.minimum(low, self._context_min[layer_pos, batch_indices])
        self._context_min[layer_pos, batch_indices] = np.where(seen, least, low)
        self._context_max[layer_pos, batch_indices] = np.maximum(
            high, self._context_max[layer_pos, batch_indices]
        )
        self._rows[layer_pos, batch_indices] += rows

    def observe_qk(
        self,
        layer_pos: int,
        query: torch.Tensor,
        key: torch.Tensor,
        pads: Sequence[int],
        batch_indices: Sequence[int],
        *,
        query_offset: int,
        key_offset: int,
        scaling: float,
        mask: torch.Tensor | None = None,
        sliding_window: int | None = None,
    ) -> None:
        """Add every eligible row of one layer's attention call for the sequences ``batch_indices``,
        from q and k (:func:`worker.capture.fused_metrics.fused_row_metrics`: no probabilities
        materialised): ``query [B, H, n, D]``, ``key [B, KVH, Kc, D]`` of a left-padded batch
        (``pads[b]`` tokens; query row i at padded position ``query_offset + i``, key index j at
        ``key_offset + j``); ``mask`` boolean ``[B, 1|H, n, Kc]`` or ``None``. One kernel pair for
        every sequence, one host copy of the per-row values; nothing waits for the device, and in a
        decoding loop nothing is copied to it (the pads and the wanted sequences are cached there).
        """
        from worker.capture.fused_metrics import fused_row_metrics  # Triton only on this path

        if query.shape[1] != self.num_heads:
            raise ValueError(f"query must have {self.num_heads} heads, got shape {tuple(query.shape)}")
        plan = self._qk_plan(query_offset, query.shape[2], tuple(pads), tuple(batch_indices), query.device)
        if plan is None:
            return
        start = plan.start
        with torch.inference_mode():
            values = fused_row_metrics(
                query[:, :, start:],
                key,
                plan.pads,
                plan.wanted,
                query_offset=query_offset + start,
                key_offset=key_offset,
                scaling=scaling,
                sink_tokens=self.params.sink_tokens,
                local_window=self.params.local_window,
                mask=None if mask is None else mask[:, :, start:],
                sliding_window=sliding_window,
                min_pad=plan.min_pad,
            )  # [M, B, H, n']
            if plan.owner_index is not None:
                values = values.index_select(1, plan.owner_index)
            if plan.keep is not None:
                values = torch.where(plan.keep, values, 0.0)
            self._add_rows(layer_pos, plan.owners, plan.skips, values)
        self._qk_counts.append((layer_pos, plan.counts))  # booked by result()

    def _qk_plan(
        self,
        query_offset: int,
        n_rows: int,
        pads: tuple[int, ...],
        batch_indices: tuple[int, ...],
        device: torch.device,
    ) -> _QkPlan | None:
        """What :meth:`observe_qk` needs besides q and k, the same for every layer of a forward pass
        (kept for the next call: a decoding step's 32 layer calls compute it once)."""
        key = (query_offset, n_rows, pads, batch_indices, device)
        if self._last_plan is not None and self._last_plan[0] == key:
            return self._last_plan[1]
        # real position of row 0 and first eligible row of each sequence
        first_pos = {b: query_offset - pads[b] for b in batch_indices}
        firsts = {b: max(0, self.first_position - first_pos[b]) for b in batch_indices}
        owners = [b for b in batch_indices if firsts[b] < n_rows]
        plan = None
        if owners:
            start = min(firsts[b] for b in owners)  # rows before every sequence's first are skipped
            width = n_rows - start
            skips = [firsts[b] - start for b in owners]  # rows before each one's first eligible row
            keep = None
            if any(skips):
                keep = _rows_kept(skips, width, device)[None, :, None, :]
            owner_first = np.array([first_pos[b] for b in owners])  # real position of each one's row 0
            skipped = np.array(skips)
            first = owner_first + start + skipped  # each one's first eligible row's position
            plan = _QkPlan(
                owners=tuple(owners),
                start=start,
                skips=skips,
                pads=self._on_device(pads, device),
                wanted=self._on_device(tuple(1 if b in owners else 0 for b in range(len(pads))), device),
                owner_index=None if len(owners) == len(pads) else self._on_device(tuple(owners), device),
                keep=keep,
                min_pad=min(pads[b] for b in owners),
                counts=(np.array(owners), first + 1, owner_first + n_rows, width - skipped),
            )
        self._last_plan = (key, plan)
        return plan

    def _on_device(self, values: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """``values`` as a long tensor on ``device``, cached (a decoding loop sends the same ones)."""
        key = (values, device)
        found = self._device_ints.get(key)
        if found is None:
            if len(self._device_ints) > 256:
                self._device_ints.clear()
            found = self._device_ints[key] = device_ints(values, device)
        return found

    def _device_sums(self, device: torch.device) -> torch.Tensor:
        """The float64 sums ``[M, L, B, H]`` kept on ``device`` (created at its first rows)."""
        sums = self._sums.get(device)
        if sums is None:
            shape = (len(ROW_METRICS), self.num_layers, self.batch, self.num_heads)
            sums = self._sums[device] = torch.zeros(shape, dtype=torch.float64, device=device)
        return sums

    def _add_rows(
        self, layer_pos: int, owners: tuple[int, ...], skips: list[int], values: torch.Tensor
    ) -> None:
        """``values [M, N, H, n]``: the metrics of the rows of sequences ``owners`` in one layer (rows
        before ``skips[i]`` are zeros and not counted)."""
        layer = self._device_sums(values.device)[:, layer_pos]  # [M, B, H], a view
        per_sequence = values.sum(dim=-1, dtype=torch.float64)  # [M, N, H]
        if owners == tuple(range(self.batch)):
            layer += per_sequence
        else:  # the same owners in every layer of a pass: one index on the device for all of them
            layer.index_add_(1, self._on_device(owners, values.device), per_sequence)
        self._keep_values(tuple((layer_pos, b) for b in owners), tuple(skips), values)

    def _keep_values(
        self, owners: tuple[tuple[int, int], ...], skips: tuple[int, ...], values: torch.Tensor
    ) -> None:
        """The quantile metrics of ``values [M, N, H, n]``, owner i's at ``[:, i]`` from row
        ``skips[i]``: kept on their device up to :data:`DEVICE_VALUES_BYTES` (then copied to the
        host, asynchronously), sorted per owner by :meth:`result`."""
        device = values.device
        kept = values.index_select(0, self._on_device(self._quantile_index, device))
        nbytes = kept.numel() * kept.element_size()
        if device.type != "cpu":
            if self._device_value_bytes + nbytes <= DEVICE_VALUES_BYTES:
                self._device_value_bytes += nbytes
            else:
                kept = kept.to("cpu", non_blocking=True)
        self._value_blocks.append((owners, skips, kept, device))  # [Q, N, H, n]

    def flush(self) -> None:
        """Compute the metrics of every waiting block (one :func:`row_metrics` call per run of
        positions and device); :meth:`result` calls it."""
        pending, self._pending, self._pending_bytes = self._pending, {}, 0
        self._compute(pending)

    def _compute(
        self,
        pending: dict[tuple[torch.device, int, int], list[tuple[int, int, torch.Tensor]]],
        positions: torch.Tensor | None = None,
    ) -> None:
        """The metrics of ``pending``'s blocks (at ``positions``, default each run ``lo..hi``) added
        to the sums and host values, under ``torch.inference_mode``: the sums may have been created
        in it (the capture observes in it) and a result may be asked for outside it."""
        with torch.inference_mode():
            for (_, lo, hi), blocks in pending.items():
                rows = blocks[0][2] if len(blocks) == 1 else torch.cat([block for _, _, block in blocks])
                metrics = row_metrics(
                    rows,
                    torch.arange(lo, hi + 1) if positions is None else positions,
                    sink_tokens=self.params.sink_tokens,
                    local_window=self.params.local_window,
                )
                values = torch.stack([metrics[name] for name in ROW_METRICS])
                self._add([(lp, b) for lp, b, _ in blocks], values)

    def _add(self, owners: list[tuple[int, int]], values: torch.Tensor) -> None:
        """``values [M, len(owners) · H, n]``: the metrics of the blocks of ``owners`` (layer, sequence),
        their heads one after the other."""
        heads = self.num_heads
        sums = self._device_sums(values.device)
        per_block = values.sum(dim=-1, dtype=torch.float64).unflatten(1, (len(owners), heads))  # [M, N, H]
        if len(owners) == 1:
            sums[:, owners[0][0], owners[0][1]] += per_block[:, 0]
        else:
            index = device_ints([lp * self.batch + b for lp, b in owners], values.device)
            sums.view(len(ROW_METRICS), self.num_layers * self.batch, heads).index_add_(1, index, per_block)
        self._keep_values(tuple(owners), (0,) * len(owners), values.unflatten(1, (len(owners), heads)))

    def _host_sums(self) -> torch.Tensor:
        shape = (len(ROW_METRICS), self.num_layers, self.batch, self.num_heads)
        total = torch.zeros(shape, dtype=torch.float64)
        for sums in self._sums.values():
            total += read_to_host(sums)
        return total

    def _layer_quantiles(self) -> np.ndarray:
        """``[L, B, Q, H, 3]`` float64: :data:`QUANTILES` of each (layer, sequence, head)'s kept
        values of each :data:`QUANTILE_METRICS` metric (NaN where it has none), on the device its
        values came from, the layers laid out alike several to a sort (:func:`linear_quantiles`:
        numpy's figures)."""
        shape = (self.num_layers, self.batch, len(QUANTILE_METRICS), self.num_heads, len(QUANTILES))
        out = np.full(shape, np.nan)
        # layer → [(block, the block's owner slots in that layer, their sequences, rows skipped)]
        by_layer: dict[int, list[_Piece]] = {}
        devices: dict[int, torch.device] = {}  # the layer's rows' device (host copies go back)
        counts = np.zeros((self.num_layers, self.batch), dtype=np.int64)
        for owners, skips, block, device in self._value_blocks:
            layers: dict[int, _Piece] = {}
            for i, (layer_pos, batch_index) in enumerate(owners):
                piece = layers.setdefault(layer_pos, _Piece(block, [], [], []))
                piece.slots.append(i)
                piece.sequences.append(batch_index)
                piece.skips.append(skips[i])
                counts[layer_pos, batch_index] += block.shape[-1] - skips[i]
            for layer_pos, piece in layers.items():
                by_layer.setdefault(layer_pos, []).append(piece)
                devices.setdefault(layer_pos, device)
        # layers whose kept values are laid out alike (a prefill's fused calls: one block a layer, the
        # same sequences and skips) are sorted together, as many at a time as the sort's memory allows
        alike: dict[tuple[Any, ...], list[int]] = {}
        for layer_pos, pieces in by_layer.items():
            alike.setdefault(_layout_key(pieces, devices[layer_pos]), []).append(layer_pos)
        results: list[tuple[int, torch.Tensor]] = []
        for layer_group in alike.values():
            device = devices[layer_group[0]]
            width = _gathered_width(by_layer[layer_group[0]], self.batch)
            per_layer = self.batch * len(QUANTILE_METRICS) * self.num_heads * max(1, width)
            step = QUANTILE_SORT_BYTES // (16 * per_layer)  # layers a sort takes (values, order, padding)
            for i in range(0, len(layer_group), max(1, step)):
                chunk = layer_group[i : i + max(1, step)]
                padded = self._gathered(
                    [by_layer[layer_pos] for layer_pos in chunk], device
                )  # [C, B, Q, H, R]
                counts_here = to_device(torch.from_numpy(counts[chunk]), device)[:, :, None, None]
                if step >= 1:
                    quantiles = linear_quantiles(padded, counts_here, QUANTILES, inf_padded=True)
                else:  # one layer is over the sort's budget: its sequences a few at a time
                    rows = max(1, QUANTILE_SORT_BYTES // (16 * max(1, padded[0, 0].numel())))
                    quantiles = torch.cat(
                        [
                            linear_quantiles(
                                padded[:, b : b + rows],
                                counts_here[:, b : b + rows],
                                QUANTILES,
                                inf_padded=True,
                            )
                            for b in range(0, self.batch, rows)
                        ],
                        dim=1,
                    )
                results += list(zip(chunk, quantiles.unbind(0), strict=True))
        for device in {quantiles.device for _, quantiles in results}:  # one copy (wait) per device
            on_device = [layer_pos for layer_pos, quantiles in results if quantiles.device == device]
            out[on_device] = read_to_host(torch.stack([q for _, q in results if q.device == device])).numpy()
        return out

    def _gathered(self, layers: list[list[_Piece]], device: torch.device) -> torch.Tensor:
        """The kept values ``[C, B, Q, H, R]`` on ``device`` of ``C`` layers laid out alike
        (:func:`_layout_key`), each sequence's blocks one after the other, +inf where a sequence has
        no value (rows skipped, the padding past its rows): one copy per block and start column for
        all the layers at once, whatever the sequences' skips."""
        first = layers[0]
        filled = np.zeros(self.batch, dtype=np.int64)
        copies: list[tuple[int, list[int], int]] = []  # (piece index, its entries, first column)
        for j, piece in enumerate(first):
            starts = filled[piece.sequences]
            filled[piece.sequences] += piece.block.shape[-1]
            for start in np.unique(starts):
                copies.append((j, np.flatnonzero(starts == start).tolist(), int(start)))
        shape = (len(layers), self.batch, len(QUANTILE_METRICS), self.num_heads, int(filled.max()))
        padded = torch.full(shape, float("inf"), dtype=torch.float32, device=device)
        for j, entries, start in copies:
            piece, n = first[j], first[j].block.shape[-1]
            blocks = [pieces[j].block for pieces in layers]
            block = blocks[0][None] if len(blocks) == 1 else torch.stack(blocks)  # [C, Q, N, H, n]
            slots = [piece.slots[i] for i in entries]
            part = block if slots == list(range(block.shape[2])) else block[:, :, slots]
            part = part.to(device, non_blocking=True)
            skips = [piece.skips[i] for i in entries]
            if any(skips):
                part = part.masked_fill(~_rows_kept(skips, n, device)[None, None, :, None, :], float("inf"))
            rows = [piece.sequences[i] for i in entries]
            if rows == list(range(self.batch)):
                padded[:, :, :, :, start : start + n] = part.transpose(1, 2)
            else:
                padded[:, rows, :, :, start : start + n] = part.transpose(1, 2)
        return padded

    def result(self) -> HeadSummary:
        """The summary of every row observed so far (may be called more than once)."""
        self.flush()
        for layer_pos, counts in self._qk_counts:
            self._count(layer_pos, *counts)
        self._qk_counts.clear()
        sums = self._host_sums().numpy()
        with np.errstate(invalid="ignore", divide="ignore"):
            rows = self._rows[None, :, :, None]
            means_all = np.where(rows > 0, sums / rows, np.nan)
            pooled_rows = self._rows.sum(axis=1)
            pooled = pooled_rows[None, :, None]
            pooled_all = np.where(pooled > 0, sums.sum(axis=2) / pooled, np.nan)
        quantiles = self._layer_quantiles().astype(np.float32)  # [L, B, Q, H, 3]
        return HeadSummary(
            means={name: means_all[i].astype(np.float32) for i, name in enumerate(ROW_METRICS)},
            quantiles={
                name: np.ascontiguousarray(quantiles[:, :, i]) for i, name in enumerate(QUANTILE_METRICS)
            },
            rows=self._rows.astype(np.int32),
            context_min=self._context_min.astype(np.int32),
            context_max=self._context_max.astype(np.int32),
            pooled_means={name: pooled_all[i].astype(np.float32) for i, name in enumerate(ROW_METRICS)},
            pooled_rows=pooled_rows.astype(np.int32),
        )
