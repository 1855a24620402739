"""Theoretical storage cost per vector (KV_COMPRESSION.md "Bits per vector"), for ratios against fp16.

These count payload bits only: codebooks, matrices/seeds and parameters are shared by a whole export,
and KIVI's float16 residual window depends on the sequence length — the fidelity report puts the
ratio of bytes actually stored next to these.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

METHODS: tuple[str, ...] = ("fp16", "mse", "prod", "kivi", "kivi_keys", "kivi_values")


def theoretical_bits_per_vector(method: str, bits: int, dim: int, *, group: int = 32) -> float:
    """Bits one ``dim``-vector costs:

    - ``fp16``: ``16·d``;
    - ``mse`` (TurboQuant values): ``b·d + 16`` (indices, fp16 norm);
    - ``prod`` (TurboQuant keys): ``(b−1)·d + d + 16 + 16`` (indices, sign bits, fp16 norm and γ);
    - ``kivi_keys``: ``b·d + 32·d/G`` (fp16 scale + zero per channel, amortised over G tokens);
    - ``kivi_values``: ``b·d + 32·⌈d/G⌉`` (fp16 scale + zero per group of G channels of the token);
    - ``kivi``: the common value of the two when ``G | d`` (``b·d + 32·d/G``).
    """
    if method == "fp16":
        return 16.0 * dim
    if method == "mse":
        return float(bits * dim + 16)
    if method == "prod":
        return float((bits - 1) * dim + dim + 32)
    if method == "kivi_keys":
        return bits * dim + 32.0 * dim / group
    if method == "kivi_values":
        return float(bits * dim + 32 * (-(-dim // group)))
    if method == "kivi":
        if dim % group:
            raise ValueError("'kivi' needs dim % group == 0; ask for 'kivi_keys' or 'kivi_values'")
        return bits * dim + 32.0 * dim / group
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def theoretical_ratio(
    bits: int, dim: int, *, key_method: str = "prod", value_method: str = "mse", group: int = 32
) -> float:
    """Compression of one key plus one value vector against fp16 (7.31×, 5.02×, 3.82× for TurboQuant
    prod/mse keys/values at b = 2, 3, 4 and d = 128)."""
    stored = theoretical_bits_per_vector(key_method, bits, dim, group=group) + theoretical_bits_per_vector(
        value_method, bits, dim, group=group
    )
    return 2.0 * theoretical_bits_per_vector("fp16", bits, dim) / stored


def payload_nbytes(arrays: Mapping[str, np.ndarray]) -> int:
    """Bytes of an encoded payload (the dict an encoder returns), as stored uncompressed."""
    return sum(int(np.asarray(a).nbytes) for a in arrays.values())


def job_kv_bits(
    method: str, bits: int, dim: int, lengths: Sequence[int], *, group: int = 32, residual: int = 128
) -> float:
    """Theoretical bits of one kv head's K and V over sequences of ``lengths`` tokens with a
    ``kv_compression`` method (``turboquant_prod`` | ``turboquant_mse`` | ``kivi``); KIVI's
    full-precision tokens (residual window, incomplete key group) count at 16 bits."""
    from storage.kvquant.kivi import quantized_tokens

    total = 0.0
    for length in lengths:
        if method == "kivi":
            kq = quantized_tokens(length, group, residual, kind="keys")
            vq = quantized_tokens(length, group, residual, kind="values")
            total += kq * theoretical_bits_per_vector("kivi_keys", bits, dim, group=group)
            total += vq * theoretical_bits_per_vector("kivi_values", bits, dim, group=group)
            total += (2 * length - kq - vq) * 16 * dim
        else:
            key = "prod" if method == "turboquant_prod" else "mse"
            total += length * (
                theoretical_bits_per_vector(key, bits, dim) + theoretical_bits_per_vector("mse", bits, dim)
            )
    return total
