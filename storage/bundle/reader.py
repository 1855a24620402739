"""Open a bundle with xarray from a local store, a downloaded zip, or S3 (numpy + zarr + xarray)."""

from __future__ import annotations

import warnings
import zipfile
from pathlib import Path
from typing import Any

import xarray as xr

from storage.bundle.derived import Backend
from storage.bundle.format import BULK_MAJOR, FORMAT_NAME, SUPPORTED_MAJOR
from storage.bundle.tokencoords import with_token_coords
from storage.errors import BundleNotReady, QkvaultError
from storage.stores.objectstore import is_s3, zarr_store


class UnsupportedBundle(QkvaultError, ValueError):
    problem_type = "unsupported-bundle"
    status = 422


def open_store(location: str | Path, storage_options: dict[str, Any] | None = None) -> Any:
    """A read-only zarr store for a bundle directory, ``.zip`` file, or ``s3://`` URL."""
    text = str(location).removeprefix("file://")
    if not is_s3(text):
        path = Path(text).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"bundle {text} does not exist")
        if path.is_file():
            if not zipfile.is_zipfile(path):
                raise UnsupportedBundle(
                    f"{text} is not a zip file: expected a downloaded bundle <id>.zarr.zip"
                )
            from zarr.storage import ZipStore

            return ZipStore(path, mode="r")
        if not (path / "zarr.json").is_file():
            raise BundleNotReady(f"{text} holds no bundle (no zarr.json): is the job finished?")
    return zarr_store(text, storage_options=storage_options, read_only=True)


def open_group(
    location: str | Path, group: str | None, storage_options: dict[str, Any] | None = None
) -> xr.Dataset:
    """One group of a bundle (``None``: the root) as a lazy Dataset; no format checks."""
    return _dataset(open_store(location, storage_options), group, location)


def _dataset(store: Any, group: str | None, location: str | Path) -> xr.Dataset:
    with warnings.catch_warnings():
        # a failed job's partial bundle is not consolidated: the fallback is expected
        warnings.filterwarnings("ignore", message="Failed to open Zarr store with consolidated metadata")
        ds = xr.open_zarr(store, group=group, zarr_format=3, consolidated=None, chunks=None)
    ds.encoding["source"] = str(location)
    return ds


def open_bundle(
    location: str | Path,
    *,
    storage_options: dict[str, Any] | None = None,
    backend: Backend = "auto",
    device: str | None = None,
) -> xr.Dataset:
    """Open a bundle lazily as an ``xarray.Dataset`` (dask not required; arrays load on access).

    ``location``: a bundle directory (``.../jobs/<id>.zarr``), a downloaded ``<id>.zarr.zip``, or
    ``s3://bucket/.../jobs/<id>.zarr`` with s3fs ``storage_options`` (endpoint_url, key, secret).
    A derived-attention bundle (``capture.attention="derived"``) gets a lazily computed float32
    ``attention`` variable: indexing it reconstructs only the selected block from q and k
    (``backend``: ``auto`` = torch when already imported, else numpy; ``device`` for torch).
    Token strings are coordinates: ``query_token``/``key_token``/``position_token`` (per sequence,
    dims ``(batch, query)`` etc.; :mod:`storage.bundle.tokencoords`); one sequence without its
    padding: :func:`storage.bundle.trim.sequence_view`.
    A bulk job's bundle (format 2.x) opens as its sequence table; one sequence's arrays:
    ``storage.bundle.bulk.open_bulk(location).sequence(i)``.
    """
    store = open_store(location, storage_options)  # a missing path raises FileNotFoundError here
    try:
        ds = _dataset(store, None, location)
    except FileNotFoundError as exc:
        raise BundleNotReady(f"{location} holds no readable bundle: {exc}") from exc
    if ds.attrs.get("qkvault_format") != FORMAT_NAME:
        raise UnsupportedBundle(f"{location} is not a qkvault bundle (no qkvault_format attribute)")
    major = int(str(ds.attrs.get("format_version", "0")).split(".")[0])
    if major == BULK_MAJOR:  # a bulk job: its sequence table (storage/bundle/bulk.py reads the rest)
        from storage.bundle.bulk import open_bulk

        return open_bulk(location, storage_options=storage_options).sequences
    if major != SUPPORTED_MAJOR:
        raise UnsupportedBundle(
            f"{location} has bundle format {ds.attrs.get('format_version')}; this reader understands "
            f"{SUPPORTED_MAJOR}.x: upgrade qkvault"
        )
    from storage.bundle.attention import is_derived, with_derived_attention

    if is_derived(ds) and "attention" not in ds.variables:
        ds = with_derived_attention(ds, backend=backend, device=device)
    return with_token_coords(ds)


def open_summary(location: str | Path, *, storage_options: dict[str, Any] | None = None) -> xr.Dataset:
    """The per-head ``summary`` group (metrics, quantiles, labels; HEAD_METRICS.md) as a Dataset
    with its own ``layer``/``head``/``kv_head``/``quantile`` coordinates."""
    open_bundle(location, storage_options=storage_options)  # format checks
    try:
        return open_group(location, "summary", storage_options)
    except (FileNotFoundError, KeyError) as exc:
        raise BundleNotReady(
            f"{location} has no summary group: the job did not capture summary=true"
        ) from exc
