"""Derived attention on the worker: record what reconstruction needs besides q and k.

Each exported layer's attention ``scaling`` and ``sliding_window`` are taken from the attention
calls themselves (what the model really used: GPT-2 and others differ from ``head_dim**-0.5``,
models mix sliding and full layers), and written as ``attention_scaling`` / ``attention_window``
``(layer)`` arrays at the end of the job, with a ``derived_attention`` root attribute.
No probability is computed here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from storage.bundle.derived import describe
from storage.bundle.layout import BundleLayout
from storage.models.facts import ModelFacts
from worker.capture.hook import AttentionCall, CaptureSink


class AttentionFacts:
    """Wraps the capture sink of the main passes (:meth:`wrap`); remembers per exported layer the
    scaling and sliding window of its attention calls."""

    def __init__(self, layout: BundleLayout, chunks: Sequence[int] | None = None) -> None:
        """``chunks``: per exported layer, the chunk size of chunked attention (0: none), which the
        attention calls do not carry (:func:`layer_chunks` reads it from the config)."""
        self.layout = layout
        self.chunks = np.asarray(chunks if chunks is not None else [0] * len(layout.layers), dtype=np.int32)
        self.layer_pos = {layer: i for i, layer in enumerate(layout.layers)}
        self.scaling = np.full(len(layout.layers), np.nan, dtype=np.float64)
        self.window = np.full(len(layout.layers), -1, dtype=np.int32)  # -1: no call seen; 0: no window
        self.sinks = np.full((len(layout.layers), len(layout.heads)), np.nan, dtype=np.float32)

    def chunk_of(self) -> dict[int, int]:
        """Chunk size (0: none) of each exported layer, by the model's layer index."""
        return {layer: int(c) for layer, c in zip(self.layout.layers, self.chunks, strict=True)}

    def wrap(self, sink: CaptureSink) -> CaptureSink:
        return _Recording(self, sink) if self.layout.derived_attention else sink

    def record(self, call: AttentionCall) -> None:
        lp = self.layer_pos.get(call.layer_idx)
        if lp is None:
            return
        window = int(call.sliding_window or 0)
        if self.window[lp] >= 0 and (
            self.window[lp] != window or not math.isclose(self.scaling[lp], call.scaling, rel_tol=1e-12)
        ):
            raise RuntimeError(
                f"layer {call.layer_idx}: attention scaling/window changed between calls "
                f"({self.scaling[lp]}, {self.window[lp]} then {call.scaling}, {window})"
            )
        self.scaling[lp], self.window[lp] = call.scaling, window
        if call.sinks is not None and self.layout.sinks:
            self.sinks[lp] = call.sinks.float().cpu().numpy()[list(self.layout.heads)]

    def per_layer(self) -> dict[str, np.ndarray]:
        """What the attention calls told of each exported layer (a layer shard's part of the root)."""
        return {"scaling": self.scaling.copy(), "window": self.window.copy(), "sinks": self.sinks.copy()}

    def restore(self, values: dict[str, np.ndarray]) -> None:
        """Take :meth:`per_layer`'s values (merged over layer shards) as this run's."""
        self.scaling, self.window, self.sinks = (values[k].copy() for k in ("scaling", "window", "sinks"))

    def root_attrs(self, facts: ModelFacts) -> dict[str, Any]:
        """The ``derived_attention`` root attribute (empty unless the job derives attention)."""
        if not self.layout.derived_attention:
            return {}
        return {
            "derived_attention": {
                **describe(),
                "num_heads": facts.num_heads,
                "num_kv_heads": facts.num_kv_heads,
                "softcap": facts.attn_logit_softcapping,
                "q_k_dtype": self.layout.qkv_dtype,
                "arrays": ["q", "k", "attention_scaling", "attention_window", "attention_chunk", "length"]
                + (["attention_sinks"] if self.layout.sinks else []),
            }
        }

    def arrays(self) -> dict[str, np.ndarray]:
        if not self.layout.derived_attention:
            return {}
        arrays: dict[str, np.ndarray] = {
            "attention_scaling": self.scaling.copy(),
            "attention_window": self.window.copy(),
            "attention_chunk": self.chunks.copy(),
        }
        if self.layout.sinks:
            arrays["attention_sinks"] = self.sinks.copy()
        return arrays


class _Recording:
    def __init__(self, facts: AttentionFacts, sink: CaptureSink) -> None:
        self.facts, self.sink = facts, sink

    def on_attention(self, call: AttentionCall) -> None:
        self.facts.record(call)
        self.sink.on_attention(call)


def layer_chunks(config: Any, layers: Sequence[int]) -> list[int]:
    """Chunk size of each of ``layers`` whose type (``config.layer_types``) is chunked attention
    (``attention_chunk_size``, Llama 4), else 0."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    size = getattr(text, "attention_chunk_size", None)
    kinds = getattr(text, "layer_types", None) or []
    if not size:
        return [0] * len(layers)
    return [
        int(size) if layer < len(kinds) and kinds[layer] == "chunked_attention" else 0 for layer in layers
    ]
