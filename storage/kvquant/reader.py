"""Read a bundle's compressed KV groups (``kv/<method>_<bits>``) with numpy alone: dequantise keys
and values, and estimate attention scores (TurboQuant prod: the unbiased inner-product estimator).
What each method stores and how it decodes is its registry entry's (:mod:`storage.kvquant.registry`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from storage.bundle.reader import open_bundle, open_group
from storage.errors import BundleNotReady
from storage.kvquant.registry import KVMethodDef, StoredCell, kv_method
from storage.kvquant.spec import KVMethodSpec


class KVBundle:
    """``KVBundle("<id>.zarr.zip").dequantize("turboquant_prod_3", layer_pos=0, batch=1)``."""

    def __init__(self, location: str | Path, *, storage_options: dict[str, Any] | None = None) -> None:
        self.root = open_bundle(location, storage_options=storage_options)
        self.location, self.storage_options = location, storage_options
        self.lengths = self.root["length"].values
        self.head_dim = int(self.root.attrs["model"]["head_dim"])
        self._groups: dict[str, xr.Dataset] = {}

    @property
    def methods(self) -> list[str]:
        return list((self.root.attrs.get("kv_compression") or {}).keys())

    def group(self, name: str) -> xr.Dataset:
        if name not in self.methods:
            raise BundleNotReady(f"bundle has no kv/{name}; it holds {self.methods or 'no compressed KV'}")
        if name not in self._groups:
            self._groups[name] = open_group(self.location, f"kv/{name}", self.storage_options)
        return self._groups[name]

    def _cell(self, ds: xr.Dataset, prefix: str, layer_pos: int, batch: int) -> dict[str, np.ndarray]:
        return {
            str(n)[len(prefix) :]: ds[n][layer_pos, batch].values
            for n in ds.data_vars
            if str(n).startswith(prefix)
        }

    def _stored(self, name: str, layer_pos: int, batch: int) -> tuple[KVMethodDef, KVMethodSpec, StoredCell]:
        """The method of group ``name``, its parameters and one stored (layer, sequence) cell."""
        ds = self.group(name)
        method = KVMethodSpec.from_params(self.root.attrs["kv_compression"][name]["params"])
        cell = StoredCell(
            k=self._cell(ds, "k_", layer_pos, batch),
            v=self._cell(ds, "v_", layer_pos, batch),
            shared=lambda array: ds[array].values,
            length=int(self.lengths[batch]),
            dim=self.head_dim,
        )
        return kv_method(method.method), method, cell

    def dequantize(self, name: str, layer_pos: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """``(k̂, v̂)`` ``[KVH, T, D]`` float32 for one exported layer and sequence (TurboQuant prod:
        k̂ is the MSE part; use :meth:`scores` for the unbiased inner products)."""
        definition, method, cell = self._stored(name, layer_pos, batch)
        return definition.dequantize(method, cell)

    def scores(self, name: str, layer_pos: int, batch: int, q: np.ndarray) -> np.ndarray:
        """Estimated ``q·k`` for queries ``q [KVH, Nq, D]`` against every key: ``[KVH, Nq, T]`` (the
        method's own estimator where it has one, else ``q @ k̂ᵀ``)."""
        definition, method, cell = self._stored(name, layer_pos, batch)
        k_hat, _ = definition.dequantize(method, cell)
        if definition.scores is None:
            return np.asarray(q, dtype=np.float32) @ np.swapaxes(k_hat, -1, -2)
        return definition.scores(method, cell, q, k_hat)
