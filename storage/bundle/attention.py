"""Reading attention blocks from a bundle, materialised or derived (numpy + zarr + xarray).

- :class:`Bundle`: ``Bundle(location).attention(layer, head, query=slice, key=slice)`` → numpy
  ``[query, key]`` probabilities, for every kind of bundle (materialised: read; derived: computed).
- :func:`with_derived_attention`: gives a derived bundle's Dataset a lazily computed ``attention``
  variable (dims ``layer, batch, head, query, key``): indexing it computes only what is selected.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
from xarray.backends import BackendArray
from xarray.core import indexing

from storage.bundle.arrays import ARRAYS
from storage.bundle.derived import DEFAULT_BLOCK_ROWS, Backend, attention_block, describe, visible_key_range
from storage.bundle.tokencoords import with_token_coords
from storage.errors import BundleNotReady

Index = int | slice | Sequence[int] | np.ndarray


class DerivedAttention:
    """Reconstructs attention from a derived bundle's ``q`` and ``k`` (lazy xarray variables:
    only the chunks a request needs are read). ``stats`` counts rows and blocks computed."""

    def __init__(
        self,
        ds: xr.Dataset,
        *,
        backend: Backend = "auto",
        device: str | None = None,
        block_rows: int = DEFAULT_BLOCK_ROWS,
    ) -> None:
        for name in ("q", "k", "attention_scaling", "attention_window", "length"):
            if name not in ds.variables:
                raise BundleNotReady(
                    f"derived-attention bundle lacks the {name!r} array: is the job finished?"
                )
        self.q, self.k = ds.variables["q"], ds.variables["k"]
        self.lengths = np.asarray(ds["length"].values, dtype=np.int64)
        self.scaling = np.asarray(ds["attention_scaling"].values, dtype=np.float64)
        self.window = np.asarray(ds["attention_window"].values, dtype=np.int64)
        # chunked attention (1.4; absent in older bundles: no chunks)
        chunk = ds["attention_chunk"].values if "attention_chunk" in ds else np.zeros_like(self.window)
        self.chunk = np.asarray(chunk, dtype=np.int64)
        self.layers = [int(v) for v in ds["layer"].values]
        self.heads = [int(v) for v in ds["head"].values]
        kv_heads = [int(v) for v in ds["kv_head"].values]
        info = dict(ds.attrs.get("derived_attention") or {})
        model = dict(ds.attrs.get("model") or {})
        num_heads = int(info.get("num_heads") or model.get("num_heads") or len(self.heads))
        num_kv_heads = int(info.get("num_kv_heads") or model.get("num_kv_heads") or len(kv_heads))
        group = num_heads // num_kv_heads
        self.kv_of_head = [kv_heads.index(h // group) for h in self.heads]  # position along kv_head
        softcap = info.get("softcap", model.get("attn_logit_softcapping"))
        self.softcap = float(softcap) if softcap else None
        # learned sink logits [layer, head] (gpt-oss); absent: no sinks
        self.sinks = (
            np.asarray(ds["attention_sinks"].values, dtype=np.float32) if "attention_sinks" in ds else None
        )
        self.positions = int(self.q.shape[3])
        self.backend, self.device, self.block_rows = backend, device, block_rows
        self.stats: dict[str, int] = {"rows": 0, "blocks": 0, "calls": 0}

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        layers, batch, heads = self.q.shape[:3]
        return (int(layers), int(batch), int(heads), self.positions, self.positions)

    def layer_facts(self, layer_pos: int) -> tuple[float, int | None]:
        """(scaling, sliding window or None) of an exported layer, as the attention call saw them."""
        scaling, window = float(self.scaling[layer_pos]), int(self.window[layer_pos])
        if not np.isfinite(scaling) or window < 0:
            raise BundleNotReady(
                f"layer {self.layers[layer_pos]}: attention scaling/window not recorded (partial bundle?)"
            )
        return scaling, (window or None)

    def compute(
        self, layer_pos: int, batch: int, head_pos: np.ndarray, query: np.ndarray, key: np.ndarray
    ) -> np.ndarray:
        """Probabilities ``[len(head_pos), len(query), len(key)]`` float32 (positions along the
        bundle's axes; ``head_pos`` along ``head``)."""
        self.stats["calls"] += 1
        query, key = np.asarray(query, dtype=np.int64), np.asarray(key, dtype=np.int64)
        out = np.zeros((len(head_pos), query.size, key.size), dtype=np.float32)
        length = int(self.lengths[batch])
        valid = (query >= 0) & (query < length)
        if not valid.any() or key.size == 0:
            return out
        scaling, window = self.layer_facts(layer_pos)
        chunk = int(self.chunk[layer_pos]) or None
        rows = np.unique(query[valid])
        key_lo, key_hi = visible_key_range(rows, window, chunk)
        kv_pos = sorted({self.kv_of_head[int(h)] for h in head_pos})
        heads = [int(h) for h in head_pos]
        q = self.q.isel(layer=layer_pos, batch=batch, head=heads, position=rows).values  # [H, n, D]
        k = self.k.isel(layer=layer_pos, batch=batch, kv_head=kv_pos, position=slice(key_lo, key_hi)).values
        row_of = np.minimum(np.searchsorted(rows, query), rows.size - 1)  # invalid rows: ignored below
        for i, h in enumerate(heads):
            out[i] = attention_block(
                q[i][row_of],
                k[kv_pos.index(self.kv_of_head[h])],
                np.where(valid, query, -1),
                key,
                length=length,
                key0=key_lo,
                scaling=scaling,
                window=window,
                chunk=chunk,
                softcap=self.softcap,
                sink=None if self.sinks is None else float(self.sinks[layer_pos, h]),
                block_rows=self.block_rows,
                backend=self.backend,
                device=self.device,
                stats=self.stats,
            )
        return out


class DerivedAttentionArray(BackendArray):
    """xarray backend array of shape ``(layer, batch, head, query, key)``: indexing computes only
    the selected block (outer indexing: an int, slice or 1-D integer array per axis)."""

    def __init__(self, source: DerivedAttention) -> None:
        self.source = source
        self.shape = source.shape
        self.dtype = np.dtype("float32")

    def __getitem__(self, key: indexing.ExplicitIndexer) -> np.ndarray:
        return indexing.explicit_indexing_adapter(
            key, self.shape, indexing.IndexingSupport.OUTER, self._raw_getitem
        )

    def _raw_getitem(self, key: tuple[Any, ...]) -> np.ndarray:
        picks = [np.arange(size)[k] for k, size in zip(key, self.shape, strict=True)]
        flat = [np.atleast_1d(p) for p in picks]
        layers, batches, heads, query, keys = flat
        out = np.zeros(tuple(p.size for p in flat), dtype=self.dtype)
        for i, lp in enumerate(layers):
            for j, b in enumerate(batches):
                out[i, j] = self.source.compute(int(lp), int(b), heads, query, keys)
        squeeze = tuple(axis for axis, k in enumerate(key) if isinstance(k, (int, np.integer)))
        return out.squeeze(axis=squeeze) if squeeze else out


def with_derived_attention(
    ds: xr.Dataset,
    *,
    backend: Backend = "auto",
    device: str | None = None,
    block_rows: int = DEFAULT_BLOCK_ROWS,
) -> xr.Dataset:
    """``ds`` with a lazily computed float32 ``attention (layer, batch, head, query, key)`` (and the
    ``query_token``/``key_token`` coordinates of :mod:`storage.bundle.tokencoords`)."""
    source = DerivedAttention(ds, backend=backend, device=device, block_rows=block_rows)
    data = indexing.LazilyIndexedArray(DerivedAttentionArray(source))
    attrs = {"derived": "computed on access from q and k (float32)", **describe()}
    # the dims of the materialised array as declared (every exported head)
    variable = xr.Variable(ARRAYS["attention"].dims, data, attrs=attrs)
    out = ds.assign(attention=variable)
    out.encoding.update(ds.encoding)
    return with_token_coords(out)  # query_token/key_token for the new query/key dimensions


def derived_source(ds: xr.Dataset) -> DerivedAttention | None:
    """The :class:`DerivedAttention` behind a Dataset's lazily computed ``attention`` (or None)."""
    if "attention" not in ds.variables:
        return None
    data: Any = ds.variables["attention"]._data
    array = getattr(data, "array", None)
    return array.source if isinstance(array, DerivedAttentionArray) else None


def is_derived(ds: xr.Dataset) -> bool:
    capture = ds.attrs.get("capture")
    return isinstance(capture, dict) and bool(capture.get("derived_attention"))


def _positions(index: Index, size: int) -> np.ndarray:
    if isinstance(index, slice):
        return np.arange(size)[index]
    values = np.atleast_1d(np.asarray(index, dtype=np.int64))
    if ((values < 0) | (values >= size)).any():
        raise IndexError(
            f"positions {values[(values < 0) | (values >= size)][:5].tolist()} outside 0..{size - 1}"
        )
    return values


def _coordinate_index(ds: xr.Dataset, name: str, value: int, what: str) -> int:
    values = [int(v) for v in ds[name].values]
    if value not in values:
        raise KeyError(f"{what} {value} was not exported (exported: {values})")
    return values.index(value)


class Bundle:
    """A bundle opened for reading. ``dataset``: the lazy ``xarray.Dataset`` of
    :func:`storage.bundle.open_bundle` (with a computed ``attention`` for derived bundles).

    ``backend``/``device``: how derived attention is computed (``auto``: torch when the process has
    already imported it, else numpy)."""

    def __init__(
        self,
        location: str | Path,
        *,
        storage_options: dict[str, Any] | None = None,
        backend: Backend = "auto",
        device: str | None = None,
    ) -> None:
        from storage.bundle.reader import open_bundle

        self.location = str(location)
        self.dataset = open_bundle(location, storage_options=storage_options, backend=backend, device=device)

    @property
    def derived(self) -> bool:
        return is_derived(self.dataset)

    def attention(
        self, layer: int, head: int, *, query: Index = slice(None), key: Index = slice(None), batch: int = 0
    ) -> np.ndarray:
        """Probabilities ``[query, key]`` float32 of the model's ``layer`` and query ``head`` (real
        indices, as the ``layer``/``head`` coordinates) for sequence ``batch`` (default 0).

        ``query``/``key``: token positions (a slice, an int or a list); an int drops that axis.
        Derived bundles compute the block (fp32, every visible key of each row); materialised
        bundles read it (with row selection, ``query`` positions must be among the stored rows)."""
        ds = self.dataset
        if "attention" not in ds.variables:
            raise KeyError("this bundle has no attention (captured with attention=false)")
        lp = _coordinate_index(ds, "layer", layer, "layer")
        positions = int(ds.sizes["position"])
        rows, cols = _positions(query, positions), _positions(key, positions)
        source = derived_source(ds)
        if source is not None:
            hp = _coordinate_index(ds, "head", head, "head")
            block = source.compute(lp, batch, np.asarray([hp]), rows, cols)[0]
        else:
            block = self._read(lp, batch, head, rows)[:, cols]
        if isinstance(key, (int, np.integer)):
            block = block[:, 0]
        if isinstance(query, (int, np.integer)):
            block = block[0]
        return block

    def _read(self, lp: int, batch: int, head: int, rows: np.ndarray) -> np.ndarray:
        ds = self.dataset
        att = ds["attention"]
        if "top_head" in att.dims:
            kept = [int(v) for v in ds["top_head_index"].values[lp]]
            if head not in kept:
                raise KeyError(
                    f"head {head} is not among the heads kept for layer {ds['layer'].values[lp]}: {kept}"
                )
            selection: dict[str, int] = {"top_head": kept.index(head)}
        else:
            selection = {"head": _coordinate_index(ds, "head", head, "head")}
        if "query_position" in ds.variables:
            stored = np.asarray(ds["query_position"].values[batch])
            where = {int(p): i for i, p in enumerate(stored) if p >= 0}
            missing = [int(p) for p in rows if int(p) not in where]
            if missing:
                raise KeyError(f"query positions {missing[:10]} were not stored (row selection)")
            rows = np.asarray([where[int(p)] for p in rows], dtype=np.int64)
        block = att.isel({"layer": lp, "batch": batch, "query": rows, **selection}).values
        return np.asarray(block, dtype=np.float32)
