"""A writer's groups opened without zarr's event loop (numpy + zarr only).

``zarr.open_group(mode="a")`` then ``update_attributes`` is two round trips to zarr's one event
loop thread, and ``require_group`` another, for each micro-batch of a bulk job: the forward thread
waited there behind the drain thread's metadata work (≈ 25-40 ms a micro-batch on an H100 host).
:func:`open_group` reads the group's ``zarr.json`` through the bundle's
:class:`~storage.bundle.chunkstore.ChunkStore` (a local file read, or one GET), merges the new
attributes into the stored ones as ``update_attributes`` does (an earlier attempt's stay unless
replaced), stores the document and builds zarr's handle from it without I/O. It also says whether
the group is new, so a writer need not list it for an earlier attempt's arrays. A stored document
of another kind (an array, consolidated metadata) is left to zarr.
"""

from __future__ import annotations

import json
from typing import Any

import zarr
from zarr.core.common import ZARR_JSON
from zarr.core.group import AsyncGroup, GroupMetadata
from zarr.storage import StorePath

from storage.bundle.chunkstore import ChunkStore

__all__ = ["open_group"]


def open_group(
    chunks: ChunkStore, path: str = "", attrs: dict[str, Any] | None = None
) -> tuple[zarr.Group, bool]:
    """Group ``path`` of ``chunks``' store ("": its root), created if missing; ``attrs`` merged into
    its stored attributes (None: left as they are, as ``require_group``). Returns zarr's handle and
    whether the group was new (then it holds nothing: no listing is needed to know it)."""
    key = f"{path}/{ZARR_JSON}" if path else ZARR_JSON
    stored = chunks.read(key)
    attributes: dict[str, Any] = {}
    if stored is not None:
        document = json.loads(stored)
        if document.get("node_type") != "group" or document.get("consolidated_metadata"):
            return _through_zarr(chunks, path, attrs), False
        attributes = dict(document.get("attributes") or {})
        if attrs is None:
            return _handle(chunks, path, attributes), False
    merged = {**attributes, **(attrs or {})}
    # GroupMetadata.to_dict's document, without its deep copy of the attributes (≈ 4 ms a
    # micro-batch group, whose attributes hold the job's spec)
    document = {"attributes": merged, "zarr_format": 3, "node_type": "group"}
    chunks.put(key, json.dumps(document, allow_nan=True).encode())
    return _handle(chunks, path, merged), stored is None


def _handle(chunks: ChunkStore, path: str, attributes: dict[str, Any]) -> zarr.Group:
    metadata = GroupMetadata(attributes=attributes, zarr_format=3)
    return zarr.Group(AsyncGroup(metadata, StorePath(chunks.zarr(), path)))


def _through_zarr(chunks: ChunkStore, path: str, attrs: dict[str, Any] | None) -> zarr.Group:
    group = zarr.open_group(chunks.zarr(), path=path, mode="a", zarr_format=3)
    if attrs is not None:
        group.update_attributes(attrs)
    return group
