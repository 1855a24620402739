"""Export session: turns each layer's attention call into row blocks of attention, q/k/v and
hidden states, and feeds every attention row to the per-head metrics.

Per call and per sequence, padding is removed (positions become the sequence's real positions),
attention probabilities are computed in fp32 one chunk of query rows at a time, over the keys up to
the block's last row only (causal: later keys carry no weight), observed by the metrics
accumulator (every row, stored or not), cast to the storage dtype, copied to the host (on CUDA
asynchronously, into pinned buffers: :mod:`worker.capture.hostcopy`) and handed to the bundle
writer as whole row blocks. No step holds more than one row block per (array, layer, sequence).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING, Protocol, cast

import numpy as np
import torch

from storage.bundle.arrays import array_spec
from storage.bundle.layout import BundleLayout
from storage.bundle.rowblocks import RowBlock
from storage.jobs.capture import ResolvedCapture
from worker.capture.attention_math import (
    attention_probs,
    causal_allowed,
    causal_block_probs,
    expand_kv_heads,
)
from worker.capture.certify import Certifier
from worker.capture.fused_metrics import MAX_FUSED_KEYS, fused_verified
from worker.capture.hook import AttentionCall
from worker.capture.hostcopy import (
    DEFAULT_MAX_PINNED_BYTES,
    HostBlock,
    HostStager,
    device_ints,
    shared_views,
)
from worker.capture.rows import RowBlockBuffer
from worker.capture.waiting_rows import WaitingRows, waiting_capacity

if TYPE_CHECKING:
    from worker.capture.metrics import HeadMetricsAccumulator

log = logging.getLogger(__name__)

# the row blocks one layer call (or a flush) completed, handed over together
BlockSink = Callable[[list[RowBlock]], None]

_TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32}
PROBS_BUDGET_BYTES = 256 << 20  # fp32 scores computed at once (a 32K-key row of 32 heads is 4 MiB)
# rows of one probability computation: a 512-row block computed whole over the keys up to its last
# row spends 25% of its work on the masked triangle; in sub-blocks of 128 rows, 6%
SUB_BLOCK_ROWS = 128


class RowObserver(Protocol):
    """Sees every attention row block: ``probs [H, n, K]`` (column j = key position j) of the rows
    at real ``positions [n]``, a host (CPU) tensor whatever device ``probs`` is on (e.g.
    :class:`worker.capture.metrics.HeadMetricsAccumulator`). ``first_position``: the first real
    position whose row it reads; the capture computes no earlier row for it alone."""

    @property
    def first_position(self) -> int: ...

    def observe(
        self, layer_pos: int, batch_index: int, probs: torch.Tensor, positions: torch.Tensor
    ) -> None: ...


class KVSink(Protocol):
    """Receives each layer's new rows for compressed KV export (:class:`worker.kvexport.KVExport`)."""

    def on_layer(
        self,
        lp: int,
        b: int,
        row0: int,
        q: torch.Tensor,
        k_new: torch.Tensor,
        v_new: torch.Tensor,
        k_visible: torch.Tensor,
        v_visible: torch.Tensor,
        col0: int,
        scaling: float,
        sliding_window: int | None,
    ) -> None: ...


