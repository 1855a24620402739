"""Decoding steps' query rows kept waiting until a later step observes them all at once.

A decoding step's layer call has one query row per sequence. Observed there and then, the fused
summary metrics cost each (step, layer) two kernel launches and a handful of operators on the
forward thread: at 32 layers, milliseconds of host time a step, which the GPU waits for (decoding
is host-bound). Instead each layer keeps the step's query rows (and mask rows) as the model made
them — no copy, no operator; the call of the last step (or the one that fills the layer's room)
joins them and observes every waiting row with its own keys, which hold every earlier position's
key — causality inside the kernels keeps each row to the keys its step saw. One launch pair per
layer for up to :data:`MAX_WAITING_ROWS` steps, the same rows, the same metrics.

Rows wait only where a later call's keys are sure to hold theirs: full-attention layers (no
sliding window, whose cache may drop keys); a later call whose keys start elsewhere is an error,
never rows observed against the wrong keys. The waiting rows need only the keys up to the last of
them, which their own calls had (within the fused kernels' reach), whatever a later call has.

Shapes: B sequences, H query heads, D head dim, M1 the mask's head dim (1 or H), K keys."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from worker.capture.metrics import HeadMetricsAccumulator

MAX_WAITING_ROWS = 64  # decoding steps a layer's rows wait at most
MAX_WAITING_BYTES = 8 << 20  # a layer's waiting rows at most (32 layers: 256 MiB), whatever the batch


def waiting_capacity(
    query: torch.Tensor, mask: torch.Tensor | None, q_start: int, key_offset: int, rows_left: int
) -> int:
    """Rows a layer keeps waiting for calls like this one (``query [B, H, n, D]``, ``mask [B, M1, n,
    Kc]``) with ``rows_left`` rows to come at most: :data:`MAX_WAITING_ROWS`, fewer where
    :data:`MAX_WAITING_BYTES` would not hold them, never fewer than the call's own rows."""
    batch, heads, n, dim = query.shape
    row_bytes = batch * heads * dim * query.element_size()
    if mask is not None:  # one bool a key the last row could see
        row_bytes += batch * mask.shape[1] * (q_start + MAX_WAITING_ROWS - key_offset)
    return max(n, min(MAX_WAITING_ROWS, rows_left, MAX_WAITING_BYTES // row_bytes))


@dataclass
class _Run:
    """Waiting rows ``first .. first + rows - 1`` (counted from the first waiting row) of the same
    wanted sequences."""

    first: int
    rows: int
    wanted: tuple[int, ...]


class WaitingRows:
    """One layer's waiting query rows, at padded positions ``q_start ..``, keys from padded position
    ``key_offset``: each call's ``query [B, H, n, D]`` and ``mask [B, M1, n, Kc]`` (when the calls
    have one) held as they came — the model makes new ones every step and never writes them
    again — so a waiting step costs no operator at all; they are joined when observed."""

    def __init__(
        self,
        query: torch.Tensor,
        mask: torch.Tensor | None,
        q_start: int,
        key_offset: int,
        capacity: int,
        scaling: float,
    ) -> None:
        self.q_start, self.key_offset, self.scaling = q_start, key_offset, scaling
        self.capacity = capacity
        self._query_kind = (query.shape[0], query.shape[1], query.shape[3], query.dtype, query.device)
        self._mask_heads = None if mask is None else mask.shape[1]
        self.queries: list[torch.Tensor] = []
        self.masks: list[torch.Tensor] = []
        self.rows = 0
        self.runs: list[_Run] = []

    def takes(self, query: torch.Tensor, mask: torch.Tensor | None, q_start: int, key_offset: int) -> bool:
        """Whether a call's rows continue these: the next positions, same shapes, room left."""
        if q_start != self.q_start + self.rows or key_offset != self.key_offset:
            return False
        kind = (query.shape[0], query.shape[1], query.shape[3], query.dtype, query.device)
        if kind != self._query_kind or self.rows + query.shape[2] > self.capacity:
            return False
        return (None if mask is None else mask.shape[1]) == self._mask_heads

    @property
    def full(self) -> bool:
        return self.rows == self.capacity

    def add(self, query: torch.Tensor, mask: torch.Tensor | None, wanted: Sequence[int]) -> None:
        """A call's rows ``query [B, H, n, D]`` (``mask [B, M1, n, Kc]``) for sequences ``wanted``;
        the caller checked :meth:`takes`. Nothing runs on the device."""
        n = query.shape[2]
        self.queries.append(query)
        if mask is not None:
            self.masks.append(mask)
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
        masks_joined: dict[tuple[int, ...], torch.Tensor] | None = None,
    ) -> None:
        """Every waiting row to ``observer``, with a later call's ``key [B, KVH, Kc, D]`` (key index j
        at padded position ``key_offset + j``): one call per run of the same sequences. The rows are
        then done: the caller drops this object. ``masks_joined``: the joined masks of the layers
        observed at this step, by the masks they were joined from (the layers of a forward pass
        share their mask, so it is joined once)."""
        needed = self.q_start + self.rows - self.key_offset  # keys up to the last waiting row
        if key_offset != self.key_offset or key.shape[2] < needed:
            raise RuntimeError(
                f"layer {layer_pos}'s cache no longer holds the keys of its waiting decoding rows "
                f"(keys from position {key_offset}, {key.shape[2]} of them; the rows need {needed} "
                f"from position {self.key_offset})"
            )
        query = self.queries[0] if len(self.queries) == 1 else torch.cat(self.queries, dim=2)
        mask = None if self._mask_heads is None else self._joined_mask(needed, masks_joined)
        for run in self.runs:
            if not run.wanted:
                continue
            end = run.first + run.rows
            observer.observe_qk(
                layer_pos,
                query[:, :, run.first : end],
                key[:, :, :needed],
                pads,
                run.wanted,
                query_offset=self.q_start + run.first,
                key_offset=self.key_offset,
                scaling=self.scaling,
                mask=None if mask is None else mask[:, :, run.first : end],
            )

    def _joined_mask(self, keys: int, joined: dict[tuple[int, ...], torch.Tensor] | None) -> torch.Tensor:
        """The waiting rows' masks as one ``[B, M1, rows, keys]`` (False past each call's keys)."""
        found = None if joined is None else joined.get(tuple(map(id, self.masks)))
        if found is not None and found.shape[3] == keys:
            return found
        first = self.masks[0]
        out = torch.zeros(
            (first.shape[0], first.shape[1], self.rows, keys), dtype=torch.bool, device=first.device
        )
        row = 0
        for mask in self.masks:
            n = mask.shape[2]
            out[:, :, row : row + n, : mask.shape[3]] = mask
            row += n
        if joined is not None:  # the masks are held by this object: their ids are not reused
            joined[tuple(map(id, self.masks))] = out
        return out
