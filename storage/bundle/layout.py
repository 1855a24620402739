"""Shapes, chunks and dtypes of one job's bundle, computed the same way by the API (size
estimates) and the worker (the arrays it creates)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from storage.bundle.format import (
    DEFAULT_CHUNK_ROWS,
    DEFAULT_COMPRESSION,
    DIMS,
    TOP_HEAD_ATTENTION_DIMS,
    TOP_HEAD_SINK_DIMS,
    V_HEAD_DIMS,
)
from storage.capturespec import ResolvedCapture

if TYPE_CHECKING:
    from storage.jobspec import JobSpec
    from storage.modelinfo import ModelFacts


@dataclass(frozen=True)
class BundleLayout:
    """``positions``: allocated sequence axis (longest prompt + max_new_tokens); ``layers``/
    ``heads``/``kv_heads``: the model's real indices exported; ``query_rows``: stored attention
    rows per sequence when rows are selected (else every position); ``top_heads``: attention keeps
    this many heads per layer (dimension ``top_head``) instead of every exported head;
    ``derived_attention``: no T×T array, q and k (v only with ``qkv``) plus the per-layer
    ``attention_scaling`` and ``attention_window`` that reconstruction needs; ``v_head_dim``: v's
    head size where it differs from q/k's (latent attention); ``sinks``: the model has learned
    attention sinks, each stored row's sink mass is kept in ``attention_sink``."""

    batch: int
    positions: int
    layers: tuple[int, ...]
    heads: tuple[int, ...]
    kv_heads: tuple[int, ...]
    head_dim: int
    attention: bool
    qkv: bool
    attention_dtype: str = "float16"
    qkv_dtype: str = "float32"
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    compression: str = DEFAULT_COMPRESSION
    hidden_states: bool = False
    hidden_size: int = 0
    alternatives: bool = False
    alternatives_k: int = 0
    summary: bool = False
    query_rows: int | None = None
    top_heads: int | None = None
    derived_attention: bool = False
    v_head_dim: int | None = None
    sinks: bool = False

    @property
    def value_head_dim(self) -> int:
        return self.v_head_dim or self.head_dim

    @property
    def attention_rows(self) -> int:
        return self.positions if self.query_rows is None else self.query_rows

    def heads_of(self, array: str) -> int:
        if array in ("k", "v"):
            return len(self.kv_heads)
        if array in ("attention", "attention_sink") and self.top_heads is not None:
            return self.top_heads
        return len(self.heads)

    def dims(self, array: str) -> tuple[str, ...]:
        if array == "attention" and self.top_heads is not None:
            return TOP_HEAD_ATTENTION_DIMS
        if array == "attention_sink" and self.top_heads is not None:
            return TOP_HEAD_SINK_DIMS
        if array == "v" and self.v_head_dim is not None:
            return V_HEAD_DIMS
        return DIMS[array]

    def shape(self, array: str) -> tuple[int, ...]:
        layers, batch, rows = len(self.layers), self.batch, self.positions
        shapes: dict[str, tuple[int, ...]] = {
            "attention": (layers, batch, self.heads_of("attention"), self.attention_rows, rows),
            "attention_sink": (layers, batch, self.heads_of("attention"), self.attention_rows),
            "query_position": (batch, self.attention_rows),
            "top_head_index": (layers, self.top_heads or 0),
            "hidden_states": (layers, batch, rows, self.hidden_size),
            "tokens": (batch, rows),
            "logprob": (batch, rows),
            "length": (batch,),
            "prompt_length": (batch,),
            "layer": (layers,),
            "head": (len(self.heads),),
            "kv_head": (len(self.kv_heads),),
            "attention_scaling": (layers,),
            "attention_window": (layers,),
            "attention_chunk": (layers,),
            "attention_sinks": (layers, len(self.heads)),
        }
        if array in ("q", "k", "v"):
            width = self.value_head_dim if array == "v" else self.head_dim
            return (layers, batch, self.heads_of(array), rows, width)
        if array.startswith("topk_"):
            return (batch, rows, self.alternatives_k)
        return shapes[array]

    def chunks(self, array: str) -> tuple[int, ...]:
        rows = self.chunk_rows
        if array == "attention":
            return (1, 1, self.heads_of(array), rows, rows)
        if array in ("q", "k", "v"):
            return (1, 1, self.heads_of(array), rows, self.shape(array)[-1])
        if array == "attention_sink":
            return (1, 1, self.heads_of(array), rows)
        if array == "hidden_states":
            return (1, 1, rows, self.hidden_size)
        if array in ("tokens", "logprob", "query_position") or array.startswith("topk_"):
            return (1, *self.shape(array)[1:])
        return self.shape(array)

    def dtype(self, array: str) -> str:
        if array == "attention":
            return self.attention_dtype
        if array in ("q", "k", "v", "hidden_states"):
            return self.qkv_dtype
        if array in ("topk_logprobs", "logprob", "attention_sink", "attention_sinks"):
            return "float32"
        if array == "attention_scaling":
            return "float64"
        if array == "topk_tokens":
            return "str"
        return "int32"

    def fill_value(self, array: str) -> int | float | str:
        if array in ("tokens", "query_position", "topk_ids", "attention_window"):
            return -1
        if array in ("topk_logprobs", "logprob", "attention_scaling", "attention_sinks"):
            return float("nan")
        if array == "topk_tokens":
            return ""
        return 0

    def arrays(self) -> list[str]:
        names = ["tokens", "length", "prompt_length", "layer", "head", "kv_head"]
        if self.attention:
            names.append("attention")
            if self.sinks:
                names.append("attention_sink")
            if self.query_rows is not None:
                names.append("query_position")
            if self.top_heads is not None:
                names.append("top_head_index")
        if self.qkv:
            names += ["q", "k", "v"]
        elif self.derived_attention:
            names += ["q", "k"]
        if self.derived_attention:
            names += ["attention_scaling", "attention_window", "attention_chunk"]
            if self.sinks:
                names.append("attention_sinks")
        if self.hidden_states:
            names.append("hidden_states")
        if self.alternatives:
            names += ["topk_ids", "topk_logprobs", "topk_tokens", "logprob"]
        return names

    def raw_bytes(self, array: str) -> int:
        """Uncompressed bytes of the whole array (strings counted at 8 bytes each)."""
        itemsize = 8 if self.dtype(array) == "str" else np.dtype(self.dtype(array)).itemsize
        return int(np.prod(self.shape(array), dtype=np.int64)) * itemsize


