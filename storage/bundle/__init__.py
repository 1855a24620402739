"""The qkvault bundle: a versioned Zarr v3 group per job (see docs/bundle-format.md).

Reading needs numpy, zarr and xarray only: ``from storage.bundle import open_bundle``.
"""

from storage.bundle.format import FORMAT_NAME, FORMAT_VERSION
from storage.bundle.reader import open_bundle, open_summary

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "open_bundle", "open_summary"]
