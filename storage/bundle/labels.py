"""Pattern labels and per-kv-head aggregates of the per-head summary metrics (``HEAD_METRICS.md``).

numpy only: the worker labels heads with it when it writes a bundle, and a researcher can relabel
the stored means with other thresholds in Jupyter::

    from storage.bundle.labels import SummaryParams, label_heads
    labels = label_heads(means, rows[..., None], SummaryParams(sink_mass=0.7))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
from pydantic import BaseModel, ConfigDict, Field


class SummaryParams(BaseModel):
    """Parameters of the per-head metrics and labels (HEAD_METRICS.md): ``capture.summary_params``
    of a job spec, stored in the bundle."""

    model_config = ConfigDict(extra="forbid")

    sink_tokens: int = Field(4, ge=1, le=1024, description="s: the first s keys are the sink set")
    local_window: int = Field(64, ge=1, le=65536, description="W: the last W keys are the local set")
    uniform_entropy_norm: float = Field(0.85, ge=0, le=1)
    previous_token_weight: float = Field(0.4, ge=0, le=1)
    previous_token_argmax_rate: float = Field(0.9, ge=0, le=1)
    sink_mass: float = Field(0.8, ge=0, le=1)
    local_mass: float = Field(0.8, ge=0, le=1)
    streaming_middle_max: float = Field(0.1, ge=0, le=1)
    streaming_sink_min: float = Field(0.1, ge=0, le=1)
    streaming_local_min: float = Field(0.1, ge=0, le=1)
    middle_mass: float = Field(0.5, ge=0, le=1)
    retrieval_middle_k90_max: int = Field(16, ge=1)

    @property
    def min_keys(self) -> int:
        """Rows with fewer visible keys than ``4 (s + W)`` are not eligible for metrics."""
        return 4 * (self.sink_tokens + self.local_window)


LABELS: tuple[str, ...] = (
    "uniform",
    "previous_token",
    "sink",
    "local",
    "streaming",
    "retrieval_candidate",
    "scattered",
    "mixed",
    "undetermined",
)
LABEL_METRICS: tuple[str, ...] = (
    "entropy_norm",
    "prev",
    "prev_argmax_rate",
    "sink",
    "local",
    "middle",
    "middle_k90",
)
_LABEL_DTYPE = np.dtype(f"<U{max(map(len, LABELS))}")


def _rules(m: Mapping[str, np.ndarray], p: SummaryParams) -> list[tuple[str, np.ndarray]]:
    """``(label, condition)`` in spec order; the first true condition wins."""
    middle = m["middle"]
    return [
        ("uniform", m["entropy_norm"] >= p.uniform_entropy_norm),
        (
            "previous_token",
            (m["prev"] >= p.previous_token_weight) | (m["prev_argmax_rate"] >= p.previous_token_argmax_rate),
        ),
        ("sink", m["sink"] >= p.sink_mass),
        ("local", m["local"] >= p.local_mass),
        (
            "streaming",
            (middle <= p.streaming_middle_max)
            & (m["sink"] >= p.streaming_sink_min)
            & (m["local"] >= p.streaming_local_min),
        ),
        ("retrieval_candidate", (middle >= p.middle_mass) & (m["middle_k90"] <= p.retrieval_middle_k90_max)),
        ("scattered", (middle >= p.middle_mass) & (m["middle_k90"] > p.retrieval_middle_k90_max)),
    ]


def label_heads(
    means: Mapping[str, np.ndarray], rows: np.ndarray | int, params: SummaryParams | None = None
) -> np.ndarray:
    """Pattern label of every head from its mean metrics (elementwise over any shape).

    ``means`` maps at least :data:`LABEL_METRICS` to arrays of one shape (e.g. ``[L, B, H]``, or the
    pooled ``[L, H]``); ``rows`` (eligible rows behind each mean) must broadcast against them (e.g.
    ``[L, B, 1]`` or ``[L, 1]``). Returns a str array (``<U19``) of :data:`LABELS` of the broadcast
    shape: the first rule of HEAD_METRICS.md that matches, ``"mixed"`` when none does, and
    ``"undetermined"`` where ``rows == 0`` or a needed mean is NaN (never guessed). Thresholds come
    from ``params`` (default :class:`SummaryParams`).
    """
    params = params if params is not None else SummaryParams()
    missing = [name for name in LABEL_METRICS if name not in means]
    if missing:
        raise KeyError(f"label_heads needs the means of {', '.join(missing)}")
    metric_values = (np.asarray(means[name], dtype=np.float64) for name in LABEL_METRICS)
    arrays = np.broadcast_arrays(np.asarray(rows), *metric_values)
    rows_b, metric_arrays = arrays[0], dict(zip(LABEL_METRICS, arrays[1:], strict=True))
    open_ = rows_b > 0
    for values in metric_arrays.values():
        open_ = open_ & ~np.isnan(values)
    labels = np.full(rows_b.shape, "undetermined", dtype=_LABEL_DTYPE)
    with np.errstate(invalid="ignore"):
        rules = _rules(metric_arrays, params)
    for label, condition in rules:
        hit = open_ & condition
        labels[hit] = label
        open_ = open_ & ~hit
    labels[open_] = "mixed"
    return labels


class KvHeadMeans(NamedTuple):
    """:func:`kv_head_mean`'s result: ``values [..., KVH_exported]`` and the real kv-head index of each."""

    values: np.ndarray
    kv_heads: np.ndarray  # int64, sorted ascending


