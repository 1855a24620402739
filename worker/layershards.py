"""Layer shards: one batch of prompts (a long prompt, typically) cut by its exported layers (issue 15).

A one-batch job's cost is per layer: every exported layer's attention rows, q/k/v and hidden
states are computed and written on their own, and for a long prompt that is most of the job. With
``QKVAULT_SHARD_LAYERS`` > 0 a one-batch job exporting more layers than that is cut into shards of
that many consecutive exported layers (positions in the layout), sent as the same Celery chord as a
bulk job's micro-batch shards (worker/shards.py; leases, fencing, attempts, resume by chunk and
cancel are the shard's, storage/index/shards.py):

1. **Plan** (:func:`start_layer_sharded`): the job's layout is known once its prompts are tokenized;
   its exported layers are cut into ranges, stored as shards.
2. **Shard** (:func:`run_layer_shard`): the :class:`~worker.export.Exporter` runs every pass of the
   job (prefill, the top-heads pass, the induction probe) for its layers only, each forward pass
   ending after its last layer (the layers after it are never computed), and writes its layers'
   chunks of the one bundle. What the job's root needs from those layers (per-head summary
   metrics, induction scores, chosen heads, attention scaling/window/sinks, the certificate's
   per-layer checks) is small: it is kept as one ``.npz`` per shard next to the bundle
   (``<bundle>.shards/<n>.npz``; :func:`save_part`), written again by a retried attempt.
3. **Finalize** (:func:`finalize_layers`): the parts are put back into one Exporter, which finishes
   as a one-worker run does (the same small arrays, summary group, root attributes, consolidated
   metadata): the bundle equals a one-worker run's, byte for byte apart from timings. The parts are
   deleted afterwards. A job that stopped keeps the finished shards' layers (``partial``).

A job is cut only where each layer can be computed without the ones after it
(:func:`layer_cut_blockers`): no generated tokens (they need the logits, hence every layer), no
prompt alternatives (logits), no KV compression (its fidelity and generation checks span layers).
Others run on one worker as before.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from storage.bundle.writer import BundleWriter
from storage.index import shards as sh
from storage.jobs.spec import JobSpec
from storage.stores.objectstore import ObjectStore
from worker.capture.metrics import HeadSummary
from worker.export import Exporter, ExportHooks
from worker.models import LoadedModel

log = logging.getLogger(__name__)

__all__ = [
    "LayerPart",
    "finalize_layers",
    "layer_cut_blockers",
    "load_part",
    "plan_layer_shards",
    "run_layer_shard",
    "save_part",
]

PARTS_SUFFIX = ".shards"  # <bundle>.shards/<n>.npz: each layer shard's part of the root
_HEAD_SUMMARY_DICTS = ("means", "quantiles", "pooled_means")
_HEAD_SUMMARY_ARRAYS = ("rows", "context_min", "context_max", "pooled_rows")


def layer_cut_blockers(spec: JobSpec) -> list[str]:
    """Why the job cannot be cut by layers (empty: it can), each reason naming the spec field."""
    if spec.bulk:
        return ["a bulk job (source) is cut by micro-batches"]
    blockers = []
    if spec.generation.max_new_tokens:
        blockers.append("generation.max_new_tokens > 0: each generated token needs every layer's output")
    if spec.capture.resolved().prompt_alternatives:
        blockers.append("capture.prompt_alternatives: the alternatives need the logits (every layer)")
    if spec.kv_compression:
        blockers.append("kv_compression: its fidelity and generation checks span every layer")
    return blockers


def plan_layer_shards(num_layers: int, layers_per_shard: int, passes: int) -> list[sh.ShardPlan]:
    """The shards of ``num_layers`` exported layers: ranges of ``layers_per_shard`` positions in the
    layout (``first_batch``, ``batches``); a shard's progress units are its layers × ``passes``
    (the prefill, the top-heads pass, the induction probe), as a one-worker job counts them."""
    plans = []
    for first in range(0, num_layers, layers_per_shard):
        count = min(layers_per_shard, num_layers - first)
        plans.append(
            sh.ShardPlan(
                first_window=0,
                window_first_batch=0,
                first_batch=first,
                batches=count,
                units_total=count * passes,
                tokens_planned=0,
                padded_tokens=0,
            )
        )
    return plans


@dataclass
class LayerPart:
    """What the root needs from one shard's layers (positions ``first .. first + count - 1``):
    ``arrays`` of every per-layer result, all layers long (the shard's rows are the ones it
    computed), the certificate's checks of its layers, and its timings."""

    first: int
    count: int
    arrays: dict[str, np.ndarray]
    certificate: dict[int, dict[str, Any]]
    timings_s: dict[str, float]

    @classmethod
    def of(cls, exporter: Exporter, first: int, count: int) -> LayerPart:
        arrays: dict[str, np.ndarray] = {}
        if exporter.metrics is not None:
            result: HeadSummary = exporter.metrics.result()
            for kind in _HEAD_SUMMARY_DICTS:
                for metric, values in getattr(result, kind).items():
                    arrays[f"summary/{kind}/{metric}"] = values
            for kind in _HEAD_SUMMARY_ARRAYS:
                arrays[f"summary/{kind}"] = getattr(result, kind)
        if exporter.induction is not None:
            arrays["induction"] = exporter.induction
        if exporter.top_head_index is not None:
            arrays["top_head_index"] = exporter.top_head_index
        for name, values in exporter.attention_facts.per_layer().items():
            arrays[f"facts/{name}"] = values
        return cls(first, count, arrays, exporter.certifier.layer_checks(), dict(exporter.timings))

    def to_bytes(self) -> bytes:
        doc = {
            "first": self.first,
            "count": self.count,
            "certificate": {str(k): v for k, v in self.certificate.items()},
            "timings_s": self.timings_s,
        }
        buffer = io.BytesIO()
        members: dict[str, Any] = {"__doc__": np.asarray(json.dumps(doc)), **self.arrays}
        np.savez(buffer, **members)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> LayerPart:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            doc = json.loads(str(npz["__doc__"]))
            arrays = {name: npz[name] for name in npz.files if name != "__doc__"}
        certificate = {int(k): v for k, v in doc["certificate"].items()}
        return cls(doc["first"], doc["count"], arrays, certificate, doc["timings_s"])


