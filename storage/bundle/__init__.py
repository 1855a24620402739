"""The qkvault bundle: a versioned Zarr v3 group per job (see docs/bundle-format.md).

Reading needs numpy, zarr and xarray only: ``from storage.bundle import open_bundle`` (an
``xarray.Dataset``) or ``Bundle(location).attention(layer, head, query=..., key=...)`` (numpy).
The readers are imported when first named: a process that only writes chunks (a chunk encoder
process, storage/bundle/encodeworker.py) does not load xarray and pandas.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from storage.bundle.format import FORMAT_NAME, FORMAT_VERSION

if TYPE_CHECKING:
    from storage.bundle.attention import Bundle
    from storage.bundle.reader import open_bundle, open_summary

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "Bundle", "open_bundle", "open_summary"]

_READERS = {
    "Bundle": "storage.bundle.attention",
    "open_bundle": "storage.bundle.reader",
    "open_summary": "storage.bundle.reader",
}


def __getattr__(name: str) -> Any:
    module = _READERS.get(name)
    if module is None:
        raise AttributeError(f"module 'storage.bundle' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
