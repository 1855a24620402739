"""One sequence of a bundle without its padding (numpy + xarray; nothing is read until accessed).

The sequences of a batch share the ``position``/``query``/``key`` axes, sized by the longest one;
a shorter sequence's tail is padding (``tokens`` -1, attention 0). :func:`sequence_view` cuts it::

    view = sequence_view(open_bundle(path), 1)      # sequence 1 (``batch`` index 1)
    view.attention.sel(layer=15, head=3)            # [its rows, its keys], token coordinates on both
    view.attention.sel(layer=15, head=3, query=24)  # the row of token position 24
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from storage.bundle.tokencoords import with_token_coords
from storage.errors import BundleNotReady


def stored_query_positions(one: xr.Dataset, length: int) -> np.ndarray:
    """The token position of each stored attention row of one sequence (no ``batch`` dimension):
    ``query_position``'s rows in use with row selection, else ``0..length-1``."""
    if "query_position" in one.variables:
        where = np.asarray(one["query_position"].values, dtype=np.int64).reshape(-1)
        return where[where >= 0]
    rows = int(one.sizes.get("query", length))
    return np.arange(min(length, rows), dtype=np.int64)


def sequence_view(ds: xr.Dataset, seq: int = 0) -> xr.Dataset:
    """Sequence ``seq`` (its ``batch`` index) of a bundle's Dataset, padding removed.

    ``position`` and ``key`` keep the sequence's ``length`` tokens; ``query`` keeps its stored
    attention rows (every token's, or with row selection the rows ``query_position`` names). The
    three dimensions get integer index coordinates holding **token positions** (``.sel(query=p)``
    picks the row of position ``p``, also with row selection) next to the ``query_token``/
    ``key_token``/``position_token`` strings. Lazy: a derived bundle's ``attention`` stays
    computed on access, for this sequence only.

    ``ds`` may also be one sequence already (no ``batch`` dimension, as
    ``open_bulk(...).sequence(i)``): it is trimmed as it is (``seq`` must be 0 or its index).
    """
    ds = with_token_coords(ds)
    if "batch" in ds.dims:
        count = int(ds.sizes["batch"])
        if not 0 <= seq < count:
            raise IndexError(f"sequence {seq} out of range: this bundle holds {count} (0..{count - 1})")
        one = ds.isel(batch=seq)
    else:
        if seq not in (0, ds.attrs.get("sequence")):
            raise IndexError(
                f"sequence {seq}: this dataset holds one sequence only "
                f"({ds.attrs.get('sequence', 0)}; no batch dimension)"
            )
        one = ds
        seq = int(ds.attrs.get("sequence", seq))
    if "length" not in one.variables:
        raise BundleNotReady("this dataset has no 'length' array: is the job finished?")
    length = int(one["length"].values)
    rows = stored_query_positions(one, length)
    cut: dict[str, slice | np.ndarray] = {
        dim: slice(0, length) for dim in ("position", "key") if dim in one.dims
    }
    if "query" in one.dims:
        if "query_position" in one.variables:
            where = np.flatnonzero(np.asarray(one["query_position"].values).reshape(-1) >= 0)
            contiguous = where.size == 0 or bool(where[-1] == where.size - 1)
            cut["query"] = slice(0, where.size) if contiguous else where
        else:
            cut["query"] = slice(0, rows.size)
    view = one.isel(cut)
    index: dict[str, np.ndarray] = {dim: np.arange(length, dtype=np.int64) for dim in ("position", "key")}
    index["query"] = rows
    view = view.assign_coords({dim: values for dim, values in index.items() if dim in view.dims})
    view.encoding.update(ds.encoding)
    return view.assign_attrs(sequence=seq)