class ExportSession:
    """A :class:`~worker.capture.hook.CaptureSink` for one job (one forward-pass schedule).

    ``pads[b]``: left-padding tokens of sequence b in the GPU batch; ``prompt_lengths[b]``: its
    prompt tokens. The generation loop calls :meth:`begin_step` before each forward pass with the
    cache position of its first query row, which sequences still produce tokens and whether another
    step follows (``rows_wait``: the fused metrics' rows of this step may wait for a later step's
    call, :mod:`worker.capture.waiting_rows`; the last step's calls observe every waiting row).
    ``write_blocks(blocks)`` gets the row blocks each layer call (and :meth:`flush`) completed,
    together (the writer takes their room in its queue once and shares out their chunks).
    ``attention_heads[layer_pos]``: real query heads whose attention is stored for that layer
    (default: ``layout.heads``). ``layers``: the model layers captured (a layer shard's part of
    ``layout.layers``; default: all of them), at their positions in the layout.
    """

    def __init__(
        self,
        layout: BundleLayout,
        capture: ResolvedCapture,
        pads: Sequence[int],
        prompt_lengths: Sequence[int],
        write_blocks: BlockSink,
        *,
        on_layer_done: Callable[[], None] | None = None,
        observer: RowObserver | None = None,
        attention_heads: Sequence[Sequence[int]] | None = None,
        store_attention: bool | None = None,
        store_qkv: bool | None = None,
        store_hidden: bool | None = None,
        kv: KVSink | None = None,
        certifier: Certifier | None = None,
        max_pinned_bytes: int = DEFAULT_MAX_PINNED_BYTES,
        layers: Collection[int] | None = None,
    ) -> None:
        self.layout = layout
        self.certifier = certifier
        # the forward thread's seconds in this session's hooks (GPU work is queued, not waited for:
        # on a GPU this is what the capture adds to the passes' host time)
        self.host_s = 0.0
        self.max_pinned_bytes = max_pinned_bytes
        # one stager per device: a model placed over several GPUs hands each layer's rows over from
        # that layer's device, and a stager (its copy stream, its pinned ring) belongs to one device
        self._stagers: dict[torch.device, HostStager] = {}
        self.pads = list(pads)
        self.write_blocks = write_blocks
        self.on_layer_done = on_layer_done
        self.observer = observer
        self.kv = kv
        default_attention = layout.attention and (attention_heads is not None or layout.top_heads is None)
        self.store_attention = default_attention if store_attention is None else store_attention
        # q and k (and v with layout.qkv); derived attention stores q and k without v
        self.store_qkv = (layout.qkv or layout.derived_attention) if store_qkv is None else store_qkv
        self.store_v = self.store_qkv and layout.qkv
        self.store_hidden = layout.hidden_states if store_hidden is None else store_hidden
        self.store_sink = self.store_attention and layout.sinks
        self.layer_pos = {
            layer: i for i, layer in enumerate(layout.layers) if layers is None or layer in layers
        }
        self.attention_heads = [list(h) for h in attention_heads] if attention_heads is not None else None
        self.q_start = 0
        self.active = [True] * len(self.pads)
        self.rows_wait = False
        self._waiting: dict[int, WaitingRows] = {}  # layer_pos → its decoding rows not yet observed
        self._masks_joined: dict[tuple[int, ...], torch.Tensor] = {}  # this step's (WaitingRows.observe)
        self._step_wanted: dict[int, list[int]] = {}  # q_len → the sequences with rows in the call
        self._index_cache: dict[tuple[str, int], torch.Tensor] = {}
        # stored attention row of each position (-1: not stored), per sequence (read only)
        every_row = np.arange(layout.positions)
        self.row_index: list[np.ndarray] = []
        for prompt_length in prompt_lengths:
            if not capture.selects_rows:  # every row (keeps_row a position at a time: ~50 ms a batch)
                self.row_index.append(every_row)
                continue
            keep = np.array([capture.keeps_row(p, prompt_length) for p in range(layout.positions)])
            self.row_index.append(np.where(keep, np.cumsum(keep) - 1, -1))
        self._buffers: dict[tuple[str, int, int], RowBlockBuffer] = {}
        self._completed: list[RowBlock] = []  # row blocks not handed over yet (this call's)
        # with no generated tokens (positions = the longest prompt) a sequence's q/k/v and hidden
        # rows end with its prompt: its last row block goes to the writer without a wait here
        prefill_only = layout.positions == max(prompt_lengths, default=0)
        for name, on in (
            ("attention", self.store_attention),
            ("attention_sink", self.store_sink),
            ("q", self.store_qkv),
            ("k", self.store_qkv),
            ("v", self.store_v),
            ("hidden_states", self.store_hidden),
        ):
            if not on:
                continue
            dtype = np.dtype(layout.dtype(name))
            heads, width = array_spec(name).row_block(layout)
            for lp in self.layer_pos.values():
                for b in range(layout.batch):
                    final_rows = prompt_lengths[b] if prefill_only else None
                    self._buffers[(name, lp, b)] = RowBlockBuffer(
                        heads, layout.chunk_rows, dtype, width, final_rows=final_rows
                    )

    def _host(self, tensor: torch.Tensor) -> HostBlock:
        """``tensor`` on the host for the writer (asynchronously from CUDA)."""
        stager = self._stagers.get(tensor.device)
        if stager is None:
            stager = self._stagers[tensor.device] = HostStager(tensor.device, self.max_pinned_bytes)
        return stager.to_host(tensor)

    def begin_step(self, q_start: int, active: Sequence[bool], *, rows_wait: bool = False) -> None:
        self.q_start = q_start
        self.active = list(active)
        self.rows_wait = rows_wait
        self._step_wanted = {}
        self._masks_joined = {}

    def _index(self, kind: str, lp: int, device: torch.device) -> torch.Tensor:
        key = (kind, lp)
        cached = self._index_cache.get(key)
        if cached is None or cached.device != device:
            if kind == "kv":
                values: Sequence[int] = self.layout.kv_heads
            elif kind == "att" and self.attention_heads is not None:
                values = self.attention_heads[lp]
            else:
                values = self.layout.heads
            cached = device_ints(list(values), device)
            self._index_cache[key] = cached
        return cached

    def _every_head(self, lp: int, num_heads: int) -> bool:
        """Whether layer ``lp`` stores every query head in order (decided on the host: no sync)."""
        heads = self.attention_heads[lp] if self.attention_heads is not None else self.layout.heads
        return list(heads) == list(range(num_heads))

    def _rows(self, b: int, q_len: int) -> tuple[int, int]:
        """(first real row in this call, its index among the call's query rows) for sequence b."""
        row0 = max(0, self.q_start - self.pads[b])
        return row0, row0 + self.pads[b] - self.q_start

    def _call_rows(self, q_len: int) -> list[tuple[int, int, int]]:
        """``(b, row0, i0)`` of each active sequence with rows in a call of ``q_len`` query rows
        (:meth:`_rows`)."""
        rows = [(b, *self._rows(b, q_len)) for b in range(len(self.pads)) if self.active[b]]
        return [(b, row0, i0) for b, row0, i0 in rows if i0 < q_len]

    # -- CaptureSink ---------------------------------------------------------------------------
    def on_attention(self, call: AttentionCall) -> None:
        t0 = time.perf_counter()
        try:
            self._on_attention(call)
            self._hand_over()
        finally:
            self.host_s += time.perf_counter() - t0

    def _on_attention(self, call: AttentionCall) -> None:
        lp = self.layer_pos.get(call.layer_idx)
        if lp is None:
            return
        query, key, value = call.query, call.key, call.value
        _, num_heads, q_len, _ = query.shape
        k_len = key.shape[2]
        k_abs0 = self.q_start + q_len - k_len  # keys are the most recent k_len positions
        certify = self.certifier is not None and self.certifier.due(call.layer_idx, q_len)
        checked = Certifier.sequences(self.pads, self.active) if certify else frozenset()
        fused = self._fused_observe(call, lp, k_abs0)
        if not fused and lp in self._waiting:  # earlier steps' rows, observed with this call's keys
            self._observe_waiting(self._waiting.pop(lp), lp, call, k_abs0)
        # fused metrics alone (no q/k/v, KV or check of a sequence): nothing to do per sequence
        per_sequence = not fused or self.store_qkv or self.kv is not None or bool(checked)
        rows = self._call_rows(q_len) if per_sequence else []
        if self.store_qkv and rows:
            self._capture_qkv(lp, rows, query, key[:, :, k_len - q_len :], value[:, :, k_len - q_len :])
        picks: list[tuple[int, int, int, tuple[int, int]]] = []  # sequences the certifier computes
        for b, row0, i0 in rows:
            pad = self.pads[b]
            col0 = max(0, k_abs0 - pad)  # first real key column available
            j0 = col0 + pad - k_abs0
            computes_probs = self.store_attention or (self.observer is not None and not fused)
            # the certifier computes when nothing is computed here, and for derived attention
            # (what the reader will reconstruct, not what the metrics saw)
            derived = self.certifier is not None and self.certifier.derived_chunks is not None
            if b in checked and (derived or not computes_probs):
                picks.append((b, i0, j0, (row0, col0)))
            new0 = k_len - q_len + i0  # the rows' own (new) key/value positions
            if self.kv is not None:
                self.kv.on_layer(
                    lp,
                    b,
                    row0,
                    query[b, :, i0:],
                    key[b, :, new0:],
                    value[b, :, new0:],
                    key[b, :, j0:],
                    value[b, :, j0:],
                    col0,
                    call.scaling,
                    call.sliding_window,
                )
            if computes_probs:
                certify_here = b in checked and not derived
                skip = 0  # rows only the observer reads, before the first it reads: not computed
                if self.observer is not None and not (self.store_attention or certify_here):
                    skip = min(q_len - i0, max(0, self.observer.first_position - row0))
                if i0 + skip < q_len:
                    self._capture_attention(
                        lp, b, call, row0 + skip, i0 + skip, col0, j0, num_heads, certify_here
                    )
        if picks:
            assert self.certifier is not None
            self.certifier.check_sequences(call, picks, self.q_start, k_abs0)
        if fused:
            self._observe_fused(call, lp, k_abs0)
        if self.on_layer_done is not None:
            self.on_layer_done()

    def _fused_observe(self, call: AttentionCall, lp: int, k_abs0: int) -> bool:
        """Whether this call's rows go to the observer from q and k (:meth:`_observe_fused`) rather
        than as probabilities: only the metrics read them (no attention stored), the observer takes
        q and k, the softmax is plain (no soft-cap, sinks or additive bias; a boolean mask or a
        window is fine), every head in order, each sequence's keys start at its real position 0,
        and the fused kernels run on this device for this many keys and passed their self-check
        there (:func:`fused_verified`)."""
        observe_qk = getattr(self.observer, "observe_qk", None)
        if observe_qk is None or self.store_attention or not call.causal:
            return False
        if call.softcap is not None or call.sinks is not None or call.unknown:
            return False
        if call.mask is not None and call.mask.dtype != torch.bool:
            return False
        if not self._every_head(lp, call.query.shape[1]) or call.key.shape[2] > MAX_FUSED_KEYS:
            return False
        if any(pad < k_abs0 for pad in self.pads):  # some sequence's first keys are not in the call
            return False
        return fused_verified(call.query.device, call.query.dtype)

    def _observe_fused(self, call: AttentionCall, lp: int, k_abs0: int) -> None:
        """Every active sequence's rows of this call to the observer at once, from q and k — or,
        in a decoding step another step follows, kept waiting for a later call of this layer."""
        q_len = call.query.shape[2]
        wanted = self._step_wanted.get(q_len)
        if wanted is None:  # the same for every layer of a forward pass
            wanted = [b for b in range(len(self.pads)) if self.active[b] and self._rows(b, q_len)[1] < q_len]
            self._step_wanted[q_len] = wanted
        waiting = self._waiting.pop(lp, None)
        if waiting is not None and not waiting.takes(call.query, call.mask, self.q_start, k_abs0):
            self._observe_waiting(waiting, lp, call, k_abs0)
            waiting = None
        # rows wait only where a later call's keys surely hold theirs: no window (its cache may drop keys)
        can_wait = self.rows_wait and call.sliding_window is None
        if waiting is None and can_wait:
            rows_left = self.layout.positions - self.q_start
            capacity = waiting_capacity(call.query, call.mask, self.q_start, k_abs0, rows_left)
            waiting = WaitingRows(call.query, call.mask, self.q_start, k_abs0, capacity, call.scaling)
        if waiting is not None:
            waiting.add(call.query, call.mask, wanted)
            if can_wait and not waiting.full:
                self._waiting[lp] = waiting
            else:
                self._observe_waiting(waiting, lp, call, k_abs0)
            return
        if not wanted:
            return
        self.observer.observe_qk(  # type: ignore[union-attr]
            lp,
            call.query,
            call.key,
            self.pads,
            wanted,
            query_offset=self.q_start,
            key_offset=k_abs0,
            scaling=call.scaling,
            mask=call.mask,
            sliding_window=call.sliding_window,
        )

    def _observe_waiting(self, waiting: WaitingRows, lp: int, call: AttentionCall, k_abs0: int) -> None:
        """``waiting``'s rows (earlier steps', and this call's if added) with this call's keys."""
        observer = cast("HeadMetricsAccumulator", self.observer)
        waiting.observe(observer, lp, call.key, k_abs0, self.pads, self._masks_joined)

    def on_hidden(self, layer_idx: int, hidden: torch.Tensor) -> None:
        """Residual stream after layer ``layer_idx``: ``hidden [B, Tq, hidden]``."""
        t0 = time.perf_counter()
        try:
            self._on_hidden(layer_idx, hidden)
            self._hand_over()
        finally:
            self.host_s += time.perf_counter() - t0

    def _on_hidden(self, layer_idx: int, hidden: torch.Tensor) -> None:
        lp = self.layer_pos.get(layer_idx)
        if lp is None or not self.store_hidden:
            return
        rows = self._call_rows(hidden.shape[1])
        if not rows:
            return
        host = self._host(hidden.to(_TORCH_DTYPES[self.layout.qkv_dtype]))  # the call's rows at once
        views = shared_views(host, [host.array[b, i0:][None] for b, _, i0 in rows])
        for (b, row0, _), view in zip(rows, views, strict=True):
            self._emit("hidden_states", lp, b, row0, view)

    def _emit(self, name: str, lp: int, b: int, row0: int, data: HostBlock, col0: int = 0) -> None:
        for block, block_data in self._buffers[(name, lp, b)].add(row0, data, col0):
            self._completed.append(_row_block(name, lp, b, block, block_data))

    def _hand_over(self) -> None:
        """The row blocks completed since the last hand-over, to the writer at once."""
        if self._completed:
            completed, self._completed = self._completed, []
            self.write_blocks(completed)

    def _capture_qkv(
        self,
        lp: int,
        rows: Sequence[tuple[int, int, int]],
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
    ) -> None:
        """``q [B, H, n, D]``, ``k``/``v [B, KVH, n, D]``: the call's rows' own (new) positions, copied
        to the host once a layer call; each of ``rows`` (sequence b, its first real row0, at call
        row i0) hands its rows to the writer as views of that copy."""
        dtype = _TORCH_DTYPES[self.layout.qkv_dtype]
        heads, kv_heads = self._index("q", lp, q.device), self._index("kv", lp, q.device)
        names = [("q", q, heads), ("k", k, kv_heads)] + ([("v", v, kv_heads)] if self.store_v else [])
        for name, tensor, index in names:
            host = self._host(tensor.index_select(1, index).to(dtype))
            views = shared_views(host, [host.array[b, :, i0:] for b, _, i0 in rows])
            for (b, row0, _), view in zip(rows, views, strict=True):
                self._emit(name, lp, b, row0, view)

    def _capture_attention(
        self,
        lp: int,
        b: int,
        call: AttentionCall,
        row0: int,
        i0: int,
        col0: int,
        j0: int,
        num_heads: int,
        certify: bool = False,
    ) -> None:
        """Rows ``i0..`` of the call (real positions ``row0..``) of sequence ``b``; key index ``j0``
        of the call is real position ``col0``. Each block of rows is computed over the keys up to
        its last row, rounded up to whole key chunks (the columns beyond are masked: exact zeros).
        ``certify``: the certifier verifies the sampled rows of these very probabilities."""
        query, key = call.query, call.key
        q_len, k_len = query.shape[2], key.shape[2]
        rows_per_chunk = self.layout.chunk_rows
        head_idx = self._index("att", lp, query.device)
        every_head = self._every_head(lp, num_heads)
        # the common case: no padding, every head, plain softmax
        fast = call.mask is None and every_head and call.softcap is None and call.sinks is None
        keys = None if fast else expand_kv_heads(key[b : b + 1, :, j0:], num_heads).index_select(1, head_idx)
        k_abs = torch.arange(self.q_start + q_len - k_len + j0, self.q_start + q_len, device=query.device)
        dtype = _TORCH_DTYPES[self.layout.attention_dtype]
        row = row0
        while i0 < q_len:
            n = min(q_len - i0, rows_per_chunk - row % rows_per_chunk)  # stay inside one row block
            # causal: keys after the block's last row (real position row + n - 1) are never visible
            width_end = -(-(row + n) // rows_per_chunk) * rows_per_chunk
            n_keys = min(k_len - j0, width_end - col0)
            heads = head_idx.numel()
            # fp32 scores of at most PROBS_BUDGET_BYTES at a time: GPU memory bounded at any length;
            # causal sub-blocks of SUB_BLOCK_ROWS rows see only the keys up to their last row
            step = max(1, min(n, SUB_BLOCK_ROWS, PROBS_BUDGET_BYTES // (heads * n_keys * 4)))
            block: torch.Tensor | None = None
            sink_block = (
                torch.empty((heads, n, 1), dtype=torch.float32, device=query.device)
                if self.store_sink
                else None
            )
            for s0 in range(0, n, step):
                s1 = min(n, s0 + step)
                width = n_keys
                if keys is None:
                    width = min(n_keys, row + s1 - col0)  # later keys are masked: exact zeros
                    probs = causal_block_probs(
                        query[b, :, i0 + s0 : i0 + s1],
                        key[b, :, j0 : j0 + width],
                        scaling=call.scaling,
                        q_start=row + s0,
                        k_start=col0,
                        sliding_window=call.sliding_window,
                    )
                else:
                    probs = self._masked_probs(
                        call, b, keys[:, :, :n_keys], k_abs[:n_keys], i0 + s0, s1 - s0, j0, head_idx
                    )
                if certify:
                    assert self.certifier is not None
                    k_abs0 = self.q_start + q_len - k_len
                    self.certifier.check_block(call, b, probs, i0 + s0, j0, head_idx, self.q_start, k_abs0)
                if sink_block is not None:  # the mass the sink took: 1 minus the row's sum
                    sink_block[:, s0:s1, 0] = 1.0 - probs.sum(dim=-1)
                if self.observer is not None:
                    positions = torch.arange(row + s0, row + s1)  # on the host: no device sync
                    full = torch.nn.functional.pad(probs, (col0, 0)) if col0 else probs
                    self.observer.observe(lp, b, full, positions)
                if self.store_attention:
                    if step == n and width == n_keys:
                        block = probs.to(dtype)
                    else:
                        if block is None:  # zeros: right of each sub-block's last row
                            block = torch.zeros((heads, n, n_keys), dtype=dtype, device=query.device)
                        block[:, s0:s1, :width].copy_(probs)
                del probs
            if block is not None:
                self._emit_attention(lp, b, row, block, col0)
            if sink_block is not None:
                self._emit_attention(lp, b, row, sink_block, 0, name="attention_sink")
            i0 += n
            row += n

    def _emit_attention(
        self, lp: int, b: int, row: int, block: torch.Tensor, col0: int, name: str = "attention"
    ) -> None:
        """Hand ``block [H', n, K]`` (rows at real positions ``row ..``) to the writer as array
        ``name``: only the stored rows (every one unless rows are selected)."""
        n = block.shape[1]
        stored = self.row_index[b][row : row + n]
        keep = stored >= 0
        if keep.all():
            self._emit(name, lp, b, int(stored[0]), self._host(block), col0)
        elif keep.any():
            rows = torch.from_numpy(np.flatnonzero(keep)).to(block.device)
            kept = self._host(block.index_select(1, rows))
            self._emit(name, lp, b, int(stored[keep][0]), kept, col0)

    def _masked_probs(
        self,
        call: AttentionCall,
        b: int,
        keys: torch.Tensor,
        k_abs: torch.Tensor,
        i0: int,
        n: int,
        j0: int,
        head_idx: torch.Tensor,
    ) -> torch.Tensor:
        """Rows ``i0 .. i0 + n`` of the call over ``keys [1, H', K, D]`` (already the selected heads),
        with the model's mask (padded batch) or the causal one: ``[H', n, K]``."""
        query, num_heads, n_keys = call.query, call.query.shape[1], keys.shape[2]
        q_block = query[b : b + 1, :, i0 : i0 + n].index_select(1, head_idx)
        allowed = additive = None
        if call.mask is None:
            q_abs = torch.arange(self.q_start + i0, self.q_start + i0 + n, device=query.device)
            allowed = causal_allowed(q_abs, k_abs, call.sliding_window)
        else:
            mask = call.mask[b : b + 1, :, i0 : i0 + n, j0 : j0 + n_keys]
            if mask.shape[1] == num_heads:
                mask = mask.index_select(1, head_idx)
            if mask.dtype == torch.bool:
                allowed = mask
            else:
                additive = mask
        sinks = None if call.sinks is None else call.sinks.index_select(0, head_idx)
        probs = attention_probs(
            q_block,
            keys,
            scaling=call.scaling,
            allowed=allowed,
            additive_mask=additive,
            softcap=call.softcap,
            sinks=sinks,
        )
        return probs[0]

    def flush(self) -> None:
        """Write every incomplete last row block (end of the job, or a cancelled job's partial data).
        Rows still waiting (no last step ran: the loop was stopped by an error) are not observed."""
        if self._waiting:
            log.warning("rows of %d layers' last decoding steps were never observed", len(self._waiting))
            self._waiting.clear()
        for (name, lp, b), buffer in self._buffers.items():
            tail = buffer.flush()
            if tail is not None:
                self._completed.append(_row_block(name, lp, b, *tail))
        self._hand_over()


def _row_block(name: str, lp: int, b: int, block: int, data: HostBlock) -> RowBlock:
    return RowBlock(name, lp, b, block, data.array, data.ready, data.release)