def kv_head_mean(
    values: np.ndarray,
    num_kv_heads: int,
    heads: Sequence[int] | None = None,
    *,
    num_heads: int | None = None,
) -> KvHeadMeans:
    """Mean of per-query-head ``values [..., H_exported]`` over the query heads reading each kv head.

    Query head ``h`` reads kv head ``h // (num_heads // num_kv_heads)`` (grouped-query attention).
    ``heads``: the real query-head index of each entry of the last axis (default ``0..H-1``, i.e.
    every head exported; then ``num_heads`` defaults to ``values.shape[-1]``). With a head subset,
    ``num_heads`` (the model's query-head count) is required, and each kv head's mean covers only
    its exported query heads. Returns ``KvHeadMeans(values [..., KVH_exported], kv_heads)`` where
    ``kv_heads`` are the sorted real indices of the kv heads read by at least one exported head.
    NaN propagates (a mean with no eligible rows stays NaN).
    """
    data = np.asarray(values)
    if data.ndim < 1:
        raise ValueError("values must have a head axis (the last one)")
    exported = data.shape[-1]
    if heads is None:
        head_index = np.arange(exported)
        num_heads = exported if num_heads is None else num_heads
    else:
        if num_heads is None:
            raise ValueError("num_heads (the model's query-head count) is required when heads is given")
        head_index = np.asarray(heads, dtype=np.int64).reshape(-1)
    if len(head_index) != exported:
        raise ValueError(f"{len(head_index)} head indices for a last axis of {exported}")
    if len(np.unique(head_index)) != len(head_index):
        raise ValueError("head indices must be unique")
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads is not a multiple of {num_kv_heads} kv heads")
    if len(head_index) and (head_index.min() < 0 or head_index.max() >= num_heads):
        raise ValueError(f"head indices must lie in 0..{num_heads - 1}")
    kv_of = head_index // (num_heads // num_kv_heads)
    kv_heads = np.unique(kv_of).astype(np.int64)
    if len(kv_heads) == 0:
        return KvHeadMeans(np.empty((*data.shape[:-1], 0), dtype=data.dtype), kv_heads)
    means = np.stack([data[..., kv_of == kv].mean(axis=-1) for kv in kv_heads], axis=-1)
    return KvHeadMeans(means, kv_heads)
