"""A readable text summary of a bundle (``qkvault show``). Needs only numpy, xarray and zarr.

Reads little: array metadata, the small per-sequence arrays (``length``, ``prompt_length``) and,
for the attention summary, one row of one head of one layer per sequence.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qkvault.job import human_bytes
from storage.bundle.arrays import ARRAYS
from storage.bundle.tokencoords import TOKEN_COORDINATES

if TYPE_CHECKING:
    import xarray as xr

KNOWN_FORMAT_MAJOR = 1
MAX_SEQUENCES_SHOWN = 8
TEXT_CHARS_SHOWN = 160


def _quote(text: Any, limit: int = TEXT_CHARS_SHOWN) -> str:
    text = str(text)
    if len(text) > limit:
        return repr(text[:limit]) + f"... (+{len(text) - limit} chars)"
    return repr(text)


def stored_sizes(ds: xr.Dataset) -> dict[str, int] | None:
    """Bytes on disk per top-level array, when ``ds`` was opened from a local zip or directory
    (``ds.encoding["source"]``, which xarray sets); ``None`` when that cannot be known."""
    source = ds.encoding.get("source")
    if not source or "://" in str(source):
        return None
    path = Path(str(source))
    sizes: dict[str, int] = {}
    try:
        if path.is_file() and zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                for info in zf.infolist():
                    top, sep, _ = info.filename.partition("/")
                    if sep:
                        sizes[top] = sizes.get(top, 0) + info.compress_size
        elif path.is_dir():
            for child in path.iterdir():
                if child.is_dir():
                    sizes[child.name] = sum(
                        os.path.getsize(os.path.join(root, name))
                        for root, _, files in os.walk(child)
                        for name in files
                    )
        else:
            return None
    except OSError:
        return None
    return sizes


def _model_line(model: Mapping[str, Any]) -> str:
    parts = [str(model.get("id") or "?")]
    arch = model.get("architecture") or model.get("model_type")
    if arch:
        parts.append(str(arch))
    if model.get("num_layers") is not None:
        parts.append(f"{model['num_layers']} layers")
    if model.get("num_heads") is not None:
        kv = f" / {model['num_kv_heads']} kv heads" if model.get("num_kv_heads") is not None else ""
        parts.append(f"{model['num_heads']} heads{kv}")
    if model.get("head_dim") is not None:
        parts.append(f"head_dim {model['head_dim']}")
    dtype = model.get("dtype") or model.get("compute_dtype")
    if dtype:
        src = model.get("source_dtype")
        parts.append(f"dtype {dtype}" + (f" (source {src})" if src and src != dtype else ""))
    return ", ".join(parts)


def _arrays_section(ds: xr.Dataset) -> list[str]:
    sizes = stored_sizes(ds)
    header = ("array", "dims", "shape", "dtype", "logical") + (("stored",) if sizes is not None else ())
    rows: list[tuple[str, ...]] = [header]
    total_logical = 0
    for name in ds.variables:
        if name in TOKEN_COORDINATES.values():
            continue  # labels made from the token_strings attribute on opening, not stored arrays
        var = ds.variables[name]
        logical = int(var.nbytes)
        total_logical += logical
        dims = "(" + ", ".join(map(str, var.dims)) + ")"
        shape = str(tuple(int(n) for n in var.shape))
        row: tuple[str, ...] = (str(name), dims, shape, str(var.dtype), human_bytes(logical))
        if sizes is not None:
            stored = sizes.get(str(name))
            ratio = f" ({logical / stored:.1f}x)" if stored and logical > 4096 else ""
            row += ((human_bytes(stored) + ratio) if stored is not None else "-",)
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  " + "  ".join(f"{c:<{w}}" for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    total = f"  total: {human_bytes(total_logical)} logical"
    if sizes is not None:
        total += f", {human_bytes(sum(sizes.values()))} stored (all files, metadata included)"
    return [*lines, total]


def _meanings_section(ds: xr.Dataset) -> list[str]:
    """What each array of ``ds`` holds, from its declaration (docs/bundle-format.md's table)."""
    specs = [ARRAYS[str(name)] for name in ds.variables if str(name) in ARRAYS]
    if not specs:
        return []
    width = max(len(spec.name) for spec in specs)
    return ["meaning:", *(f"  {spec.name:<{width}}  {spec.description}" for spec in specs)]


def _ints(ds: xr.Dataset, name: str) -> list[int] | None:
    if name not in ds.variables:
        return None
    return [int(v) for v in ds[name].values.reshape(-1)]


def _token(token_strings: Any, batch: int, position: int) -> str:
    try:
        return repr(str(token_strings[batch][position]))
    except (IndexError, KeyError, TypeError):
        return "?"


def _sequences_section(ds: xr.Dataset) -> list[str]:
    attrs = ds.attrs
    texts: Mapping[str, Any] = attrs["texts"] if isinstance(attrs.get("texts"), Mapping) else {}
    spec: Mapping[str, Any] = attrs["spec"] if isinstance(attrs.get("spec"), Mapping) else {}
    prompts: Sequence[Any] = texts.get("prompts") or spec.get("prompts") or []
    generated: Sequence[Any] = texts.get("generated") or []
    lengths = _ints(ds, "length")
    prompt_lengths = _ints(ds, "prompt_length")
    n_batch = int(ds.sizes.get("batch", 0)) or max(len(prompts), len(generated))
    if not n_batch:
        return []
    lines = [f"sequences ({n_batch}):"]
    for b in range(min(n_batch, MAX_SEQUENCES_SHOWN)):
        counts = ""
        if lengths is not None and prompt_lengths is not None and b < len(lengths):
            counts = f": {prompt_lengths[b]} prompt + {lengths[b] - prompt_lengths[b]} generated tokens"
        lines.append(f"  [{b}]{counts}")
        if b < len(prompts):
            lines.append(f"      prompt:    {_quote(prompts[b])}")
        if b < len(generated):
            lines.append(f"      generated: {_quote(generated[b])}")
    if n_batch > MAX_SEQUENCES_SHOWN:
        lines.append(f"  ... {n_batch - MAX_SEQUENCES_SHOWN} more")
    return lines


def _pick(coord: list[int] | None, wanted: int | None, size: int, what: str) -> tuple[int | None, str | None]:
    """Position along a dimension of the model index ``wanted`` (default: the middle one)."""
    values = coord if coord is not None else list(range(size))
    if not values:
        return None, f"no {what}s exported"
    if wanted is None:
        return len(values) // 2, None
    if wanted not in values:
        shown = ", ".join(map(str, values[:40])) + (" ..." if len(values) > 40 else "")
        return None, f"{what} {wanted} was not exported (exported {what}s: {shown})"
    return values.index(wanted), None


def _attention_section(ds: xr.Dataset, layer: int | None, head: int, top: int) -> list[str]:
    import numpy as np

    if "attention" not in ds.variables:
        return ["attention: no `attention` array in this bundle (not captured); summary skipped"]
    att = ds["attention"]
    if set(att.dims) != set(ARRAYS["attention"].dims):
        return [f"attention: unexpected dims {att.dims}; summary skipped"]
    li, note = _pick(_ints(ds, "layer"), layer, att.sizes["layer"], "layer")
    if li is None:
        return [f"attention: {note}"]
    hi, note = _pick(_ints(ds, "head"), head, att.sizes["head"], "head")
    if hi is None:
        return [f"attention: {note}"]
    layer_id = (_ints(ds, "layer") or list(range(att.sizes["layer"])))[li]
    head_id = (_ints(ds, "head") or list(range(att.sizes["head"])))[hi]
    lengths = _ints(ds, "length")
    rows_attr = ds.attrs.get("attention_rows")
    token_strings = ds.attrs.get("token_strings")
    n_query = att.sizes["query"]
    lines = [f"attention of the last captured token, layer {layer_id}, head {head_id} (top {top} keys):"]
    for b in range(min(att.sizes["batch"], MAX_SEQUENCES_SHOWN)):
        if isinstance(rows_attr, Sequence) and b < len(rows_attr):
            query = int(rows_attr[b]) - 1
        elif lengths is not None and b < len(lengths):
            query = lengths[b] - 1
        else:
            query = n_query - 1
        query = min(query, n_query - 1)
        if query < 0:
            lines.append(f"  [{b}] no attention rows captured")
            continue
        row = np.asarray(att.isel(layer=li, batch=b, head=hi, query=query).values, dtype=np.float64)
        row = np.nan_to_num(row, nan=0.0)
        total = float(row.sum())
        token = _token(token_strings, b, query)
        lines.append(f"  [{b}] query position {query} {token}, row sums to {total:.3f}")
        if total <= 0:
            lines.append("      (row is empty: not written yet, or a partial bundle)")
            continue
        row = row[: query + 1]  # causal: keys after the query are 0 by construction
        order = np.argsort(-row, kind="stable")[: max(top, 0)]
        for k in order:
            weight = float(row[k])
            bar = "#" * round(weight * 20)
            lines.append(f"      key {int(k):>5} {weight:7.4f} {bar:<20} {_token(token_strings, b, int(k))}")
    return lines


def describe_bundle(ds: xr.Dataset, *, layer: int | None = None, head: int = 0, top: int = 5) -> str:
    """Summary of an opened bundle: format, model, arrays (dims, shape, dtype, logical and — when
    ``ds`` was opened from a local zip or directory — stored size; then what each known array
    holds, from :data:`storage.bundle.arrays.ARRAYS`), each sequence's prompt and
    generated text, and the ``top`` keys the last captured token attends to in ``head`` of
    ``layer`` (model indices; ``layer`` defaults to the middle exported layer)."""
    attrs = ds.attrs
    version = attrs.get("format_version")
    lines = []
    if attrs.get("qkvault_format") == "qkvault.bundle" or version:
        status = ("complete" if attrs.get("complete") else "incomplete") if "complete" in attrs else None
        extras = [s for s in (status, "partial" if attrs.get("partial") else None) if s]
        job = f", job {attrs['job_id']}" if attrs.get("job_id") else ""
        state = f" ({', '.join(extras)})" if extras else ""
        lines.append(f"qkvault bundle, format {version or '?'}{job}{state}")
        try:
            major = int(str(version).split(".")[0])
        except ValueError:
            major = None
        if major is not None and major > KNOWN_FORMAT_MAJOR:
            lines.append(f"  warning: format {version} is newer than this reader ({KNOWN_FORMAT_MAJOR}.x)")
    else:
        lines.append("zarr dataset without qkvault bundle attributes (format_version missing)")
    if isinstance(attrs.get("model"), Mapping):
        lines.append(f"model: {_model_line(attrs['model'])}")
    timings = attrs.get("timings_s")
    if isinstance(timings, Mapping) and timings:
        lines.append(
            "timings: "
            + ", ".join(
                f"{k} {float(v):.2f} s" if float(v) < 10 else f"{k} {float(v):.1f} s"
                for k, v in timings.items()
                if isinstance(v, int | float)
            )
        )
    lines += ["", "arrays:", *_arrays_section(ds)]
    meanings = _meanings_section(ds)
    if meanings:
        lines += ["", *meanings]
    sequences = _sequences_section(ds)
    if sequences:
        lines += ["", *sequences]
    lines += ["", *_attention_section(ds, layer, head, top)]
    return "\n".join(lines)
