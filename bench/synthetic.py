"""Synthetic bundles written through the real writer (``BundleWriter`` + ``BundleLayout``), no model:
random causal attention rows normalised per row (or q/k for a derived-attention bundle), for the
tiles benchmark (:mod:`bench.tiles`) and the tests of slices and tiles.

Sequence ``b`` holds ``lengths[b]`` tokens from position 0 (padding past its length, as the worker
writes it). ``write_bundle`` returns what it wrote, as numpy, so a caller can compare."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from storage.bundle.format import BULK_BATCHES, BULK_FORMAT_VERSION, BULK_SEQUENCES
from storage.bundle.layout import BundleLayout
from storage.bundle.writer import BundleWriter

__all__ = ["SyntheticBundle", "causal_rows", "write_bulk_bundle", "write_bundle"]


@dataclass(frozen=True)
class SyntheticBundle:
    """What to write: sequence ``lengths``, exported ``layers``/``heads`` (real indices),
    ``derived`` (q and k instead of attention), ``summary`` (a ``summary`` group of labels)."""

    lengths: Sequence[int]
    layers: tuple[int, ...] = (0,)
    heads: tuple[int, ...] = (0,)
    num_heads: int | None = None  # the model's query heads (default: max(heads) + 1)
    num_kv_heads: int = 1
    head_dim: int = 8
    chunk_rows: int = 512
    derived: bool = False
    summary: bool = False
    seed: int = 0
    extra_attrs: dict[str, Any] = field(default_factory=dict)


def causal_rows(rng: np.random.Generator, heads: int, row0: int, rows: int) -> np.ndarray:
    """Rows ``row0 .. row0 + rows - 1`` of random causal attention ``[heads, rows, row0 + rows]``
    float32: row ``i`` is positive on keys ``0..i``, zero after, and sums to 1."""
    data = rng.random((heads, rows, row0 + rows), dtype=np.float32)
    keys = np.arange(row0 + rows)[None, :]
    data *= keys <= (row0 + np.arange(rows))[:, None]
    data /= data.sum(axis=-1, keepdims=True)
    return data


def _layout(spec: SyntheticBundle, *, bulk: bool = False) -> BundleLayout:
    num_heads = spec.num_heads or max(spec.heads) + 1
    group = num_heads // spec.num_kv_heads
    kv_heads = tuple(sorted({h // group for h in spec.heads}))
    return BundleLayout(
        batch=len(spec.lengths),
        positions=max(spec.lengths),
        layers=spec.layers,
        heads=spec.heads,
        kv_heads=kv_heads,
        head_dim=spec.head_dim,
        attention=not spec.derived,
        qkv=False,
        derived_attention=spec.derived,
        chunk_rows=spec.chunk_rows,
        bulk=bulk,
    )


def write_bundle(
    url: str,
    spec: SyntheticBundle,
    *,
    storage_options: dict[str, Any] | None = None,
    sequences: Sequence[int] | None = None,
    key_prefix: str = "",
) -> dict[str, np.ndarray]:
    """A format-1.x bundle at ``url``; returns its arrays (``attention`` as float16 as stored, or
    ``q``/``k``), ``length`` and ``tokens``. ``sequences``: job-wide indices (a bulk micro-batch)."""
    rng = np.random.default_rng(spec.seed)
    layout = _layout(spec, bulk=sequences is not None)
    num_heads = spec.num_heads or max(spec.heads) + 1
    writer = BundleWriter(url, storage_options=storage_options, key_prefix=key_prefix)
    lengths = np.asarray(spec.lengths, dtype=np.int32)
    token_strings = [[f"t{b}.{i}" for i in range(n)] for b, n in enumerate(spec.lengths)]
    capture = {"derived_attention": spec.derived, "attention": not spec.derived}
    attrs: dict[str, Any] = {
        "job_id": url.rstrip("/").rsplit("/", 1)[-1],
        "token_strings": token_strings,
        "capture": capture,
        "model": {"num_heads": num_heads, "num_kv_heads": spec.num_kv_heads},
        **spec.extra_attrs,
    }
    if spec.derived:
        attrs["derived_attention"] = {"num_heads": num_heads, "num_kv_heads": spec.num_kv_heads}
    writer.create(layout, attrs)
    out: dict[str, np.ndarray] = {}
    for name in layout.arrays():
        if name in ("attention", "q", "k"):
            out[name] = np.zeros(layout.shape(name), dtype=layout.dtype(name))
    rows = spec.chunk_rows
    for lp in range(len(spec.layers)):
        for b, length in enumerate(spec.lengths):
            for block, row0 in enumerate(range(0, length, rows)):
                n = min(rows, length - row0)
                if spec.derived:
                    for name in ("q", "k"):
                        heads = layout.heads_of(name)
                        data = rng.standard_normal((heads, n, spec.head_dim), dtype=np.float32)
                        out[name][lp, b, :, row0 : row0 + n] = data
                        writer.write_row_block(name, lp, b, block, data)
                else:
                    data16 = causal_rows(rng, len(spec.heads), row0, n).astype(np.float16)
                    out["attention"][lp, b, :, row0 : row0 + n, : row0 + n] = data16
                    writer.write_row_block("attention", lp, b, block, data16)
    tokens = np.full(layout.shape("tokens"), -1, dtype=np.int32)
    for b, n in enumerate(spec.lengths):
        tokens[b, :n] = np.arange(n) % 1000
    writer.write_array("tokens", tokens)
    writer.write_array("length", lengths)
    writer.write_array("prompt_length", lengths)
    if sequences is not None:
        writer.write_array("sequence", np.asarray(sequences, dtype=np.int64))
        writer.write_array("source_row", np.asarray(sequences, dtype=np.int64))
    if spec.derived:
        head_dim_scale = 1.0 / np.sqrt(spec.head_dim)
        writer.write_array("attention_scaling", np.full(len(spec.layers), head_dim_scale))
        writer.write_array("attention_window", np.zeros(len(spec.layers), dtype=np.int32))
        writer.write_array("attention_chunk", np.zeros(len(spec.layers), dtype=np.int32))
    if spec.summary:
        shape = (len(spec.layers), len(spec.lengths), len(spec.heads))
        labels = np.asarray(["local", "sink", "diffuse"], dtype=object)[np.arange(np.prod(shape)) % 3]
        summary: dict[str, tuple[tuple[str, ...], np.ndarray]] = {
            "entropy": (("layer", "batch", "head"), rng.random(shape).astype(np.float32)),
            "label": (("layer", "batch", "head"), labels.reshape(shape)),
        }
        writer.write_group("summary", summary, per_layer_batch=True)
        out["summary/entropy"] = summary["entropy"][1]  # (dims, data): the data
    writer.finalize({})
    out["length"], out["tokens"] = lengths, tokens
    return out


def write_bulk_bundle(
    url: str,
    spec: SyntheticBundle,
    batches: Sequence[Sequence[int]],
    *,
    storage_options: dict[str, Any] | None = None,
) -> list[dict[str, np.ndarray]]:
    """A bulk job's bundle (format 2.0): micro-batch ``k`` holds the job-wide sequences
    ``batches[k]`` (lengths from ``spec.lengths``, indexed by sequence). Returns each micro-batch's
    arrays (``write_bundle``)."""
    root = BundleWriter(url, storage_options=storage_options)
    root.create_root(
        {"job_id": "bulk", "kind": "bulk"}, format_version=BULK_FORMAT_VERSION, children=[BULK_BATCHES]
    )
    written = []
    table: dict[str, list[int]] = {k: [] for k in ("sequence", "source_row", "batch", "slot", "length")}
    for k, members in enumerate(batches):
        group = f"{BULK_BATCHES}/{k:06d}"
        cell = SyntheticBundle(**{**spec.__dict__, "lengths": [spec.lengths[s] for s in members], "seed": k})
        written.append(
            write_bundle(
                f"{url.rstrip('/')}/{group}",
                cell,
                storage_options=storage_options,
                sequences=members,
                key_prefix=f"{group}/",
            )
        )
        for slot, s in enumerate(members):
            for name, value in zip(table, (s, s, k, slot, spec.lengths[s]), strict=True):
                table[name].append(value)
    order = np.argsort(table["sequence"], kind="stable")
    arrays: dict[str, tuple[tuple[str, ...], np.ndarray]] = {
        name: (("sequence",), np.asarray(v, dtype=np.int64)[order]) for name, v in table.items()
    }
    arrays["prompt_length"] = arrays["length"]
    root.write_group(BULK_SEQUENCES, arrays)
    root.finalize({"bulk": {"sequences": len(order), "micro_batches": len(batches)}})
    return written
