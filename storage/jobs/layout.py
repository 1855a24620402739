"""The bundle layout of a job: what a job spec asks for, on a model's facts, as the arrays' sizes
(:class:`storage.bundle.layout.BundleLayout`). The API's estimate and the worker use the same
function."""

from __future__ import annotations

from collections.abc import Sequence

from storage.bundle.format import DEFAULT_COMPRESSION
from storage.bundle.layout import BundleLayout
from storage.jobs.capture import ResolvedCapture
from storage.jobs.spec import JobSpec
from storage.models.facts import ModelFacts


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
    bulk: bool = False,
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
        bulk=bulk,
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
        bulk=spec.bulk,
    )
