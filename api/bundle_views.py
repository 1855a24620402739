"""A job's bundle opened for slices and tiles (``api/routes/arrays.py``, ``api/routes/tiles.py``),
and the tile pyramids this API process has opened."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Annotated

from fastapi import Depends, Request

from storage.bundle.matrix import AttentionMatrix
from storage.bundle.slices import BundleView
from storage.bundle.tiles import TilePyramid, tiles_url
from storage.errors import BundleNotReady
from storage.index import TERMINAL_STATES, JobRecord, JobState
from storage.stores.objectstore import ObjectStore

__all__ = ["PyramidRegistry", "PyramidsDep", "open_view"]

OPEN_PYRAMIDS = 64  # pyramids kept open per API process (each holds the bundle's root metadata)


def open_view(job: JobRecord, store: ObjectStore) -> BundleView:
    """The job's bundle, or BundleNotReady (409) while it has none to read: a finished job's bundle
    (a cancelled or failed one's when it left partial data), and a running bulk job's finished
    micro-batches."""
    readable = job.state == JobState.SUCCEEDED or (job.state in TERMINAL_STATES and job.partial)
    try:
        view = BundleView(job.store_url, store.storage_options)
    except (FileNotFoundError, BundleNotReady) as exc:
        if readable:
            raise BundleNotReady(f"job {job.id} is {job.state} but its bundle cannot be read: {exc}") from exc
        view = None
    if readable and view is not None:
        return view
    if view is not None and view.bulk and job.state not in TERMINAL_STATES and view.sequences > 0:
        return view  # a running bulk job: its finished micro-batches
    if job.state in TERMINAL_STATES:
        raise BundleNotReady(f"no bundle: job {job.id} is {job.state} and left no partial data")
    raise BundleNotReady(
        f"bundle not ready: job is {job.state}; poll GET /v1/jobs/{job.id} until succeeded "
        "(a bulk job's finished micro-batches are readable while it runs)"
    )


class PyramidRegistry:
    """The tile pyramids opened by this process, by ``(bundle, layer, head, seq)``: the most recent
    :data:`OPEN_PYRAMIDS`. Requests for one pyramid share one object, so its build runs once here
    (other processes are kept apart by :class:`~storage.bundle.tiles.TilePyramid` itself)."""

    def __init__(self, size: int = OPEN_PYRAMIDS) -> None:
        self.size = size
        self._open: OrderedDict[tuple[str, int, int, int], TilePyramid] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, job: JobRecord, store: ObjectStore, layer: int, head: int, seq: int) -> TilePyramid:
        key = (job.store_url, layer, head, seq)
        with self._lock:
            if key in self._open:
                self._open.move_to_end(key)
                return self._open[key]
        view = open_view(job, store)
        matrix = AttentionMatrix(view, layer, head, seq)
        pyramid = TilePyramid(matrix, tiles_url(job.store_url, layer, head, seq), store.storage_options)
        with self._lock:
            pyramid = self._open.setdefault(key, pyramid)
            self._open.move_to_end(key)
            while len(self._open) > self.size:
                self._open.popitem(last=False)
        return pyramid


async def get_pyramids(request: Request) -> PyramidRegistry:
    """The app's registry, made on first use (an async dependency: runs on the event loop, one at
    a time, so two requests never make two)."""
    registry = getattr(request.app.state, "tile_pyramids", None)
    if registry is None:
        registry = PyramidRegistry()
        request.app.state.tile_pyramids = registry
    assert isinstance(registry, PyramidRegistry)
    return registry


PyramidsDep = Annotated[PyramidRegistry, Depends(get_pyramids)]
