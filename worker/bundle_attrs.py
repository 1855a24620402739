"""The bundle's root attributes known before the first chunk: model, spec, capture, software."""

from __future__ import annotations

import functools
from typing import Any

import torch

from storage.bundle.layout import BundleLayout
from storage.jobs.capture import ResolvedCapture
from storage.jobs.spec import JobSpec
from worker.derived import AttentionFacts
from worker.models import LoadedModel


def root_attrs(
    job_id: str,
    spec: JobSpec,
    lm: LoadedModel,
    capture: ResolvedCapture,
    layout: BundleLayout,
    attention_facts: AttentionFacts,
) -> dict[str, Any]:
    """Attributes written when the bundle is created (the rest are written by ``finalize``)."""
    import transformers
    import zarr

    facts = lm.facts
    return {
        "job_id": job_id,
        "model": {
            "id": spec.model.id,
            "revision": spec.model.revision,
            "source": lm.source.kind,
            "architecture": lm.info.get("architecture"),
            **facts.to_dict(),
            "dtype": str(lm.dtype).replace("torch.", ""),
            "source_dtype": lm.source_dtype,
            "device": lm.device.type,
            "placement": lm.placement,
            "config": lm.info.get("config", {}),
        },
        "spec": spec.bundle_dump(),
        **attention_facts.root_attrs(facts),
        "capture": {
            **capture.model_dump(mode="json"),
            "exported_heads": list(layout.heads),
            "exported_kv_heads": list(layout.kv_heads),
            "exported_layers": list(layout.layers),
            "attention_dtype": layout.attention_dtype,
            "qkv_dtype": layout.qkv_dtype,
            "chunk_rows": layout.chunk_rows,
            "compression": layout.compression,
            "probabilities": "softmax(scaling * q k^T [softcap * tanh(./softcap)] + mask [, sink logit]) "
            "in float32 per block of query rows; with sinks each row sums to 1 - attention_sink",
        },
        "software": {
            "qkvault": qkvault_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "zarr": zarr.__version__,
        },
    }


@functools.cache
def qkvault_version() -> str:
    """The installed package's version, read once a process (reading the distribution's metadata
    costs about a millisecond, and every micro-batch of a bulk job writes it)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("qkvault")
    except PackageNotFoundError:
        return "unknown"


def provenance(lm: LoadedModel) -> dict[str, Any]:
    """What produced the numbers: software versions, the wrapped attention implementation, weights
    (dtype or quantisation) and the devices the model sat on (:func:`worker.models.placement_facts`)."""
    import transformers

    weights = lm.placement.get("weights") or {}
    return {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "attention_implementation": lm.info.get("attention_implementation"),
        # the stored weights: a float dtype, or "nf4"/"fp4"/"int8" when quantised (then see "weights")
        "weights_dtype": weights.get("dtype", str(lm.dtype).replace("torch.", "")),
        "source_dtype": lm.source_dtype,
        "device": lm.device.type,
        "devices": lm.placement.get("devices", [str(lm.device)]),
        "weights": lm.placement.get("weights"),
    }
