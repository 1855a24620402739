"""The array registry (storage/bundle/arrays.py): every array a layout creates is declared there, the
shapes, chunks, dtypes and estimates it gives are the ones written down here (taken from the code
before the registry existed), and docs/bundle-format.md's array table is generated from it."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from storage.bundle.arrays import ARRAYS, DIM_SIZES, ROW_ARRAYS, array_spec
from storage.bundle.format import FORMAT_VERSION
from storage.bundle.layout import BundleLayout
from storage.jobs.arrays_doc import BEGIN, END, array_table_of, render_array_table, with_array_table
from storage.jobs.estimate import estimate
from storage.jobs.spec import JobSpec
from storage.models.facts import ModelFacts

REPO = Path(__file__).resolve().parents[2]
NAN = float("nan")
Row = tuple[tuple[str, ...], tuple[int, ...], tuple[int, ...], str, Any]  # dims, shape, chunks, dtype, fill

BASE: dict[str, Any] = {
    "batch": 2,
    "positions": 17,
    "layers": (0, 3),
    "heads": (0, 1, 2, 3),
    "kv_heads": (0, 1),
    "head_dim": 8,
    "chunk_rows": 16,
}
LAYOUTS: dict[str, dict[str, Any]] = {
    "plain": {"attention": True, "qkv": False},
    "bulk_micro_batch": {"attention": True, "qkv": False, "bulk": True},
    "qkv_top_heads_rows": {"attention": True, "qkv": True, "top_heads": 2, "query_rows": 5, "summary": True},
    "sinks": {"attention": True, "qkv": False, "sinks": True},
    "derived": {"attention": False, "qkv": False, "derived_attention": True},
    "derived_latent_sinks": {
        "attention": False,
        "qkv": True,
        "derived_attention": True,
        "v_head_dim": 6,
        "sinks": True,
    },
    "alternatives_hidden": {
        "attention": False,
        "qkv": False,
        "hidden_states": True,
        "hidden_size": 32,
        "alternatives": True,
        "alternatives_k": 3,
        "qkv_dtype": "float16",
        "attention_dtype": "float32",
    },
}
# BundleLayout's arrays, dims, shapes, chunks, dtypes and fill values before the registry
ATT = ("layer", "batch", "head", "query", "key")
Q = ("layer", "batch", "head", "position", "head_dim")
KV = ("layer", "batch", "kv_head", "position", "head_dim")
TOPK = ("batch", "position", "rank")
ALWAYS: dict[str, Row] = {
    "tokens": (("batch", "position"), (2, 17), (1, 17), "int32", -1),
    "length": (("batch",), (2,), (2,), "int32", 0),
    "prompt_length": (("batch",), (2,), (2,), "int32", 0),
    "layer": (("layer",), (2,), (2,), "int32", 0),
    "head": (("head",), (4,), (4,), "int32", 0),
    "kv_head": (("kv_head",), (2,), (2,), "int32", 0),
}
QK: dict[str, Row] = {
    "q": (Q, (2, 2, 4, 17, 8), (1, 1, 4, 16, 8), "float32", 0),
    "k": (KV, (2, 2, 2, 17, 8), (1, 1, 2, 16, 8), "float32", 0),
}
DERIVED: dict[str, Row] = {
    "attention_scaling": (("layer",), (2,), (2,), "float64", NAN),
    "attention_window": (("layer",), (2,), (2,), "int32", -1),
    "attention_chunk": (("layer",), (2,), (2,), "int32", 0),
}
EXPECTED: dict[str, dict[str, Row]] = {
    "plain": {**ALWAYS, "attention": (ATT, (2, 2, 4, 17, 17), (1, 1, 4, 16, 16), "float16", 0)},
    # one micro-batch of a bulk job (1.5): the sequences' job-wide indices and source rows
    "bulk_micro_batch": {
        **{k: v for k, v in ALWAYS.items() if k in ("tokens", "length", "prompt_length")},
        "sequence": (("batch",), (2,), (2,), "int64", -1),
        "source_row": (("batch",), (2,), (2,), "int64", -1),
        **{k: v for k, v in ALWAYS.items() if k in ("layer", "head", "kv_head")},
        "attention": (ATT, (2, 2, 4, 17, 17), (1, 1, 4, 16, 16), "float16", 0),
    },
    "qkv_top_heads_rows": {
        **ALWAYS,
        "attention": (
            ("layer", "batch", "top_head", "query", "key"),
            (2, 2, 2, 5, 17),
            (1, 1, 2, 16, 16),
            "float16",
            0,
        ),
        "query_position": (("batch", "query"), (2, 5), (1, 5), "int32", -1),
        "top_head_index": (("layer", "top_head"), (2, 2), (2, 2), "int32", 0),
        **QK,
        "v": (KV, (2, 2, 2, 17, 8), (1, 1, 2, 16, 8), "float32", 0),
    },
    "sinks": {
        **ALWAYS,
        "attention": (ATT, (2, 2, 4, 17, 17), (1, 1, 4, 16, 16), "float16", 0),
        "attention_sink": (("layer", "batch", "head", "query"), (2, 2, 4, 17), (1, 1, 4, 16), "float32", 0),
    },
    "derived": {**ALWAYS, **QK, **DERIVED},
    "derived_latent_sinks": {
        **ALWAYS,
        **QK,
        "v": (
            ("layer", "batch", "kv_head", "position", "v_head_dim"),
            (2, 2, 2, 17, 6),
            (1, 1, 2, 16, 6),
            "float32",
            0,
        ),
        **DERIVED,
        "attention_sinks": (("layer", "head"), (2, 4), (2, 4), "float32", NAN),
    },
    "alternatives_hidden": {
        **ALWAYS,
        "hidden_states": (
            ("layer", "batch", "position", "hidden"),
            (2, 2, 17, 32),
            (1, 1, 16, 32),
            "float16",
            0,
        ),
        "topk_ids": (TOPK, (2, 17, 3), (1, 17, 3), "int32", -1),
        "topk_logprobs": (TOPK, (2, 17, 3), (1, 17, 3), "float32", NAN),
        "topk_tokens": (TOPK, (2, 17, 3), (1, 17, 3), "str", ""),
        "logprob": (("batch", "position"), (2, 17), (1, 17), "float32", NAN),
    },
}

TOY = ModelFacts("llama", 2, 4, 2, 8, hidden_size=32)
TRAINED = ModelFacts("llama", 4, 8, 2, 64, hidden_size=512, sliding_window=300)
LATENT = ModelFacts("deepseek_v3", 3, 6, 6, 24, hidden_size=256, v_head_dim=16, sinks=True)
# (model, capture, storage, prompt lengths); max_new_tokens 7
CASES: dict[str, tuple[ModelFacts, dict[str, Any], dict[str, Any], list[int]]] = {
    "toy_qkv_lz4": (TOY, {"attention": True, "qkv": True}, {"chunk_rows": 16}, [12, 3]),
    "trained_full_zstd": (
        TRAINED,
        {"detail": "full", "alternatives_k": 3},
        {"compression": "zstd", "chunk_rows": 128},
        [300, 40],
    ),
    "trained_top_heads_rows": (
        TRAINED,
        {
            "detail": "top_heads",
            "top_heads": {"n": 2},
            "generation_steps": [0, 3],
            "prompt_alternatives": True,
            "alternatives": True,
        },
        {"chunk_rows": 64, "qkv_dtype": "float16"},
        [100],
    ),
    "latent_sinks_derived": (
        LATENT,
        {"attention": "derived", "qkv": True, "hidden_states": True},
        {"chunk_rows": 32, "qkv_dtype": "float16"},
        [50, 9],
    ),
    "latent_sinks_attention": (
        LATENT,
        {"attention": True},
        {"compression": "zstd", "chunk_rows": 32, "attention_dtype": "float32"},
        [50, 9],
    ),
}
# per array (chunks written, raw bytes, expected stored bytes), and the job's expected stored bytes,
# as storage/jobs/estimate.py computed them before the registry
ESTIMATES: dict[str, tuple[dict[str, tuple[int, int, int]], int]] = {
    "toy_qkv_lz4": (
        {
            "tokens": (2, 152, 91),
            "length": (1, 8, 24),
            "prompt_length": (1, 8, 24),
            "layer": (1, 8, 24),
            "head": (1, 16, 32),
            "kv_head": (1, 8, 24),
            "attention": (8, 11552, 4308),
            "q": (6, 9728, 7299),
            "k": (6, 4864, 3698),
            "v": (6, 4864, 3582),
        },
        47310,
    ),
    "trained_full_zstd": (
        {
            "tokens": (2, 2456, 741),
            "length": (1, 8, 24),
            "prompt_length": (1, 8, 24),
            "layer": (1, 16, 32),
            "head": (1, 32, 48),
            "kv_head": (1, 8, 24),
            "attention": (28, 12063872, 2712357),
            "q": (16, 5029888, 2697874),
            "k": (16, 1257472, 674661),
            "v": (16, 1257472, 652911),
            "hidden_states": (16, 5029888, 2690624),
            "topk_ids": (2, 7368, 106),
            "topk_logprobs": (2, 7368, 175),
            "topk_tokens": (2, 14736, 246),
            "logprob": (2, 2456, 87),
            "summary": (60, 15360, 54840),
        },
        9574928,
    ),
    "trained_top_heads_rows": (
        {
            "tokens": (1, 428, 230),
            "length": (1, 4, 20),
            "prompt_length": (1, 4, 20),
            "layer": (1, 16, 32),
            "head": (1, 32, 48),
            "kv_head": (1, 8, 24),
            "attention": (8, 3424, 4599),
            "query_position": (1, 8, 18),
            "top_head_index": (1, 32, 24),
            "topk_ids": (1, 2140, 910),
            "topk_logprobs": (1, 2140, 1782),
            "topk_tokens": (1, 4280, 2691),
            "logprob": (1, 428, 423),
            "summary": (60, 7680, 51000),
        },
        144241,
    ),
    "latent_sinks_derived": (
        {
            "tokens": (2, 456, 179),
            "length": (1, 8, 24),
            "prompt_length": (1, 8, 24),
            "layer": (1, 12, 28),
            "head": (1, 24, 40),
            "kv_head": (1, 24, 40),
            "q": (9, 98496, 63334),
            "k": (9, 98496, 63334),
            "v": (9, 65664, 41371),
            "attention_scaling": (1, 24, 40),
            "attention_window": (1, 12, 28),
            "attention_chunk": (1, 12, 28),
            "attention_sinks": (1, 72, 88),
            "hidden_states": (9, 175104, 111882),
        },
        318652,
    ),
    "latent_sinks_attention": (
        {
            "tokens": (2, 456, 179),
            "length": (1, 8, 24),
            "prompt_length": (1, 8, 24),
            "layer": (1, 12, 28),
            "head": (1, 24, 40),
            "kv_head": (1, 24, 40),
            "attention": (12, 467856, 119423),
            "attention_sink": (9, 8208, 5401),
        },
        149151,
    ),
}


def _same(a: Any, b: Any) -> bool:
    return (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)) or (
        a == b and type(a) is type(b)
    )


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_arrays_are_the_declared_ones_with_todays_shapes(name: str) -> None:
    layout = BundleLayout(**BASE, **LAYOUTS[name])
    expected = EXPECTED[name]
    assert layout.arrays() == list(expected)
    for array, (dims, shape, chunks, dtype, fill) in expected.items():
        assert array in ARRAYS
        assert layout.dims(array) == dims, array
        assert layout.shape(array) == shape, array
        assert layout.chunks(array) == chunks, array
        assert layout.dtype(array) == dtype, array
        assert _same(layout.fill_value(array), fill), array
        itemsize = (
            8 if dtype == "str" else {"int32": 4, "int64": 8, "float16": 2, "float32": 4, "float64": 8}[dtype]
        )
        assert layout.raw_bytes(array) == math.prod(shape) * itemsize


def test_every_declared_array_is_created_by_some_layout() -> None:
    created = {a for name in LAYOUTS for a in BundleLayout(**BASE, **LAYOUTS[name]).arrays()}
    assert created == set(ARRAYS)


@pytest.mark.parametrize("case", list(CASES))
def test_estimates_are_todays(case: str) -> None:
    facts, capture, storage, lengths = CASES[case]
    spec = JobSpec.model_validate(
        {
            "model": {"id": "x/y"},
            "prompts": ["p"] * len(lengths),
            "generation": {"max_new_tokens": 7},
            "capture": capture,
            "storage": storage,
        }
    )
    result = estimate(spec, facts, lengths, True)
    arrays, total = ESTIMATES[case]
    got = {a.name: (a.chunks_written, a.raw_bytes, a.expected_stored_bytes) for a in result.arrays}
    assert got == arrays
    assert result.expected_stored_bytes == total


def test_declarations_are_consistent() -> None:
    major, minor = (int(p) for p in FORMAT_VERSION.split("."))
    for name, spec in ARRAYS.items():
        assert spec.name == name and spec.description and "\n" not in spec.description
        assert spec.produced_by and len(set(spec.dims)) == len(spec.dims), name
        assert set(spec.dims) | {r.to for r in spec.renames} <= set(DIM_SIZES), name
        assert {r.dim for r in spec.renames} <= set(spec.dims), name
        since = tuple(int(p) for p in spec.since.split("."))
        assert since[0] == major and since[1] <= minor, name
        streamed = spec.written == "row blocks"
        assert streamed == (spec.estimate.kind in ("attention", "row blocks")), name
        assert streamed == (name in ROW_ARRAYS)
    assert ROW_ARRAYS == ("attention", "attention_sink", "q", "k", "v", "hidden_states")
    with pytest.raises(KeyError, match="unknown bundle array"):
        array_spec("nope")


def test_row_blocks_as_the_capture_buffers_them() -> None:
    """(heads, columns) of the row blocks worker/capture/session.py buffers."""
    layout = BundleLayout(**BASE, **LAYOUTS["derived_latent_sinks"], hidden_states=True, hidden_size=32)
    assert array_spec("q").row_block(layout) == (4, 8)
    assert array_spec("k").row_block(layout) == (2, 8)
    assert array_spec("v").row_block(layout) == (2, 6)
    assert array_spec("hidden_states").row_block(layout) == (1, 32)
    top = BundleLayout(**BASE, attention=True, qkv=False, top_heads=3, sinks=True)
    assert array_spec("attention").row_block(top) == (3, None)  # up to the block's last key
    assert array_spec("attention_sink").row_block(top) == (3, 1)


def test_docs_array_table_is_generated_from_the_registry() -> None:
    """Fails when a declaration changed: run ``python scripts/array_table.py --write``."""
    doc = (REPO / "docs" / "bundle-format.md").read_text(encoding="utf-8")
    assert array_table_of(doc) == render_array_table(), (
        "docs/bundle-format.md's array table is stale: run .venv/bin/python scripts/array_table.py --write"
    )
    assert all(f"| `{name}` |" in doc for name in ARRAYS)


def test_only_the_array_table_is_rewritten() -> None:
    doc = f"intro\n{BEGIN}\nold\n{END}\noutro\n"
    out = with_array_table(doc, "| new |")
    assert out == f"intro\n{BEGIN}\n| new |\n{END}\noutro\n" and array_table_of(out) == "| new |"
    with pytest.raises(ValueError, match="markers"):
        with_array_table("no markers", "| new |")
