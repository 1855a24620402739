"""Slices of a bundle's arrays, read from the chunks they touch (numpy + zarr).

::

    from storage.bundle.slices import BundleView
    from storage.bundle.selectors import parse_selector
    view = BundleView("out/<id>.zarr")           # a directory, a downloaded zip, or s3://... with options
    view.arrays()                                # what there is: names, dims, shapes, dtypes, chunks
    picks = {"layer": parse_selector("layer", "15"), "query": parse_selector("query", "0:64")}
    plan = view.plan("attention", picks, seq=0)    # the model's layer 15, rows 0..63 of sequence 0
    plan.values, plan.dims                       # how big, before reading anything
    block = plan.read()                          # numpy, only the chunks the slice touches are read

``seq`` is the sequence: the ``batch`` index of a bundle of format 1.x; for a bulk job's bundle
(format 2.x) the job-wide sequence index, mapped to its micro-batch group and slot there
(:mod:`storage.bundle.bulk`), and the arrays have their per-sequence form: no ``batch`` axis, the
``position``/``query``/``key`` axes cut to the sequence's length. A derived-attention bundle
(``capture.attention="derived"``) has an ``attention`` array computed from ``q`` and ``k`` for just
the slice asked (:mod:`storage.bundle.attention`). Selectors: :mod:`storage.bundle.selectors`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from storage.bundle.arrays import ARRAYS, ROW_DIMS
from storage.bundle.format import BULK_BATCHES, BULK_MAJOR, FORMAT_NAME
from storage.bundle.reader import UnsupportedBundle, open_group, open_store
from storage.bundle.selectors import COORDINATE_DIMS, ArrayNotFound, Pick, Selector, SliceError, resolve
from storage.errors import BundleNotReady

__all__ = ["ArrayInfo", "BundleView", "SequenceRef", "SlicePlan"]

SEQUENCE_DIM = "batch"  # the axis ``seq`` selects in a bundle of format 1.x


@dataclass(frozen=True)
class ArrayInfo:
    """One array as a slice sees it: ``name`` (``<group>/<array>`` inside a group), ``dims``,
    ``shape``, ``dtype`` (``str`` for strings), ``chunks`` and whether it is ``derived``."""

    name: str
    group: str
    dims: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: str
    chunks: tuple[int, ...]
    derived: bool = False


@dataclass(frozen=True)
class SequenceRef:
    """Where sequence ``seq`` lives: ``group`` ("" for the root, ``batches/<k>`` for a bulk job),
    its ``slot`` along that group's ``batch`` axis, and its ``length`` in tokens."""

    seq: int
    group: str
    slot: int
    length: int


