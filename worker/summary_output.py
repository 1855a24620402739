"""Turn the per-head metrics of a job into bundle arrays (``summary`` group) and top-head choices."""

from __future__ import annotations

from typing import Any

import numpy as np

from storage.bundle.labels import LABELS, SummaryParams, kv_head_mean, label_heads
from storage.bundle.layout import BundleLayout
from storage.jobs.capture import TopHeadsSpec
from worker.capture.metrics import QUANTILES, HeadSummary

KV_AGGREGATES = ("sink", "local", "middle", "entropy", "k90_frac", "max_weight")

Arrays = dict[str, tuple[tuple[str, ...], np.ndarray]]


def choose_top_heads(result: HeadSummary, layout: BundleLayout, spec: TopHeadsSpec) -> list[list[int]]:
    """Per exported layer, the real indices of the ``spec.n`` heads ranking first on ``spec.metric``
    (pooled over the job's sequences), best first. Heads without eligible rows rank last."""
    values = result.pooled_means[spec.metric]  # [L, H]
    ranked = np.where(np.isnan(values), np.inf, values if spec.order == "lowest" else -values)
    order = np.argsort(ranked, axis=1, kind="stable")[:, : spec.n]
    heads = np.asarray(layout.heads)
    return [heads[row].tolist() for row in order]


def summary_arrays(
    result: HeadSummary,
    induction: np.ndarray | None,
    layout: BundleLayout,
    params: SummaryParams,
    num_heads: int,
    num_kv_heads: int,
    induction_threshold: float = 0.4,
) -> tuple[Arrays, dict[str, Any]]:
    """Arrays of the ``summary`` group (coordinates included, so it opens on its own with
    ``xr.open_zarr(store, group="summary")``) and a small dict for the job's status."""
    lbh, lh = ("layer", "batch", "head"), ("layer", "head")
    arrays: Arrays = {
        "layer": (("layer",), np.asarray(layout.layers, dtype=np.int32)),
        "head": (("head",), np.asarray(layout.heads, dtype=np.int32)),
        "quantile": (("quantile",), np.asarray(QUANTILES, dtype=np.float32)),
        "rows": (("layer", "batch"), result.rows.astype(np.int32)),
        "context_min": (("layer", "batch"), result.context_min.astype(np.int32)),
        "context_max": (("layer", "batch"), result.context_max.astype(np.int32)),
        "pooled_rows": (("layer",), result.pooled_rows.astype(np.int32)),
    }
    for name, values in result.means.items():
        arrays[name] = (lbh, values.astype(np.float32))
        arrays[f"pooled_{name}"] = (lh, result.pooled_means[name].astype(np.float32))
    for name, values in result.quantiles.items():
        arrays[f"{name}_quantiles"] = (("layer", "batch", "head", "quantile"), values.astype(np.float32))
    labels = label_heads(result.means, result.rows[:, :, None], params)
    pooled_labels = label_heads(result.pooled_means, result.pooled_rows[:, None], params)
    arrays["label"] = (lbh, np.asarray(labels, dtype=object))
    arrays["pooled_label"] = (lh, np.asarray(pooled_labels, dtype=object))
    kv_heads: list[int] = []
    for name in KV_AGGREGATES:
        kv = kv_head_mean(result.means[name], num_kv_heads, layout.heads, num_heads=num_heads)
        arrays[f"kv_{name}"] = (("layer", "batch", "kv_head"), kv.values.astype(np.float32))
        kv_heads = kv.kv_heads.tolist()
    arrays["kv_head"] = (("kv_head",), np.asarray(kv_heads, dtype=np.int32))
    if induction is not None:
        arrays["induction"] = (lh, induction.astype(np.float32))
        arrays["induction_head"] = (lh, (induction > induction_threshold).astype(np.int8))
    eligible = result.rows > 0
    counts = {label: int((np.asarray(pooled_labels) == label).sum()) for label in LABELS}
    status = {
        "pooled_label_counts": {k: v for k, v in counts.items() if v},
        "eligible_rows": int(result.rows.sum()),
        "context_length_range": (
            [int(result.context_min[eligible].min()), int(result.context_max[eligible].max())]
            if eligible.any()
            else None
        ),
        "params": params.model_dump(),
        **(
            {"induction_heads": int((induction > induction_threshold).sum())} if induction is not None else {}
        ),
    }
    return arrays, status
