"""Shapes, chunks and dtypes of one job's bundle, computed the same way by the API (size
estimates) and the worker (the arrays it creates), from the arrays' declarations
(:mod:`storage.bundle.arrays`); a job spec's layout on a model is
:func:`storage.jobs.layout.layout_for_job`."""

from __future__ import annotations

from dataclasses import dataclass

from storage.bundle.arrays import ARRAYS, array_spec
from storage.bundle.format import DEFAULT_CHUNK_ROWS, DEFAULT_COMPRESSION


@dataclass(frozen=True)
class BundleLayout:
    """``positions``: allocated sequence axis (longest prompt + max_new_tokens); ``layers``/
    ``heads``/``kv_heads``: the model's real indices exported; ``query_rows``: stored attention
    rows per sequence when rows are selected (else every position); ``top_heads``: attention keeps
    this many heads per layer (dimension ``top_head``) instead of every exported head;
    ``derived_attention``: no T×T array, q and k (v only with ``qkv``) plus the per-layer
    ``attention_scaling`` and ``attention_window`` that reconstruction needs; ``v_head_dim``: v's
    head size where it differs from q/k's (latent attention); ``sinks``: the model has learned
    attention sinks, each stored row's sink mass is kept in ``attention_sink``; ``bulk``: one
    micro-batch of a bulk job (its sequences' job-wide indices and source rows are stored)."""

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
    bulk: bool = False

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