@dataclass
class SlicePlan:
    """A slice resolved against the array: ``dims``/``shape``/``dtype`` of the result, ``values``
    it holds; :meth:`read` reads (or computes) it."""

    name: str
    dims: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: str
    reader: Callable[[], np.ndarray] = field(repr=False)

    @property
    def values(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        itemsize = 8 if self.dtype == "str" else np.dtype(self.dtype).itemsize
        return self.values * itemsize

    def read(self) -> np.ndarray:
        return self.reader()


def _dtype_name(dtype: Any) -> str:
    kind = getattr(dtype, "kind", "O")
    return "str" if kind in "OTU" else str(np.dtype(dtype))


def _dims(array: zarr.Array) -> tuple[str, ...]:
    names = array.metadata.dimension_names if hasattr(array.metadata, "dimension_names") else None
    return tuple(str(n) for n in names) if names else tuple(f"dim_{i}" for i in range(array.ndim))


class BundleView:
    """A bundle opened for slicing (module docstring). Opening reads the root metadata only."""

    def __init__(self, location: str | Path, storage_options: dict[str, Any] | None = None) -> None:
        self.location = str(location)
        self.storage_options = storage_options
        self.store = open_store(location, storage_options)
        try:
            self.root = zarr.open_group(self.store, mode="r", zarr_format=3)
        except (FileNotFoundError, KeyError, zarr.errors.GroupNotFoundError) as exc:
            raise BundleNotReady(f"{location} holds no readable bundle: {exc}") from exc
        self.attrs: dict[str, Any] = dict(self.root.attrs)
        if self.attrs.get("qkvault_format") != FORMAT_NAME:
            raise UnsupportedBundle(f"{location} is not a qkvault bundle (no qkvault_format attribute)")
        self.format_version = str(self.attrs.get("format_version", "0"))
        self.bulk = int(self.format_version.split(".")[0]) == BULK_MAJOR
        self._bulk_table: Any = None
        self._groups: dict[str, zarr.Group] = {"": self.root}

    # -- sequences ------------------------------------------------------------------------------
    def _table(self) -> Any:
        if self._bulk_table is None:
            from storage.bundle.bulk import open_bulk

            self._bulk_table = open_bulk(self.location, storage_options=self.storage_options).sequences
        return self._bulk_table

    @property
    def sequences(self) -> int:
        """How many sequences the bundle holds (finished ones, for a running bulk job)."""
        if self.bulk:
            return int(self._table().sizes["sequence"])
        return int(self._array("", "length").shape[0]) if "length" in self.root else 0

    def locate(self, seq: int) -> SequenceRef:
        """Sequence ``seq``: its group, slot and length (SliceError naming the range when absent)."""
        if self.bulk:
            table = self._table()
            if seq < 0 or seq not in table.indexes["sequence"]:
                raise SliceError(
                    f"seq={seq}: this bulk job's bundle holds sequences 0..{table.sizes['sequence'] - 1}"
                    if table.sizes["sequence"]
                    else f"seq={seq}: no micro-batch of this bulk job has finished yet"
                )
            entry = table.sel(sequence=seq)
            group = f"{BULK_BATCHES}/{int(entry['batch']):06d}"
            return SequenceRef(seq, group, int(entry["slot"]), int(entry["length"]))
        count = self.sequences
        if not 0 <= seq < count:
            raise SliceError(
                f"seq={seq} is out of range: the bundle holds {count} sequences (0..{count - 1})"
            )
        return SequenceRef(seq, "", seq, int(np.asarray(self._array("", "length")[seq])))

    def token_strings(self, ref: SequenceRef) -> list[str]:
        """The decoded string of each of the sequence's tokens (root attribute ``token_strings``)."""
        strings: Any = self.group(ref.group).attrs.get("token_strings") or []
        return [str(s) for s in strings[ref.slot]][: ref.length] if ref.slot < len(strings) else []

    # -- groups and arrays ------------------------------------------------------------------------
    def group(self, path: str) -> zarr.Group:
        if path not in self._groups:
            found = self.root[path]
            if not isinstance(found, zarr.Group):
                raise ArrayNotFound(f"{path} is an array, not a group")
            self._groups[path] = found
        return self._groups[path]

    def _array(self, group: str, name: str) -> zarr.Array:
        found = self.group(group)[name]
        assert isinstance(found, zarr.Array)
        return found

    def _walk(self, group: str) -> list[tuple[str, zarr.Array]]:
        """Every array under ``group`` as ``(name relative to it, array)``: its own first, then
        its subgroups' (a bulk root's micro-batches are not walked)."""
        base = self.group(group)
        found: list[tuple[str, zarr.Array]] = [(n, a) for n, a in sorted(base.arrays())]
        for name, _ in sorted(base.groups()):
            if not group and self.bulk:
                continue
            prefix = f"{group}/{name}" if group else name
            found += [(f"{name}/{n}", a) for n, a in self._walk(prefix)]
        return found

    def derived(self, group: str) -> bool:
        """Whether the bundle (or micro-batch) ``group`` is a derived-attention bundle."""
        capture = self.group(group).attrs.get("capture")
        return isinstance(capture, dict) and bool(capture.get("derived_attention"))

    def arrays(self, seq: int = 0) -> list[ArrayInfo]:
        """Every array: root arrays by name, group arrays as ``<group>/<name>``; for a bulk job,
        those of sequence ``seq``'s micro-batch in their per-sequence form (module docstring)."""
        ref = self.locate(seq) if self.bulk else None
        base = ref.group if ref is not None else ""
        out: list[ArrayInfo] = []
        for name, array in self._walk(base):
            dims, shape, chunks = _dims(array), tuple(array.shape), tuple(array.chunks)
            if ref is not None:
                dims, shape, chunks = _per_sequence(dims, shape, chunks, ref.length)
            group = name.rsplit("/", 1)[0] if "/" in name else ""
            out.append(ArrayInfo(name, group, dims, shape, _dtype_name(array.dtype), chunks))
        if self.derived(base) and "attention" not in self.group(base):
            out.append(self._derived_info(base, ref))
        return out

    def _derived_info(self, group: str, ref: SequenceRef | None) -> ArrayInfo:
        q = self._array(group, "q")
        layers, batch, heads, positions, _ = q.shape
        dims = ARRAYS["attention"].dims
        shape: tuple[int, ...] = (layers, batch, heads, positions, positions)
        chunks: tuple[int, ...] = (1, 1, heads, *q.chunks[3:4], *q.chunks[3:4])
        if ref is not None:
            dims, shape, chunks = _per_sequence(dims, shape, chunks, ref.length)
        return ArrayInfo("attention", "", dims, shape, "float32", chunks, derived=True)

    # -- slices -----------------------------------------------------------------------------------
    def plan(self, name: str, selectors: Mapping[str, Selector], seq: int | None = None) -> SlicePlan:
        """Resolve a slice of array ``name`` (``<group>/<array>`` inside a group): ``selectors``
        by dimension name, ``seq`` the sequence (module docstring). Nothing is read yet."""
        ref = self._sequence_for(name, seq)
        base = ref.group if ref is not None and self.bulk else ""
        path = f"{base}/{name}" if base else name
        group_path, _, leaf = path.rpartition("/")
        derived = (
            leaf == "attention" and not group_path.endswith("summary") and self._derived_here(group_path)
        )
        if derived:
            info = self._derived_info(group_path, None)
        else:
            try:
                array = self._array(group_path, leaf)
            except (KeyError, AssertionError, ArrayNotFound):
                known = ", ".join(a.name for a in self.arrays(seq or 0))
                raise ArrayNotFound(f"this bundle has no array {name!r}; it has: {known}") from None
            info = ArrayInfo(name, "", _dims(array), tuple(array.shape), _dtype_name(array.dtype), ())
        picks = self._picks(name, info, group_path, selectors, ref)
        dims = tuple(d for d, p in zip(info.dims, picks, strict=True) if not p.drop)
        shape = tuple(p.size for p in picks if not p.drop)
        reader = self._derived_reader(group_path, picks) if derived else _zarr_reader(array, picks)
        return SlicePlan(name, dims, shape, info.dtype, reader)

    def _derived_here(self, group_path: str) -> bool:
        try:
            return self.derived(group_path) and "attention" not in self.group(group_path)
        except KeyError:
            return False

    def _sequence_for(self, name: str, seq: int | None) -> SequenceRef | None:
        if self.bulk:
            if seq is None:
                raise SliceError(
                    f"{name}: a bulk job's arrays are read one sequence at a time: add seq=<index> "
                    f"(0..{self.sequences - 1})"
                )
            return self.locate(seq)
        return self.locate(seq) if seq is not None else None

    def _picks(
        self,
        name: str,
        info: ArrayInfo,
        group_path: str,
        selectors: Mapping[str, Selector],
        ref: SequenceRef | None,
    ) -> list[Pick]:
        unknown = [d for d in selectors if d not in info.dims or (self.bulk and d == SEQUENCE_DIM)]
        if unknown:
            visible = [d for d in info.dims if not (self.bulk and d == SEQUENCE_DIM)]
            raise SliceError(
                f"{name} has no dimension {unknown[0]!r}: its dimensions are {', '.join(visible) or 'none'}"
                + ("; seq= picks the sequence" if SEQUENCE_DIM in info.dims else "")
            )
        if ref is not None and not self.bulk and SEQUENCE_DIM not in info.dims:
            raise SliceError(f"{name} has no sequence axis (dimensions: {', '.join(info.dims)}): drop seq=")
        picks = []
        for dim, size in zip(info.dims, info.shape, strict=True):
            if dim == SEQUENCE_DIM and ref is not None:
                picks.append(Pick(ref.slot, ref.slot + 1, drop=True))
                continue
            if self.bulk and ref is not None and dim in ROW_DIMS:
                size = min(size, ref.length)
            coordinate = self._coordinate(group_path, dim) if dim in COORDINATE_DIMS else None
            picks.append(resolve(dim, selectors.get(dim, Selector()), size, coordinate))
        return picks

    def _coordinate(self, group_path: str, dim: str) -> np.ndarray | None:
        """The real indices along ``dim``: the coordinate array in the array's group, else above it."""
        path = group_path
        while True:
            group = self.group(path)
            if dim in group and isinstance(group[dim], zarr.Array):
                return np.asarray(self._array(path, dim)[...])
            if not path:
                return None
            path = path.rpartition("/")[0]

    def _derived_reader(self, group_path: str, picks: list[Pick]) -> Callable[[], np.ndarray]:
        def read() -> np.ndarray:
            from storage.bundle.attention import DerivedAttention

            ds = open_group(self.location, group_path or None, self.storage_options)
            source = DerivedAttention(ds, backend="numpy")
            layer, batch, head, query, key = picks
            heads = np.arange(head.start, head.stop)
            rows, cols = np.arange(query.start, query.stop), np.arange(key.start, key.stop)
            out = np.zeros((layer.size, batch.size, heads.size, rows.size, cols.size), dtype=np.float32)
            for i, lp in enumerate(range(layer.start, layer.stop)):
                for j, b in enumerate(range(batch.start, batch.stop)):
                    out[i, j] = source.compute(lp, b, heads, rows, cols)
            dropped = tuple(axis for axis, p in enumerate(picks) if p.drop)
            return out.squeeze(axis=dropped) if dropped else out

        return read


def _per_sequence(
    dims: tuple[str, ...], shape: tuple[int, ...], chunks: tuple[int, ...], length: int
) -> tuple[tuple[str, ...], tuple[int, ...], tuple[int, ...]]:
    """An array's form for one sequence of a bulk job: no ``batch`` axis, rows cut to its length."""
    keep = [i for i, d in enumerate(dims) if d != SEQUENCE_DIM]
    return (
        tuple(dims[i] for i in keep),
        tuple(min(shape[i], length) if dims[i] in ROW_DIMS else shape[i] for i in keep),
        tuple(chunks[i] for i in keep),
    )


def _zarr_reader(array: zarr.Array, picks: list[Pick]) -> Callable[[], np.ndarray]:
    def read() -> np.ndarray:
        key = tuple(p.key() for p in picks)
        if any(p.size == 0 for p in picks):  # zarr refuses some empty selections
            shape = tuple(p.size for p in picks if not p.drop)
            return np.zeros(shape, dtype=_numpy_dtype(array.dtype))
        data = np.asarray(array[key])
        # variable-length strings as fixed-width unicode (an .npy without pickles)
        return np.asarray(data.tolist(), dtype=np.str_) if data.dtype.kind in "OT" else data

    return read


def _numpy_dtype(dtype: Any) -> Any:
    return np.dtype(str) if getattr(dtype, "kind", "O") in "OT" else dtype
