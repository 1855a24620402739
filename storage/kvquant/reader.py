"""Read a bundle's compressed KV groups (``kv/<method>_<bits>``) with numpy alone: dequantise keys
and values, and estimate attention scores (TurboQuant prod: the unbiased inner-product estimator)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from storage.bundle.reader import open_bundle, open_group
from storage.errors import BundleNotReady
from storage.kvquant.kivi import kivi_decode_keys, kivi_decode_values, quantized_tokens
from storage.kvquant.turboquant import mse_decode, prod_scores


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

    def dequantize(self, name: str, layer_pos: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """``(k̂, v̂)`` ``[KVH, T, D]`` float32 for one exported layer and sequence (TurboQuant prod:
        k̂ is the MSE part; use :meth:`scores` for the unbiased inner products)."""
        ds, attrs = self.group(name), self.root.attrs["kv_compression"][name]["params"]
        length, dim, bits = int(self.lengths[batch]), self.head_dim, int(attrs["bits"])
        k, v = self._cell(ds, "k_", layer_pos, batch), self._cell(ds, "v_", layer_pos, batch)
        if attrs["method"] == "kivi":
            group, residual = int(attrs["group"]), int(attrs["residual"])
            kq = quantized_tokens(length, group, residual, kind="keys")
            vq = quantized_tokens(length, group, residual, kind="values")
            k_hat = kivi_decode_keys(
                k["codes_packed"][:, :kq],
                k["scale"][:, : kq // group],
                k["zero"][:, : kq // group],
                k["residual"][:, : length - kq],
                bits,
                dim,
                group,
            )
            v_hat = kivi_decode_values(
                v["codes_packed"][:, :vq],
                v["scale"][:, :vq],
                v["zero"][:, :vq],
                v["residual"][:, : length - vq],
                bits,
                dim,
                group,
            )
            return k_hat, v_hat
        rotation = ds["rotation"].values
        key_bits = bits - 1 if attrs["method"] == "turboquant_prod" else bits
        k_hat = mse_decode(
            k["idx_packed"][:, :length],
            k["norms"][:, :length],
            ds["codebook_k"].values,
            rotation,
            key_bits,
            dim,
        )
        v_hat = mse_decode(
            v["idx_packed"][:, :length], v["norms"][:, :length], ds["codebook_v"].values, rotation, bits, dim
        )
        return k_hat, v_hat

    def scores(self, name: str, layer_pos: int, batch: int, q: np.ndarray) -> np.ndarray:
        """Estimated ``q·k`` for queries ``q [KVH, Nq, D]`` against every key: ``[KVH, Nq, T]``."""
        k_hat, _ = self.dequantize(name, layer_pos, batch)
        if self.root.attrs["kv_compression"][name]["params"]["method"] != "turboquant_prod":
            return np.asarray(q, dtype=np.float32) @ np.swapaxes(k_hat, -1, -2)
        ds, length = self.group(name), int(self.lengths[batch])
        k = self._cell(ds, "k_", layer_pos, batch)
        return prod_scores(q, k_hat, k["signs_packed"][:, :length], k["gamma"][:, :length], ds["qjl"].values)
