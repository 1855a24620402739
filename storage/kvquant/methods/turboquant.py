"""``turboquant_prod`` and ``turboquant_mse`` (KV_COMPRESSION.md): values with the b-bit MSE
quantizer; keys with the inner-product quantizer (b−1-bit MSE codes + 1-bit QJL signs of the
residual) or the b-bit MSE quantizer. Stored: ``k_``/``v_`` ``idx_packed`` and ``norms`` (prod keys
also ``signs_packed`` and ``gamma``), the rotation Π, both codebooks and (prod) the QJL matrix S.
Torch codec: ``worker.kvexport``'s ``TurboQuantCodec``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from storage.kvquant.accounting import theoretical_bits_per_vector
from storage.kvquant.codebook import lloyd_max_codebook
from storage.kvquant.registry import GroupArrays, KVMethodDef, StoredCell
from storage.kvquant.rotation import qjl_matrix, rotation_matrix
from storage.kvquant.turboquant import mse_decode, prod_scores

if TYPE_CHECKING:
    from storage.kvquant.spec import KVMethodSpec

BITS = (2, 3, 4)


def _key_bits(method: KVMethodSpec, prod: bool) -> int:
    """Bits of the keys' MSE codes (prod: one bit goes to the QJL signs)."""
    return method.bits - 1 if prod else method.bits


def _definition(name: str, label: str, prod: bool) -> KVMethodDef:
    key_vector = "prod" if prod else "mse"

    def job_bits(method: KVMethodSpec, dim: int, lengths: Sequence[int]) -> float:
        total = 0.0
        for length in lengths:
            total += length * (
                theoretical_bits_per_vector(key_vector, method.bits, dim)
                + theoretical_bits_per_vector("mse", method.bits, dim)
            )
        return total

    def shared_arrays(method: KVMethodSpec, dim: int) -> GroupArrays:
        arrays: GroupArrays = {
            "rotation": (("row", "col"), rotation_matrix(dim, method.seed)),
            "codebook_k": (("code_k",), lloyd_max_codebook(_key_bits(method, prod), dim).astype(np.float32)),
            "codebook_v": (("code_v",), lloyd_max_codebook(method.bits, dim).astype(np.float32)),
        }
        if prod:
            arrays["qjl"] = (("row", "col"), qjl_matrix(dim, method.seed + 1))
        return arrays

    def shared_bytes(method: KVMethodSpec, dim: int) -> int:
        return 2 * dim * dim * 4  # the d×d float32 matrices (the estimate counts two for both variants)

    def dequantize(method: KVMethodSpec, cell: StoredCell) -> tuple[np.ndarray, np.ndarray]:
        k, v, n, dim = cell.k, cell.v, cell.length, cell.dim
        rotation = cell.shared("rotation")
        key_bits = _key_bits(method, prod)
        k_hat = mse_decode(
            k["idx_packed"][:, :n], k["norms"][:, :n], cell.shared("codebook_k"), rotation, key_bits, dim
        )
        v_hat = mse_decode(
            v["idx_packed"][:, :n], v["norms"][:, :n], cell.shared("codebook_v"), rotation, method.bits, dim
        )
        return k_hat, v_hat

    def scores(method: KVMethodSpec, cell: StoredCell, q: np.ndarray, k_hat: np.ndarray) -> np.ndarray:
        """The unbiased inner-product estimator (k̂ is the MSE part)."""
        k, n = cell.k, cell.length
        return prod_scores(q, k_hat, k["signs_packed"][:, :n], k["gamma"][:, :n], cell.shared("qjl"))

    return KVMethodDef(
        name=name,
        label=label,
        bits=BITS,
        job_bits=job_bits,
        dequantize=dequantize,
        shared_arrays=shared_arrays,
        shared_bytes=shared_bytes,
        scores=scores if prod else None,
    )


TURBOQUANT_PROD = _definition("turboquant_prod", "TurboQuant prod", prod=True)
TURBOQUANT_MSE = _definition("turboquant_mse", "TurboQuant MSE", prod=False)
