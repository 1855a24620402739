"""qkvault storage: bundle format (Zarr v3), object stores, and the SQL index.

Imports neither torch nor fastapi/celery: a Jupyter user reads bundles with numpy + zarr + xarray
through :func:`storage.bundle.open_bundle`. Submodules are imported lazily by their users.
"""
