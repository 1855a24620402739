"""What a job will cost before it runs: array shapes, raw bytes and expected stored bytes.

numpy only (and ``tokenizers``, required when a ``tokenizer.json`` is readable): the API calls this at
submission. Shapes come from :func:`storage.jobs.layout.layout_for_job`, the function the worker
uses to create the arrays. Stored bytes count the chunks the worker actually writes and a
per-element cost of the Blosc zstd-1 byte-shuffle encoding measured on real bundles; each array's
rule and costs are part of its declaration (``ArraySpec.estimate``, :mod:`storage.bundle.arrays`).
The model and the measurements are in ``docs/estimates.md``.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

from storage.bundle.arrays import ArraySpec, array_spec
from storage.bundle.derived import materialised_bytes
from storage.bundle.format import COMPRESSIONS
from storage.bundle.layout import BundleLayout
from storage.errors import ServerMisconfigured
from storage.jobs.capture import ResolvedCapture
from storage.jobs.layout import kept_positions, layout_for_job
from storage.jobs.spec import JobSpec
from storage.models.facts import ModelFacts

CHAT_TEMPLATE_TOKENS = 32  # per prompt: system block + role markers (SmolLM2's template adds 30)
BYTES_PER_TOKEN = 4  # UTF-8 bytes per token when no tokenizer is readable (English prose ~4-5, code ~3)
SPECIAL_TOKENS = 2  # BOS/EOS added to an approximated prompt
SUMMARY_ARRAYS = 60  # arrays of the summary group, about one float32 value per (layer, sequence, head)
CHUNK_HEADER = 16  # Blosc header of every stored chunk (none without a compressor)
ARRAY_METADATA = 870 + 1500  # an array's zarr.json + its copy in the consolidated root metadata
SUMMARY_ARRAY_METADATA = 770  # a summary array's zarr.json (and again its consolidated copy)
ROOT_METADATA = 4096  # root attributes except the per-token and per-prompt parts
TOKEN_METADATA = 12  # token_strings: one JSON string per token
TOY_HIDDEN_SIZE = 128  # below this a model is a toy (randomly initialised test model)

# The per-element costs of the array declarations (``ArraySpec.estimate``, storage/bundle/arrays.py)
# were measured with the "zstd" codec (Blosc zstd-1 + byte shuffle). Stored bytes
# with "lz4" (Blosc lz4-1 + bitshuffle) relative to them, measured by encoding the same chunks with
# both (``python -m bench.codecs``, docs/estimates.md), for attention beyond the local window: trained
# 1.03, near-uniform 0.99 (2,048-token bundles); float16 q/k/v and hidden states 1.07 (SmolLM2 q
# 1.05, k 1.07, v 1.10), float32 1.04 (SmolLM2 fp32 1.01-1.02, bf16-sourced 1.07).
LZ4_FACTOR = {"trained": 1.03, "near-uniform": 0.99, "float16": 1.07, "float32": 1.04}
# ... for the ``window`` keys nearest the diagonal: short rows compress worse with lz4 (fitted on
# the accuracy cases of tests/e2e/test_estimate_accuracy.py, docs/estimates.md)
LZ4_LOCAL_FACTOR = {"trained": 1.25, "near-uniform": 1.5}
ZERO_COST = 0.002  # stored bytes per element of a written chunk that holds no data (zeros or fill)
# lz4 stores a run of zeros at ~1/225 of its bytes (zstd far smaller): an all-zero chunk measured
LZ4_ZERO_COST_PER_BYTE = 0.0045


@dataclass(frozen=True)
class AttentionProfile:
    """Stored bytes per attention probability: ``local`` within ``window`` keys of the diagonal,
    ``far`` elsewhere, interpolated in log2(visible keys) (clamped outside the knots)."""

    name: str
    window: int
    local: dict[str, float]
    far_knots: tuple[float, ...]
    far: dict[str, tuple[float, ...]]

    def far_cost(self, dtype: str, visible_keys: np.ndarray) -> np.ndarray:
        return np.interp(np.log2(np.maximum(visible_keys, 1)), self.far_knots, self.far[dtype])


TRAINED = AttentionProfile(  # SmolLM2-135M-Instruct, 5..3.8k keys
    "trained",
    128,
    {"float16": 1.90, "float32": 3.70},
    (7.0, 9.0, 11.0, 12.0),
    {"float16": (1.52, 1.36, 1.06, 0.69), "float32": (3.67, 3.67, 3.67, 3.67)},
)
NEAR_UNIFORM = AttentionProfile(  # tiny random-weight llama/qwen2/gpt2: attention ~ 1/keys
    "near-uniform",
    16,
    {"float16": 1.42, "float32": 3.51},
    (7.0, 9.0),
    {"float16": (1.08, 1.07), "float32": (2.97, 2.64)},
)


def attention_profile(facts: ModelFacts) -> AttentionProfile:
    return NEAR_UNIFORM if 0 < facts.hidden_size < TOY_HIDDEN_SIZE else TRAINED


@dataclass(frozen=True)
class ArrayEstimate:
    name: str
    dims: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: str
    chunk_shape: tuple[int, ...]
    chunks_written: int
    raw_bytes: int
    expected_stored_bytes: int


@dataclass(frozen=True)
class TokenEstimate:
    prompt: list[int]  # per prompt
    prompt_total: int
    max_new_tokens: int  # per prompt
    max_total: int  # prompt tokens + max_new_tokens, summed over prompts
    positions: int  # allocated sequence axis: longest prompt + max_new_tokens
    exact: bool


@dataclass(frozen=True)
class BulkFigures:
    """A bulk job as a whole, estimated from a sample of its source (storage/sources/sample.py):
    ``sequences`` it exports (None: unknown), whether that count is exact, the rows sampled, how
    the source was sampled, its total tokens (prompt + new), micro-batches and padding (the
    sample's plan scaled to the job)."""

    sequences: int | None
    sequences_exact: bool
    sampled_rows: int
    sampled: str
    total_tokens: int
    micro_batches: int
    padding_fraction: float


@dataclass(frozen=True)
class JobEstimate:
    arrays: list[ArrayEstimate]
    raw_bytes: int
    expected_stored_bytes: int
    metadata_bytes: int
    tokens: TokenEstimate
    attention_profile: str
    upper_bound: bool  # sequences may stop early at EOS: fewer rows than estimated
    approximate: bool  # token counts are approximated
    assumptions: list[str] = field(default_factory=list)
    bulk: BulkFigures | None = None  # a bulk job's whole-job figures (storage/jobs/bulkestimate.py)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- tokens --------------------------------------------------------------------------------------
@lru_cache(maxsize=16)
def _tokenizer(path: str, mtime_ns: int) -> Any:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(path)


def count_prompt_tokens(spec: JobSpec, tokenizer_json: str | None) -> tuple[list[int], bool]:
    """Tokens per prompt of a one-batch job and whether the count is exact (:func:`count_tokens`)."""
    return count_tokens(spec, list(spec.inline_prompts), tokenizer_json)


def count_tokens(spec: JobSpec, prompts: list[str], tokenizer_json: str | None) -> tuple[list[int], bool]:
    """Tokens of each of ``prompts`` as ``spec`` tokenizes them, and whether the count is exact.
    With ``chat_template`` the template is not rendered here: the raw prompt plus
    :data:`CHAT_TEMPLATE_TOKENS` (approximate). Without a ``tokenizer.json`` the count is
    approximated from UTF-8 bytes; with one but without the ``tokenizers`` library this raises
    :class:`ServerMisconfigured` (503): an approximation would admit prompts too long for the model."""
    if not prompts:
        return [], True
    if tokenizer_json is not None:
        try:
            import tokenizers  # noqa: F401  (installed by the api extra)
        except ImportError as exc:
            raise ServerMisconfigured(
                f"cannot count the prompt tokens of model {spec.model.id!r}: its tokenizer.json is "
                f"readable here ({tokenizer_json}) but the Python package 'tokenizers' is not installed "
                "on this API server; install it (pip install 'qkvault[api]' or pip install tokenizers)",
                detail={"missing_package": "tokenizers"},
            ) from exc
        try:
            tok = _tokenizer(tokenizer_json, os.stat(tokenizer_json).st_mtime_ns)
            special = spec.add_special_tokens and not spec.chat_template
            counts = [len(e.ids) for e in tok.encode_batch(prompts, add_special_tokens=special)]
        except Exception:  # an unreadable or unusual tokenizer.json: fall back to bytes
            counts = []
        if counts:
            if spec.chat_template:
                return [n + CHAT_TEMPLATE_TOKENS for n in counts], False
            return [max(1, n) for n in counts], True
    extra = CHAT_TEMPLATE_TOKENS if spec.chat_template else (SPECIAL_TOKENS if spec.add_special_tokens else 0)
    return [math.ceil(len(p.encode("utf-8")) / BYTES_PER_TOKEN) + extra for p in prompts], False


# -- arrays --------------------------------------------------------------------------------------
def _attention(
    layout: BundleLayout,
    spec: ArraySpec,
    capture: ResolvedCapture,
    prompts: list[int],
    new: int,
    facts: ModelFacts,
) -> tuple[int, float]:
    """(chunks written, stored bytes) of the attention probabilities: per sequence the row blocks of
    its stored rows; per row block the key chunks up to the diagonal block of its last row."""
    rows_per_chunk, heads = layout.chunk_rows, spec.heads(layout)
    profile, dtype = attention_profile(facts), spec.dtype_of(layout)
    key_chunks = -(-layout.positions // rows_per_chunk)
    chunks, cost = 0, 0.0
    for prompt in prompts:
        if layout.query_rows is None:
            rows = np.arange(prompt + new)
        else:
            rows = np.asarray(kept_positions(capture, prompt, prompt + new), dtype=np.int64)
        if rows.size == 0:
            continue
        blocks = -(-rows.size // rows_per_chunk)
        last = rows[np.minimum(np.arange(1, blocks + 1) * rows_per_chunk, rows.size) - 1]
        seq_chunks = int(np.minimum(last // rows_per_chunk + 1, key_chunks).sum())
        visible = rows + 1 if not facts.sliding_window else np.minimum(rows + 1, facts.sliding_window)
        local = np.minimum(visible, profile.window)
        far = visible - local
        if _raw(layout):  # every visible key at the dtype's size (_cost's rule without a compressor)
            data = float(visible.sum()) * _cost(layout, spec)
        else:
            lz4 = layout.compression == "lz4"
            local_factor = LZ4_LOCAL_FACTOR[profile.name] if lz4 else 1.0
            far_factor = LZ4_FACTOR[profile.name] if lz4 else 1.0
            data = (
                float(local.sum()) * profile.local[dtype] * local_factor
                + float((far * profile.far_cost(dtype, visible)).sum()) * far_factor
            )
        empty = seq_chunks * rows_per_chunk * rows_per_chunk - int(visible.sum())
        chunks += seq_chunks
        cost += heads * (data + empty * _zero_cost(layout, spec.name)) + seq_chunks * _header(layout)
    layers = len(layout.layers)
    return chunks * layers, cost * layers


def _raw(layout: BundleLayout) -> bool:
    """Whether numeric chunks are stored without a compressor (``storage.compression: "none"``)."""
    return COMPRESSIONS[layout.compression] is None


def _header(layout: BundleLayout) -> int:
    """Stored bytes of a chunk besides its data: Blosc's header, none for raw bytes."""
    return 0 if _raw(layout) else CHUNK_HEADER


def _zero_cost(layout: BundleLayout, name: str) -> float:
    """Stored bytes per element of a written chunk's part without data."""
    dtype = layout.dtype(name)
    if dtype != "str" and _raw(layout):
        return float(np.dtype(dtype).itemsize)
    if layout.compression != "lz4" or dtype == "str":
        return ZERO_COST
    return np.dtype(dtype).itemsize * LZ4_ZERO_COST_PER_BYTE


def _cost(layout: BundleLayout, spec: ArraySpec) -> float:
    """Stored bytes per element with data: the declared zstd cost, times the lz4 factor for float
    arrays streamed by row block; the dtype's size without a compressor."""
    dtype = spec.dtype_of(layout)
    if dtype != "str" and _raw(layout):
        return float(np.dtype(dtype).itemsize)
    cost = spec.estimate.cost.get(dtype, 8.0 if dtype == "str" else float(np.dtype(dtype).itemsize))
    if layout.compression == "lz4" and spec.written == "row blocks":
        cost = min(cost * LZ4_FACTOR.get(dtype, 1.0), float(np.dtype(dtype).itemsize) + 0.01)
    return cost


def _rows(layout: BundleLayout, spec: ArraySpec, lengths: list[int]) -> tuple[int, float]:
    """Row-block arrays (q/k/v, hidden states): per layer and sequence the row blocks up to its length."""
    rows_per_chunk, name = layout.chunk_rows, spec.name
    per_row = int(np.prod(layout.chunks(name))) // rows_per_chunk
    blocks = sum(-(-n // rows_per_chunk) for n in lengths)
    data = sum(lengths) * per_row
    empty = blocks * rows_per_chunk * per_row - data
    cost = data * _cost(layout, spec) + empty * _zero_cost(layout, name) + blocks * _header(layout)
    return blocks * len(layout.layers), cost * len(layout.layers)


def _data_elements(
    layout: BundleLayout, spec: ArraySpec, capture: ResolvedCapture, prompts: list[int], new: int
) -> int:
    """Elements with data of a "tokens", "alternatives" or "dense" array (the rest are fill)."""
    shape = layout.shape(spec.name)
    if spec.estimate.kind == "dense":
        return int(np.prod(shape))
    if spec.estimate.kind == "alternatives" and not capture.prompt_alternatives:
        positions = new * len(prompts)
    else:
        positions = sum(prompts) + new * len(prompts)
    return positions * int(np.prod(shape[2:]))  # values per position: k alternatives, or one


def _chunked(
    layout: BundleLayout, spec: ArraySpec, capture: ResolvedCapture, prompts: list[int], new: int
) -> tuple[int, float]:
    """Every chunk of the array is written (one per sequence, or one): the elements with data at
    their cost, the rest as fill, one Blosc header per chunk."""
    name = spec.name
    grid = [-(-s // c) for s, c in zip(layout.shape(name), layout.chunks(name), strict=True)]
    chunks = int(np.prod(grid)) if all(grid) else 0
    data = _data_elements(layout, spec, capture, prompts, new)
    empty_cost = (int(np.prod(layout.shape(name))) - data) * _zero_cost(layout, name)
    return chunks, data * _cost(layout, spec) + empty_cost + chunks * _header(layout)


def _array(
    name: str, layout: BundleLayout, capture: ResolvedCapture, prompts: list[int], new: int, facts: ModelFacts
) -> ArrayEstimate:
    spec = array_spec(name)
    if spec.estimate.kind == "attention":
        chunks, cost = _attention(layout, spec, capture, prompts, new, facts)
    elif spec.estimate.kind == "row blocks":
        chunks, cost = _rows(layout, spec, [p + new for p in prompts])
    else:
        chunks, cost = _chunked(layout, spec, capture, prompts, new)
    return ArrayEstimate(
        name=name,
        dims=tuple(layout.dims(name)),
        shape=tuple(int(s) for s in layout.shape(name)),
        dtype=layout.dtype(name),
        chunk_shape=tuple(int(c) for c in layout.chunks(name)),
        chunks_written=int(chunks),
        raw_bytes=int(layout.raw_bytes(name)),
        expected_stored_bytes=math.ceil(cost),
    )


def _summary(layout: BundleLayout) -> ArrayEstimate:
    """The ``summary`` group as one entry: ~60 small arrays, mostly ``(layer, batch, head)``."""
    shape = (SUMMARY_ARRAYS, len(layout.layers), layout.batch, len(layout.heads))
    raw = int(np.prod(shape)) * 4
    compressed = raw if _raw(layout) else raw // 2  # float32 metrics: ~2x with Blosc
    stored = compressed + SUMMARY_ARRAYS * (_header(layout) + SUMMARY_ARRAY_METADATA)
    dims = ("array", "layer", "batch", "head")
    return ArrayEstimate("summary", dims, shape, "float32", shape[1:], SUMMARY_ARRAYS, raw, stored)


def _kv_group(spec: JobSpec, index: int, layout: BundleLayout, lengths: list[int]) -> ArrayEstimate:
    """One ``kv/<method>_<bits>`` group: theoretical bits of the codes (the stored bytes measured on
    SmolLM2 came within 7 % of it, docs/kv-compression.md) plus the group-wide arrays (TurboQuant's
    d×d matrices), both from the method's registry entry."""
    from storage.kvquant.registry import kv_method

    method = spec.kv_compression[index]
    definition = kv_method(method.method)
    kv_heads, dim = len(layout.kv_heads), layout.head_dim
    cells = len(layout.layers) * kv_heads
    bits = definition.job_bits(method, dim, lengths)
    stored = math.ceil(bits / 8 * cells) + definition.shared_bytes(method, dim)
    raw = 2 * 2 * dim * sum(lengths) * cells  # the fp16 K and V it stands for
    shape = (len(layout.layers), layout.batch, kv_heads, layout.positions, dim)
    return ArrayEstimate(
        f"kv/{method.name}",
        ("layer", "batch", "kv_head", "position", "head_dim"),
        shape,
        "uint8",
        (1, 1, kv_heads, layout.positions, dim),
        len(layout.layers) * layout.batch,
        raw,
        stored,
    )


def estimate(
    spec: JobSpec,
    facts: ModelFacts,
    prompt_lengths: list[int],
    exact_tokens: bool,
    prompt_bytes: int | None = None,
) -> JobEstimate:
    """The bundle of ``spec`` on a model with ``facts`` for prompts of ``prompt_lengths`` tokens
    (``prompt_bytes``: their UTF-8 bytes; default: the spec's inline prompts')."""
    capture, new = spec.capture.resolved(), spec.generation.max_new_tokens
    layout = layout_for_job(spec, facts, prompt_lengths)
    arrays = [_array(name, layout, capture, prompt_lengths, new, facts) for name in layout.arrays()]
    if layout.summary and not any(a.name.startswith("summary") for a in arrays):
        arrays.append(_summary(layout))
    lengths = [p + new for p in prompt_lengths]
    arrays += [_kv_group(spec, i, layout, lengths) for i in range(len(spec.kv_compression))]
    total_tokens = sum(prompt_lengths) + new * len(prompt_lengths)
    if prompt_bytes is None:
        prompt_bytes = sum(len(p.encode("utf-8")) for p in spec.inline_prompts)
    metadata = (
        ROOT_METADATA
        + ARRAY_METADATA * len(layout.arrays())
        + SUMMARY_ARRAY_METADATA * SUMMARY_ARRAYS * layout.summary  # consolidated copies
        + 2 * prompt_bytes  # spec.prompts and texts.prompts
        + (TOKEN_METADATA + BYTES_PER_TOKEN) * new * len(prompt_lengths)  # token strings + generated texts
        + TOKEN_METADATA * sum(prompt_lengths)
    )
    profile = attention_profile(facts)
    upper = spec.generation.stop_at_eos and new > 0
    assumptions = [
        "every sequence runs to max_new_tokens: "
        + ("an upper bound, EOS may stop a sequence earlier" if upper else "stop_at_eos is false")
    ]
    if layout.attention:
        toy = " (toy-size model, randomly initialised weights)" if profile is NEAR_UNIFORM else ""
        assumptions.append(f"attention compresses like a {profile.name} model's{toy}")
    if layout.derived_attention:
        full = materialised_bytes(len(layout.layers), len(layout.heads), lengths)
        assumptions.append(
            "attention derived: q and k stored, no T×T array (the causal attention, fp16, would be "
            f"{full:,} bytes raw); blocks are computed when read"
        )
    if not exact_tokens:
        assumptions.append(
            f"prompt token counts approximated ({BYTES_PER_TOKEN} UTF-8 bytes per token without a readable "
            f"tokenizer; {CHAT_TEMPLATE_TOKENS} tokens per chat-template turn)"
        )
    if facts.sliding_window:
        assumptions.append(f"sliding window of {facts.sliding_window} keys: older keys stored as zeros")
    if layout.summary:
        assumptions.append(f"summary group: ~{SUMMARY_ARRAYS} small float32 arrays (layer, sequence, head)")
    return JobEstimate(
        arrays=arrays,
        raw_bytes=sum(a.raw_bytes for a in arrays),
        expected_stored_bytes=sum(a.expected_stored_bytes for a in arrays) + metadata,
        metadata_bytes=metadata,
        tokens=TokenEstimate(
            prompt=list(prompt_lengths),
            prompt_total=sum(prompt_lengths),
            max_new_tokens=new,
            max_total=total_tokens,
            positions=layout.positions,
            exact=exact_tokens,
        ),
        attention_profile=profile.name,
        upper_bound=upper,
        approximate=not exact_tokens,
        assumptions=assumptions,
    )