def parts_url(bundle_url: str) -> str:
    return bundle_url.rstrip("/") + PARTS_SUFFIX


def save_part(store: ObjectStore, bundle_url: str, shard: int, part: LayerPart) -> None:
    store.write_bytes(parts_url(bundle_url), f"{shard}.npz", part.to_bytes())


def load_part(store: ObjectStore, bundle_url: str, shard: int) -> LayerPart:
    return LayerPart.from_bytes(store.read_bytes(parts_url(bundle_url), f"{shard}.npz"))


def merge_parts(parts: Sequence[LayerPart]) -> LayerPart:
    """One part of every layer the ``parts`` computed (each array's rows taken from its shard)."""
    first = parts[0]
    arrays = {name: values.copy() for name, values in first.arrays.items()}
    certificate: dict[int, dict[str, Any]] = {}
    timings: dict[str, float] = {}
    for part in parts:
        rows = slice(part.first, part.first + part.count)
        for name, values in part.arrays.items():
            arrays[name][rows] = values[rows]
        certificate.update(part.certificate)
        for phase, seconds in part.timings_s.items():
            timings[phase] = timings.get(phase, 0.0) + seconds
    return LayerPart(0, sum(p.count for p in parts), arrays, certificate, timings)


class _StoredSummary:
    """The per-head summary of the merged parts, where an Exporter reads its accumulator's."""

    def __init__(self, result: HeadSummary) -> None:
        self._result = result

    def result(self) -> HeadSummary:
        return self._result


def restore(exporter: Exporter, part: LayerPart) -> None:
    """Put a (merged) part's per-layer results into ``exporter``, as if it had run those layers."""
    arrays = part.arrays
    if exporter.metrics is not None and "summary/rows" in arrays:
        fields: dict[str, Any] = {
            kind: {
                name.rsplit("/", 1)[1]: values
                for name, values in arrays.items()
                if name.startswith(f"summary/{kind}/")
            }
            for kind in _HEAD_SUMMARY_DICTS
        }
        fields |= {kind: arrays[f"summary/{kind}"] for kind in _HEAD_SUMMARY_ARRAYS}
        exporter.metrics = _StoredSummary(HeadSummary(**fields))
    exporter.induction = arrays.get("induction")
    exporter.top_head_index = arrays.get("top_head_index")
    exporter.attention_facts.restore(
        {name.split("/", 1)[1]: values for name, values in arrays.items() if name.startswith("facts/")}
    )
    exporter.certifier.add_layer_checks(part.certificate)
    exporter.timings.update({f"shards_{k}": v for k, v in part.timings_s.items() if k != "load_model"})


def run_layer_shard(
    job_id: str,
    spec: JobSpec,
    lm: LoadedModel,
    shard: sh.ShardRecord,
    hooks: ExportHooks,
    *,
    bundle_url: str,
    store: ObjectStore,
    writer_options: dict[str, Any],
) -> dict[str, Any]:
    """Run every pass of the job for the shard's layers, write their chunks and keep its part."""
    started = time.perf_counter()
    writer = BundleWriter(bundle_url, **writer_options)
    positions = range(shard.first_batch, shard.first_batch + shard.batches)
    exporter = Exporter(spec, lm, writer, hooks, layer_positions=positions)
    hooks.phase("layers", units_total=shard.units_total)
    try:
        exporter.run_passes(job_id)
        writer.wait()  # every chunk stored (raises the first write error) before the part is kept
    finally:
        writer.close()
    save_part(store, bundle_url, shard.shard, LayerPart.of(exporter, shard.first_batch, shard.batches))
    return {"layers": list(exporter.part), "seconds": round(time.perf_counter() - started, 3)}


def finalize_layers(
    job_id: str,
    spec: JobSpec,
    lm: LoadedModel,
    shards: Sequence[sh.ShardRecord],
    hooks: ExportHooks,
    *,
    bundle_url: str,
    store: ObjectStore,
    writer_options: dict[str, Any],
    partial: bool,
) -> dict[str, Any]:
    """Finish the bundle from the shards' parts, as one worker finishes it (``partial``: of the
    shards that succeeded); the parts are deleted once the root is written."""
    started = time.perf_counter()
    exporter = Exporter(spec, lm, BundleWriter(bundle_url, **writer_options), hooks)
    exporter.writer.open(exporter.layout)  # as the planner created it
    parts = [load_part(store, bundle_url, s.shard) for s in shards if s.state == sh.SUCCEEDED]
    if parts:
        restore(exporter, merge_parts(parts))
    summary = exporter.finish(started=started, partial=partial)
    store.delete_tree(parts_url(bundle_url))
    return summary