def kept_positions(capture: ResolvedCapture, prompt_length: int, length: int) -> list[int]:
    """Positions of one sequence whose attention rows are stored (every one unless selected)."""
    return [p for p in range(length) if capture.keeps_row(p, prompt_length)]


def plan_layout(
    capture: ResolvedCapture,
    *,
    prompt_lengths: Sequence[int],
    max_new_tokens: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    hidden_size: int,
    attention_dtype: str,
    qkv_dtype: str,
    chunk_rows: int,
    compression: str = DEFAULT_COMPRESSION,
    attention_layers: Sequence[int] | None = None,
    v_head_dim: int | None = None,
    sinks: bool = False,
) -> BundleLayout:
    """The layout of a job: the same function serves the API's estimate and the worker."""
    heads = tuple(capture.heads or range(num_heads))
    group = num_heads // num_kv_heads
    positions = max(prompt_lengths) + max_new_tokens
    query_rows = None
    if capture.selects_rows:
        query_rows = max(1, max(len(kept_positions(capture, p, p + max_new_tokens)) for p in prompt_lengths))
    return BundleLayout(
        batch=len(prompt_lengths),
        positions=positions,
        layers=tuple(
            capture.layers or (attention_layers if attention_layers is not None else range(num_layers))
        ),
        heads=heads,
        kv_heads=tuple(sorted({h // group for h in heads})),
        head_dim=head_dim,
        attention=capture.attention,
        qkv=capture.qkv,
        attention_dtype=attention_dtype,
        qkv_dtype=qkv_dtype,
        chunk_rows=chunk_rows,
        compression=compression,
        hidden_states=capture.hidden_states,
        hidden_size=hidden_size,
        alternatives=capture.alternatives,
        alternatives_k=capture.alternatives_k,
        summary=capture.summary,
        query_rows=query_rows,
        top_heads=capture.top_heads.n if capture.top_heads is not None else None,
        derived_attention=capture.derived_attention,
        v_head_dim=v_head_dim,
        sinks=sinks,
    )


def layout_for_job(spec: JobSpec, facts: ModelFacts, prompt_lengths: Sequence[int]) -> BundleLayout:
    """:func:`plan_layout` for a job spec on a model (the API's estimate and the worker use this)."""
    return plan_layout(
        spec.capture.resolved(),
        prompt_lengths=prompt_lengths,
        max_new_tokens=spec.generation.max_new_tokens,
        num_layers=facts.num_layers,
        num_heads=facts.num_heads,
        num_kv_heads=facts.num_kv_heads,
        head_dim=facts.head_dim,
        hidden_size=facts.hidden_size,
        attention_dtype=spec.storage.attention_dtype,
        qkv_dtype=spec.storage.qkv_dtype,
        chunk_rows=spec.storage.chunk_rows,
        compression=spec.storage.compression,
        attention_layers=facts.attention_layers,
        v_head_dim=facts.v_head_dim,
        sinks=facts.sinks,
    )
