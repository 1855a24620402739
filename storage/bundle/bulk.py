"""Reading a bulk job's bundle (format 2.x), sequence by sequence (numpy + zarr + xarray).

A bulk bundle's root holds the sequence table (group ``sequences``: for each sequence of the job,
in the job's order, its source row, micro-batch, slot in it, length, prompt length and text) and one
group per micro-batch, ``batches/<k>``, each a format-1.x bundle of its sequences::

    from storage.bundle.bulk import open_bulk
    bulk = open_bulk("out/<id>.zarr.zip")     # or a directory, or s3://... with storage_options
    bulk.sequences                              # xarray Dataset over "sequence"
    ds = bulk.sequence(17)                      # sequence 17 alone, as a 1.x bundle of one sequence

Opening sequence ``i`` reads only its micro-batch's chunks of that sequence (chunks are per layer
and sequence). While the job runs, the table is built from the micro-batches finished so far.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
import zarr

from storage.bundle.format import BULK_BATCHES, BULK_MAJOR, BULK_SEQUENCES, FORMAT_NAME
from storage.bundle.reader import UnsupportedBundle, _dataset, open_store
from storage.bundle.tokencoords import with_token_coords
from storage.errors import BundleNotReady

__all__ = ["BulkBundle", "open_bulk"]


class BulkBundle:
    """A bulk job's bundle: :attr:`sequences` (the table) and :meth:`sequence` (one sequence)."""

    def __init__(self, location: str | Path, storage_options: dict[str, Any] | None = None) -> None:
        self.location = location
        self.store = open_store(location, storage_options)
        try:
            root = zarr.open_group(self.store, mode="r", zarr_format=3)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:
            raise BundleNotReady(f"{location} holds no readable bundle: {exc}") from exc
        self.attrs: dict[str, Any] = dict(root.attrs)
        if self.attrs.get("qkvault_format") != FORMAT_NAME:
            raise UnsupportedBundle(f"{location} is not a qkvault bundle (no qkvault_format attribute)")
        major = int(str(self.attrs.get("format_version", "0")).split(".")[0])
        if major != BULK_MAJOR:
            raise UnsupportedBundle(
                f"{location} has bundle format {self.attrs.get('format_version')}, not a bulk job's "
                f"{BULK_MAJOR}.x: open it with storage.bundle.open_bundle"
            )
        self._root = root

    def batches(self) -> list[str]:
        """The groups of the micro-batches finished so far, in order."""
        if BULK_BATCHES not in self._root:
            return []
        parent = self._root[BULK_BATCHES]
        assert isinstance(parent, zarr.Group)
        names = sorted(name for name, _ in parent.groups())
        return [f"{BULK_BATCHES}/{n}" for n in names if parent[n].attrs.get("complete")]

    @cached_property
    def sequences(self) -> xr.Dataset:
        """The sequence table over dimension ``sequence`` (the job's order): ``source_row``,
        ``batch``, ``slot``, ``length``, ``prompt_length`` and ``text``."""
        if BULK_SEQUENCES in self._root:
            ds = _dataset(self.store, BULK_SEQUENCES, self.location)
            return ds.assign_coords(sequence=ds["sequence"].values).assign_attrs(self.attrs)
        return self._table_so_far()

    def _table_so_far(self) -> xr.Dataset:
        """A running job's table: from the finished micro-batches' own arrays."""
        columns: dict[str, list[Any]] = {k: [] for k in ("sequence", "source_row", "batch", "slot", "length")}
        columns["prompt_length"] = []
        for group in self.batches():
            cell = self._root[group]
            assert isinstance(cell, zarr.Group)
            ids = np.asarray(cell["sequence"])
            columns["sequence"] += ids.tolist()
            columns["source_row"] += np.asarray(cell["source_row"]).tolist()
            columns["batch"] += [int(group.rsplit("/", 1)[1])] * len(ids)
            columns["slot"] += list(range(len(ids)))
            columns["length"] += np.asarray(cell["length"]).tolist()
            columns["prompt_length"] += np.asarray(cell["prompt_length"]).tolist()
        order = np.argsort(np.asarray(columns["sequence"], dtype=np.int64), kind="stable")
        data = {
            k: ("sequence", np.asarray(v, dtype=np.int64)[order])
            for k, v in columns.items()
            if k != "sequence"
        }
        sequence = np.asarray(columns["sequence"], dtype=np.int64)[order]
        return xr.Dataset(data, coords={"sequence": sequence}, attrs={**self.attrs, "partial_table": True})

    def sequence(self, index: int) -> xr.Dataset:
        """Sequence ``index`` of the job alone: its micro-batch's bundle at its slot, positions (and
        attention rows) cut to its length, with its ``query_token``/``key_token``/``position_token``
        coordinates (:mod:`storage.bundle.tokencoords`)."""
        table = self.sequences
        if index not in table.indexes["sequence"]:
            raise KeyError(f"sequence {index} is not in this bundle (finished: {table.sizes['sequence']})")
        entry = table.sel(sequence=index)
        group = f"{BULK_BATCHES}/{int(entry['batch']):06d}"
        ds = _dataset(self.store, group, self.location)
        from storage.bundle.attention import is_derived, with_derived_attention

        if is_derived(ds) and "attention" not in ds.variables:
            ds = with_derived_attention(ds)
        ds = with_token_coords(ds)  # query_token/key_token/position_token, cut below with the rest
        length = int(entry["length"])
        one = ds.isel(batch=int(entry["slot"]))
        dims = ("position", "key") if "query_position" in one.variables else ("position", "query", "key")
        cut = {dim: slice(0, length) for dim in dims if dim in one.dims}
        return one.isel(cut).assign_attrs(sequence=index, source_row=int(entry["source_row"]))

    def summary(self) -> xr.Dataset:
        """Per-head summary metrics over the whole dataset (``capture.summary``): each micro-batch's
        pooled means weighted by its eligible rows per layer, and the labels of those means
        (:func:`storage.bundle.labels.label_heads`, the job's thresholds). Per sequence, the means
        and labels are in each sequence's own bundle (:meth:`sequence`, group ``summary``)."""
        from storage.bundle.labels import SummaryParams, label_heads

        totals: dict[str, np.ndarray] = {}
        rows: np.ndarray | None = None
        first: xr.Dataset | None = None
        batches = self.batches()
        for group in batches:
            # zarr directly (an xarray Dataset per micro-batch costs ~0.15 s: 100,000 sequences
            # in ~800 micro-batches would take minutes); only the pooled means are read
            cell = zarr.open_group(self.store, path=f"{group}/summary", mode="r", zarr_format=3)
            first = first if first is not None else _dataset(self.store, f"{group}/summary", self.location)
            weight = np.asarray(cell["pooled_rows"]).astype(np.float64)
            rows = weight if rows is None else rows + weight
            for name, array in cell.arrays():
                if not name.startswith("pooled_") or name == "pooled_rows" or array.dtype.kind != "f":
                    continue
                values = np.nan_to_num(np.asarray(array).astype(np.float64)) * weight[:, None]
                totals[name] = totals.get(name, 0) + values
        if first is None or rows is None:
            raise BundleNotReady(f"{self.location}: no finished micro-batch holds a summary group")
        with np.errstate(invalid="ignore", divide="ignore"):
            means = {
                k.removeprefix("pooled_"): np.where(rows[:, None] > 0, v / rows[:, None], np.nan)
                for k, v in totals.items()
            }
        params = SummaryParams(**self.sequence_attrs().get("summary", {}).get("params", {}))
        labels = label_heads(means, rows[:, None], params)
        data: dict[str, tuple[tuple[str, ...], np.ndarray]] = {
            k: (("layer", "head"), v.astype(np.float32)) for k, v in means.items()
        }
        data["label"] = (("layer", "head"), labels)
        data["rows"] = (("layer",), rows.astype(np.int64))
        coords = {"layer": first["layer"].values, "head": first["head"].values}
        return xr.Dataset(data, coords=coords, attrs={"micro_batches": len(batches)})

    def sequence_attrs(self) -> dict[str, Any]:
        """The root attributes of the first finished micro-batch's bundle (model, capture, summary
        parameters: the same for every micro-batch of the job)."""
        batches = self.batches()
        if not batches:
            return {}
        cell = self._root[batches[0]]
        return dict(cell.attrs)


def open_bulk(location: str | Path, *, storage_options: dict[str, Any] | None = None) -> BulkBundle:
    """Open a bulk job's bundle (module docstring)."""
    return BulkBundle(location, storage_options)
