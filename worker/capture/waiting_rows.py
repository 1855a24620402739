"""Decoding steps' query rows held on the device until a later step observes them all at once.

A decoding step's layer call has one query row per sequence. Observed there and then, the fused
summary metrics cost each (step, layer) two kernel launches and a handful of operators on the
forward thread: at 32 layers, milliseconds of host time a step, which the GPU waits for (decoding
is host-bound). Instead each step copies its query rows (and its mask rows) into one buffer per
layer; the call of the last step (or the one that fills the buffer) observes every waiting row
with its own keys, which hold every earlier position's key — causality inside the kernels keeps
each row to the keys its step saw. One launch pair per layer for up to :data:`MAX_WAITING_ROWS`
steps, the same rows, the same metrics.

Rows wait only where a later call's keys are sure to hold theirs: full-attention layers (no
sliding window, whose cache may drop keys); a later call whose keys start elsewhere is an error,
never rows observed against the wrong keys. The waiting rows need only the keys up to the last of
them, which their own calls had (within the fused kernels' reach), whatever a later call has.

Shapes: B sequences, H query heads, D head dim, M1 the mask's head dim (1 or H), C the buffer's
rows, K keys.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from worker.capture.metrics import HeadMetricsAccumulator

MAX_WAITING_ROWS = 64  # decoding steps a layer's rows wait at most
MAX_WAITING_BYTES = 8 << 20  # a layer's buffers at most (32 layers: 256 MiB), whatever the batch


def waiting_capacity(
    query: torch.Tensor, mask: torch.Tensor | None, q_start: int, key_offset: int, rows_left: int
) -> int:
    """Rows a layer's buffer holds for calls like this one (``query [B, H, n, D]``, ``mask [B, M1, n,
    Kc]``) with ``rows_left`` rows to come at most: :data:`MAX_WAITING_ROWS`, fewer where
    :data:`MAX_WAITING_BYTES` would not hold them, never fewer than the call's own rows."""
    batch, heads, n, dim = query.shape
    row_bytes = batch * heads * dim * query.element_size()
    if mask is not None:  # one bool a key the last row could see
        row_bytes += batch * mask.shape[1] * (q_start + MAX_WAITING_ROWS - key_offset)
    return max(n, min(MAX_WAITING_ROWS, rows_left, MAX_WAITING_BYTES // row_bytes))


@dataclass
class _Run:
    """Waiting rows ``first .. first + rows - 1`` (buffer rows) of the same wanted sequences."""

    first: int
    rows: int
    wanted: tuple[int, ...]


class WaitingRows:
    """One layer's waiting query rows: ``query [B, H, C, D]`` and, when the calls have a mask,
    ``mask [B, M1, C, K]`` (False beyond each row's keys) — rows at padded positions ``q_start ..``,
    keys from padded position ``key_offset``."""

    def __init__(
        self,
        query: torch.Tensor,
        mask: torch.Tensor | None,
        q_start: int,
        key_offset: int,
        capacity: int,
        scaling: float,
    ) -> None:
        batch, heads, _, dim = query.shape
        self.q_start, self.key_offset, self.scaling = q_start, key_offset, scaling
        self.capacity = capacity
        self.query = torch.empty((batch, heads, capacity, dim), dtype=query.dtype, device=query.device)
        self.mask: torch.Tensor | None = None
        if mask is not None:
            keys = q_start + capacity - key_offset  # the keys the last row could see
            shape = (batch, mask.shape[1], capacity, keys)
            self.mask = torch.zeros(shape, dtype=torch.bool, device=mask.device)
        self.rows = 0
        self.runs: list[_Run] = []

    def takes(self, query: torch.Tensor, mask: torch.Tensor | None, q_start: int, key_offset: int) -> bool:
        """Whether a call's rows continue these: the next positions, same shapes, room left."""
        if q_start != self.q_start + self.rows or key_offset != self.key_offset:
            return False
        if query.dtype != self.query.dtype or query.shape[:2] != self.query.shape[:2]:
            return False
        if query.shape[3] != self.query.shape[3] or self.rows + query.shape[2] > self.capacity:
            return False
        if (mask is None) != (self.mask is None):
            return False
        return mask is None or (self.mask is not None and mask.shape[1] == self.mask.shape[1])

    @property
    def full(self) -> bool:
        return self.rows == self.capacity

    def add(self, query: torch.Tensor, mask: torch.Tensor | None, wanted: Sequence[int]) -> None:
        """A call's rows ``query [B, H, n, D]`` (``mask [B, M1, n, Kc]``) for sequences ``wanted``;
        the caller checked :meth:`takes`. One copy each, queued on the device."""
        n = query.shape[2]
        self.query[:, :, self.rows : self.rows + n].copy_(query)
        if self.mask is not None and mask is not None:
            self.mask[:, :, self.rows : self.rows + n, : mask.shape[3]].copy_(mask)
        last = self.runs[-1] if self.runs else None
        if last is not None and last.wanted == tuple(wanted):
            last.rows += n
        else:
            self.runs.append(_Run(self.rows, n, tuple(wanted)))
        self.rows += n

    def observe(
        self,
        observer: HeadMetricsAccumulator,
        layer_pos: int,
        key: torch.Tensor,
        key_offset: int,
        pads: Sequence[int],
    ) -> None:
        """Every waiting row to ``observer``, with a later call's ``key [B, KVH, Kc, D]`` (key index j
        at padded position ``key_offset + j``): one call per run of the same sequences. The rows are
        then done: the caller drops this object."""
        needed = self.q_start + self.rows - self.key_offset  # keys up to the last waiting row
        if key_offset != self.key_offset or key.shape[2] < needed:
            raise RuntimeError(
                f"layer {layer_pos}'s cache no longer holds the keys of its waiting decoding rows "
                f"(keys from position {key_offset}, {key.shape[2]} of them; the rows need {needed} "
                f"from position {self.key_offset})"
            )
        for run in self.runs:
            if not run.wanted:
                continue
            end = run.first + run.rows
            observer.observe_qk(
                layer_pos,
                self.query[:, :, run.first : end],
                key[:, :, :needed],
                pads,
                run.wanted,
                query_offset=self.q_start + run.first,
                key_offset=self.key_offset,
                scaling=self.scaling,
                mask=None if self.mask is None else self.mask[:, :, run.first : end, :needed],
            )
