"""Shapes, chunks and dtypes of one job's bundle, computed the same way by the API (size
estimates) and the worker (the arrays it creates), from the arrays' declarations
(:mod:`storage.bundle.arrays`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from storage.bundle.arrays import ARRAYS, array_spec
from storage.bundle.format import DEFAULT_CHUNK_ROWS, DEFAULT_COMPRESSION
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
        return array_spec(array).heads(self)

    def dims(self, array: str) -> tuple[str, ...]:
        return array_spec(array).dims_of(self)

    def shape(self, array: str) -> tuple[int, ...]:
        return array_spec(array).shape(self)

    def chunks(self, array: str) -> tuple[int, ...]:
        return array_spec(array).chunks(self)

    def dtype(self, array: str) -> str:
        return array_spec(array).dtype_of(self)

    def fill_value(self, array: str) -> int | float | str:
        return array_spec(array).fill_value

    def arrays(self) -> list[str]:
        """The arrays this layout creates, in creation order (:data:`storage.bundle.arrays.ARRAYS`)."""
        return [name for name, spec in ARRAYS.items() if spec.present(self)]

    def raw_bytes(self, array: str) -> int:
        """Uncompressed bytes of the whole array (strings counted at 8 bytes each)."""
        return array_spec(array).raw_bytes(self)


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
