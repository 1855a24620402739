"""Token strings as coordinates of a bundle's ``query``, ``key`` and ``position`` dimensions.

A bundle stores the decoded string of every token once, in the root attribute ``token_strings``
(per sequence, one string per token). The reader turns it into non-index coordinates, so axis
labels travel with every selection::

    ds = open_bundle(path)
    ds.attention.sel(layer=15).isel(batch=0, head=3)    # coords query_token (query), key_token (key)

They are per sequence, hence 2-D: ``position_token (batch, position)``, ``key_token (batch, key)``
and ``query_token (batch, query)``; past a sequence's length (padding) they hold ``""``. With row
selection (``query_position``), ``query_token`` is the token of each stored row's position. They
are computed on opening (from the attribute and ``query_position``), never stored.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import xarray as xr

QUERY_TOKEN = "query_token"
KEY_TOKEN = "key_token"
POSITION_TOKEN = "position_token"
# dimension -> the name of its token coordinate
TOKEN_COORDINATES: dict[str, str] = {"query": QUERY_TOKEN, "key": KEY_TOKEN, "position": POSITION_TOKEN}
PADDING_TOKEN = ""


def token_table(token_strings: Sequence[Sequence[str]], positions: int) -> np.ndarray:
    """``[batch, positions]`` object array of token strings, ``""`` past each sequence's end."""
    table = np.full((len(token_strings), positions), PADDING_TOKEN, dtype=object)
    for b, strings in enumerate(token_strings):
        row = [str(s) for s in list(strings)[:positions]]
        table[b, : len(row)] = row
    return table


def _query_tokens(ds: xr.Dataset, table: np.ndarray) -> np.ndarray:
    """``[batch, query]``: the token each stored attention row belongs to."""
    rows = int(ds.sizes["query"])
    if "query_position" in ds.variables:  # row selection: each row's token position, -1 = unused
        where = np.asarray(ds["query_position"].values, dtype=np.int64)
        picked = np.take_along_axis(table, np.clip(where, 0, table.shape[1] - 1), axis=1)
        return np.where(where >= 0, picked, PADDING_TOKEN).astype(object)
    if rows <= table.shape[1]:
        return table[:, :rows]
    out = np.full((table.shape[0], rows), PADDING_TOKEN, dtype=object)
    out[:, : table.shape[1]] = table
    return out


def with_token_coords(ds: xr.Dataset) -> xr.Dataset:
    """``ds`` with ``query_token``/``key_token``/``position_token`` coordinates on whichever of
    those dimensions it has (and lacks them); unchanged when it has no ``token_strings`` attribute
    (a partial bundle: the attribute is written last) or no ``batch`` dimension."""
    strings: Any = ds.attrs.get("token_strings")
    missing = [dim for dim, name in TOKEN_COORDINATES.items() if dim in ds.dims and name not in ds.coords]
    if not missing or not isinstance(strings, list) or "batch" not in ds.dims:
        return ds
    if len(strings) != ds.sizes["batch"]:
        return ds  # not this dataset's sequences (an edited copy): no labels rather than wrong ones
    positions = max(int(ds.sizes.get(dim, 0)) for dim in ("position", "key"))
    table = token_table(strings, positions)
    coords: dict[str, tuple[tuple[str, str], np.ndarray]] = {}
    for dim in missing:
        values = _query_tokens(ds, table) if dim == "query" else table[:, : ds.sizes[dim]]
        coords[TOKEN_COORDINATES[dim]] = (("batch", dim), values)
    out = ds.assign_coords(coords)
    out.encoding.update(ds.encoding)
    return out
