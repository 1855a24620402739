"""``kivi`` (KV_COMPRESSION.md): keys per channel over groups of ``group`` tokens, values per token
over groups of ``group`` channels, asymmetric round-to-nearest with fp16 scale and zero; the
``residual`` most recent tokens (and an incomplete key group) stay fp16. Stored: ``k_``/``v_``
``codes_packed``, ``scale``, ``zero`` and ``residual``; nothing group-wide. Torch codec:
``worker.kvexport``'s ``KIVICodec``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from storage.kvquant.accounting import theoretical_bits_per_vector
from storage.kvquant.kivi import kivi_decode_keys, kivi_decode_values, quantized_tokens
from storage.kvquant.registry import KVMethodDef, StoredCell

if TYPE_CHECKING:
    from storage.kvquant.spec import KVMethodSpec


def job_bits(method: KVMethodSpec, dim: int, lengths: Sequence[int]) -> float:
    """Codes at the KIVI rates; the full-precision tokens (residual window, incomplete key group)
    at 16 bits."""
    bits, group, residual = method.bits, method.group, method.residual
    total = 0.0
    for length in lengths:
        kq = quantized_tokens(length, group, residual, kind="keys")
        vq = quantized_tokens(length, group, residual, kind="values")
        total += kq * theoretical_bits_per_vector("kivi_keys", bits, dim, group=group)
        total += vq * theoretical_bits_per_vector("kivi_values", bits, dim, group=group)
        total += (2 * length - kq - vq) * 16 * dim
    return total


def dequantize(method: KVMethodSpec, cell: StoredCell) -> tuple[np.ndarray, np.ndarray]:
    k, v, length, dim = cell.k, cell.v, cell.length, cell.dim
    bits, group, residual = method.bits, method.group, method.residual
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


KIVI = KVMethodDef(
    name="kivi",
    label="KIVI",
    bits=(2, 3, 4),
    params=("group", "residual"),
    job_bits=job_bits,
    dequantize=dequantize,
)
