"""Every bundle array, declared once: dims, dtype, fill, chunking, when it exists, which capture option
produces it, how the estimate counts it, what it means and the format version that added it.

numpy only (the layout is only a type here). Everything else reads this registry:

- ``storage.bundle.layout.BundleLayout``: which arrays a job creates, their shapes, chunks, dtypes
  and fill values (the worker creates them, the API estimates them);
- ``storage.jobs.estimate``: the stored-bytes rule and the measured cost per element of each array;
- ``worker.capture.session``: the row blocks it buffers for the streamed arrays;
- ``storage.bundle.attention``: the dims of a derived bundle's computed ``attention``;
- ``qkvault.show``: each array's meaning;
- docs/bundle-format.md: its array table (``python scripts/array_table.py --write``,
  :mod:`storage.jobs.arrays_doc`).

Adding an array: one :class:`ArraySpec` in :data:`ARRAYS` (and ``FORMAT_VERSION``), its producer on
the worker, its chunk regions in ``storage/bundle/writer.py`` if it is written in row blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:
    from storage.bundle.layout import BundleLayout

# "row blocks": one chunk per layer, sequence and ``chunk_rows`` rows (and keys), streamed while the
# model runs; "per sequence": one chunk per sequence; "whole": one chunk. The last two are written in
# one piece (the coordinates when the bundle is created, the rest when the job ends).
Chunking = Literal["row blocks", "per sequence", "whole"]
# How the estimate counts stored bytes (storage/jobs/estimate.py, docs/estimates.md):
# "attention": stored rows × visible keys, costed by the model's attention profile;
# "row blocks": every position of every sequence, ⌈length / chunk_rows⌉ row blocks per layer;
# "tokens": one value per token of each sequence (positions past its length are fill);
# "alternatives": the positions that have alternatives (generated ones; prompt ones too with
# ``capture.prompt_alternatives``); "dense": every element.
EstimateKind = Literal["attention", "row blocks", "tokens", "alternatives", "dense"]
DtypeSetting = Literal["attention_dtype", "qkv_dtype"]

# Size of each dimension name in a layout.
DIM_SIZES: dict[str, Callable[[BundleLayout], int]] = {
    "layer": lambda layout: len(layout.layers),
    "batch": lambda layout: layout.batch,
    "head": lambda layout: len(layout.heads),
    "kv_head": lambda layout: len(layout.kv_heads),
    "top_head": lambda layout: layout.top_heads or 0,
    "position": lambda layout: layout.positions,
    "query": lambda layout: layout.attention_rows,
    "key": lambda layout: layout.positions,
    "head_dim": lambda layout: layout.head_dim,
    "v_head_dim": lambda layout: layout.value_head_dim,
    "hidden": lambda layout: layout.hidden_size,
    "rank": lambda layout: layout.alternatives_k,
}
HEAD_DIMS = ("head", "kv_head", "top_head")  # the per-head axis of an array
ROW_DIMS = ("position", "query", "key")  # chunked by ``chunk_rows`` in row-block arrays


@dataclass(frozen=True)
class Rename:
    """Dimension ``dim`` is named ``to`` in layouts where ``when`` holds (``condition`` says when)."""

    dim: str
    to: str
    when: Callable[[BundleLayout], bool]
    condition: str


@dataclass(frozen=True)
class EstimateRule:
    """How :mod:`storage.jobs.estimate` counts an array: ``kind`` (see :data:`EstimateKind`) and
    ``cost``, stored bytes per element with data for each dtype, measured with the "zstd" codec
    (docs/estimates.md; a dtype not listed costs its raw size, 8 bytes per string)."""

    kind: EstimateKind
    cost: Mapping[str, float] = field(default_factory=dict)


def _always(layout: BundleLayout) -> bool:
    return True


@dataclass(frozen=True)
class ArraySpec:
    """One bundle array. ``dims``: as declared (every exported head, q/k's head size); ``renames``
    change a dimension's name in some layouts. ``dtype``: fixed ("str": variable-length strings)
    unless ``dtype_setting`` names the job's ``storage`` setting that picks it. ``present``: whether
    a layout has the array; ``produced_by``: the capture option that asks for it, as users write it.
    ``since``: the format version that added it."""

    name: str
    dims: tuple[str, ...]
    description: str
    present: Callable[[BundleLayout], bool] = _always
    produced_by: str = "always"
    dtype: str = "int32"
    dtype_setting: DtypeSetting | None = None
    fill_value: int | float | str = 0
    chunking: Chunking = "whole"
    estimate: EstimateRule = EstimateRule("dense")
    renames: tuple[Rename, ...] = ()
    since: str = "1.0"
    details: str = ""  # more for docs/bundle-format.md

    @property
    def written(self) -> Literal["row blocks", "whole"]:
        """How the worker writes it: streamed in row blocks, or in one piece."""
        return "row blocks" if self.chunking == "row blocks" else "whole"

    def dims_of(self, layout: BundleLayout) -> tuple[str, ...]:
        names = {r.dim: r.to for r in self.renames if r.when(layout)}
        return tuple(names.get(d, d) for d in self.dims)

    def shape(self, layout: BundleLayout) -> tuple[int, ...]:
        return tuple(DIM_SIZES[d](layout) for d in self.dims_of(layout))

    def chunk_extent(self, dim: str) -> Literal[1, "rows", "whole"]:
        """A chunk's extent along ``dim``: one, ``chunk_rows``, or the whole dimension."""
        if self.chunking == "row blocks":
            return 1 if dim in ("layer", "batch") else "rows" if dim in ROW_DIMS else "whole"
        return 1 if self.chunking == "per sequence" and dim == "batch" else "whole"

    def chunks(self, layout: BundleLayout) -> tuple[int, ...]:
        extents = [self.chunk_extent(d) for d in self.dims_of(layout)]
        return tuple(
            n if e == "whole" else layout.chunk_rows if e == "rows" else 1
            for e, n in zip(extents, self.shape(layout), strict=True)
        )

    def dtype_of(self, layout: BundleLayout) -> str:
        return self.dtype if self.dtype_setting is None else str(getattr(layout, self.dtype_setting))

    def heads(self, layout: BundleLayout) -> int:
        """Size of the per-head axis (exported heads when the array has none)."""
        dims = self.dims_of(layout)
        axis = next((d for d in dims if d in HEAD_DIMS), "head")
        return DIM_SIZES[axis](layout)

    def row_block(self, layout: BundleLayout) -> tuple[int, int | None]:
        """``(heads, columns)`` of one layer's and sequence's row block as the capture hands it to
        the writer, ``[heads, rows, columns]``: heads 1 without a per-head axis, columns 1 after
        the last row axis, None when they are keys (up to the block's last row)."""
        dims, shape = self.dims_of(layout), self.shape(layout)
        heads = self.heads(layout) if any(d in HEAD_DIMS for d in dims) else 1
        if dims[-1] == "key":
            return heads, None
        return heads, 1 if dims[-1] in ROW_DIMS else shape[-1]

    def raw_bytes(self, layout: BundleLayout) -> int:
        """Uncompressed bytes of the whole array (strings counted at 8 bytes each)."""
        dtype = self.dtype_of(layout)
        itemsize = 8 if dtype == "str" else np.dtype(dtype).itemsize
        return int(np.prod(self.shape(layout), dtype=np.int64)) * itemsize


_TOP_HEADS = Rename(
    "head", "top_head", lambda layout: layout.top_heads is not None, 'capture.detail="top_heads"'
)
_LATENT_V = Rename(
    "head_dim",
    "v_head_dim",
    lambda layout: layout.v_head_dim is not None,
    "latent attention (DeepSeek V2/V3, MiniCPM3...: v heads narrower than q/k's; 1.4)",
)
_DERIVED = 'capture.attention="derived"'
_BY_ROW = ("layer", "batch", "head", "position", "head_dim")
_KV_BY_ROW = ("layer", "batch", "kv_head", "position", "head_dim")
_PER_LAYER = ("layer",)
_TOPK = ("batch", "position", "rank")
_NAN = float("nan")


def _micro_batch_index(name: str, meaning: str) -> ArraySpec:
    """A per-sequence index of a bulk job's micro-batch (1.5): int64, -1 where unset."""
    return ArraySpec(
        name,
        ("batch",),
        f"a bulk job's micro-batch: {meaning}",
        present=lambda layout: layout.bulk,
        produced_by="source",
        dtype="int64",
        fill_value=-1,
        since="1.5",
    )


def _qk_present(layout: BundleLayout) -> bool:
    return layout.qkv or layout.derived_attention


def _row_estimate(float32: float, float16: float) -> EstimateRule:
    return EstimateRule("row blocks", {"float32": float32, "float16": float16})


_DECLARED: tuple[ArraySpec, ...] = (
    ArraySpec(
        "tokens",
        ("batch", "position"),
        "prompt ids then generated ids; -1 past `length`",
        fill_value=-1,
        chunking="per sequence",
        estimate=EstimateRule("tokens", {"int32": 2.0}),
    ),
    ArraySpec("length", ("batch",), "tokens in the sequence (prompt + generated)"),
    ArraySpec("prompt_length", ("batch",), "prompt tokens"),
    _micro_batch_index("sequence", "the job-wide index of each of its sequences"),
    _micro_batch_index("source_row", "the row of the source each sequence came from"),
    ArraySpec("layer", ("layer",), "coordinate: the model's real layer index of each exported layer"),
    ArraySpec("head", ("head",), "coordinate: the model's real query-head index"),
    ArraySpec(
        "kv_head",
        ("kv_head",),
        "coordinate: real kv-head index (the kv heads read by the exported query heads)",
    ),
    ArraySpec(
        "attention",
        ("layer", "batch", "head", "query", "key"),
        "softmax probabilities; row `query` sums to 1 over keys `0..query`",
        present=lambda layout: layout.attention,
        produced_by="capture.attention",
        dtype_setting="attention_dtype",
        chunking="row blocks",
        estimate=EstimateRule("attention"),
        renames=(_TOP_HEADS,),
        details="models with learned sinks: to 1 − `attention_sink`",
    ),
    ArraySpec(
        "attention_sink",
        ("layer", "batch", "head", "query"),
        "the probability mass each stored row gave the learned sink",
        present=lambda layout: layout.attention and layout.sinks,
        produced_by="capture.attention, model with learned sinks",
        dtype="float32",
        chunking="row blocks",
        estimate=EstimateRule("row blocks"),
        renames=(_TOP_HEADS,),
        since="1.4",
        details="gpt-oss, GraniteSWA...: `attention.sum(key) + attention_sink == 1`",
    ),
    ArraySpec(
        "query_position",
        ("batch", "query"),
        "the token position of each stored attention row",
        present=lambda layout: layout.attention and layout.query_rows is not None,
        produced_by="capture.attention with capture.query_rows / generation_steps",
        fill_value=-1,
        chunking="per sequence",
        estimate=EstimateRule("dense", {"int32": 1.0}),
        since="1.1",
    ),
    ArraySpec(
        "top_head_index",
        ("layer", "top_head"),
        "real head index of each kept head",
        present=lambda layout: layout.attention and layout.top_heads is not None,
        produced_by='capture.detail="top_heads"',
        estimate=EstimateRule("dense", {"int32": 1.0}),
        since="1.1",
    ),
    ArraySpec(
        "q",
        _BY_ROW,
        "post-RoPE query, as the attention consumed it",
        present=_qk_present,
        produced_by=f"capture.qkv or {_DERIVED}",
        dtype_setting="qkv_dtype",
        chunking="row blocks",
        estimate=_row_estimate(3.72, 1.87),
    ),
    ArraySpec(
        "k",
        _KV_BY_ROW,
        "post-RoPE key",
        present=_qk_present,
        produced_by=f"capture.qkv or {_DERIVED}",
        dtype_setting="qkv_dtype",
        chunking="row blocks",
        estimate=_row_estimate(3.72, 1.87),
    ),
    ArraySpec(
        "v",
        _KV_BY_ROW,
        "value, as the attention consumed it",
        present=lambda layout: layout.qkv,
        produced_by="capture.qkv",
        dtype_setting="qkv_dtype",
        chunking="row blocks",
        estimate=_row_estimate(3.60, 1.83),
        renames=(_LATENT_V,),
    ),
    ArraySpec(
        "attention_scaling",
        _PER_LAYER,
        "the scaling the layer's attention call used (NaN: never called)",
        present=lambda layout: layout.derived_attention,
        produced_by=_DERIVED,
        dtype="float64",
        fill_value=_NAN,
        since="1.2",
    ),
    ArraySpec(
        "attention_window",
        _PER_LAYER,
        "the layer's sliding window in keys; 0 = none (-1: never called)",
        present=lambda layout: layout.derived_attention,
        produced_by=_DERIVED,
        fill_value=-1,
        since="1.2",
    ),
    ArraySpec(
        "attention_chunk",
        _PER_LAYER,
        "the layer's chunk size for chunked attention; 0 = none",
        present=lambda layout: layout.derived_attention,
        produced_by=_DERIVED,
        since="1.4",
        details="Llama 4's `attention_chunk_size` on its `chunked_attention` layers",
    ),
    ArraySpec(
        "attention_sinks",
        ("layer", "head"),
        "each exported head's learned sink logit",
        present=lambda layout: layout.derived_attention and layout.sinks,
        produced_by=f"{_DERIVED}, model with learned sinks",
        dtype="float32",
        fill_value=_NAN,
        since="1.4",
    ),
    ArraySpec(
        "hidden_states",
        ("layer", "batch", "position", "hidden"),
        "residual stream after the layer",
        present=lambda layout: layout.hidden_states,
        produced_by="capture.hidden_states",
        dtype_setting="qkv_dtype",
        chunking="row blocks",
        estimate=_row_estimate(3.71, 1.86),
        since="1.1",
    ),
    ArraySpec(
        "topk_ids",
        _TOPK,
        "top-k next-token alternatives for the token at `position`",
        present=lambda layout: layout.alternatives,
        produced_by="capture.alternatives",
        fill_value=-1,
        chunking="per sequence",
        estimate=EstimateRule("alternatives", {"int32": 1.67}),
        since="1.1",
    ),
    ArraySpec(
        "topk_logprobs",
        _TOPK,
        "their log-probabilities (raw model distribution)",
        present=lambda layout: layout.alternatives,
        produced_by="capture.alternatives",
        dtype="float32",
        fill_value=_NAN,
        chunking="per sequence",
        estimate=EstimateRule("alternatives", {"float32": 3.3}),
        since="1.1",
    ),
    ArraySpec(
        "topk_tokens",
        _TOPK,
        "their decoded strings",
        present=lambda layout: layout.alternatives,
        produced_by="capture.alternatives",
        dtype="str",
        fill_value="",
        chunking="per sequence",
        estimate=EstimateRule("alternatives", {"str": 5.0}),
        since="1.1",
    ),
    ArraySpec(
        "logprob",
        ("batch", "position"),
        "log-probability of the token actually at `position`",
        present=lambda layout: layout.alternatives,
        produced_by="capture.alternatives",
        dtype="float32",
        fill_value=_NAN,
        chunking="per sequence",
        estimate=EstimateRule("alternatives", {"float32": 3.8}),
        since="1.1",
    ),
)
# Every array, in the order a bundle creates them.
ARRAYS: dict[str, ArraySpec] = {spec.name: spec for spec in _DECLARED}
# Arrays streamed row block by row block (the rest are written whole).
ROW_ARRAYS: tuple[str, ...] = tuple(name for name, spec in ARRAYS.items() if spec.written == "row blocks")


def array_spec(name: str) -> ArraySpec:
    """The declaration of array ``name``."""
    try:
        return ARRAYS[name]
    except KeyError:
        raise KeyError(f"unknown bundle array {name!r}; known: {', '.join(ARRAYS)}") from None
