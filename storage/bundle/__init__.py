"""The qkvault bundle: a versioned Zarr v3 group per job (see docs/bundle-format.md).

Reading needs numpy, zarr and xarray only: ``from storage.bundle import open_bundle`` (an
``xarray.Dataset``) or ``Bundle(location).attention(layer, head, query=..., key=...)`` (numpy).
"""

from storage.bundle.attention import Bundle
from storage.bundle.format import FORMAT_NAME, FORMAT_VERSION
from storage.bundle.reader import open_bundle, open_summary

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "Bundle", "open_bundle", "open_summary"]
