"""Theoretical storage cost per vector (KV_COMPRESSION.md "Bits per vector"), for ratios against fp16.

These count payload bits only: codebooks, matrices/seeds and parameters are shared by a whole export,
and KIVI's float16 residual window depends on the sequence length — the fidelity report puts the
ratio of bytes actually stored next to these.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np


def _kivi(bits: int, dim: int, group: int) -> float:
    if dim % group:
        raise ValueError("'kivi' needs dim % group == 0; ask for 'kivi_keys' or 'kivi_values'")
    return bits * dim + 32.0 * dim / group


# vector quantizer → bits of one dim-vector (bits, dim, group); see theoretical_bits_per_vector
_PER_VECTOR: dict[str, Callable[[int, int, int], float]] = {
    "fp16": lambda bits, dim, group: 16.0 * dim,
    "mse": lambda bits, dim, group: float(bits * dim + 16),
    "prod": lambda bits, dim, group: float((bits - 1) * dim + dim + 32),
    "kivi": _kivi,
    "kivi_keys": lambda bits, dim, group: bits * dim + 32.0 * dim / group,
    "kivi_values": lambda bits, dim, group: float(bits * dim + 32 * (-(-dim // group))),
}
METHODS: tuple[str, ...] = tuple(_PER_VECTOR)


def theoretical_bits_per_vector(method: str, bits: int, dim: int, *, group: int = 32) -> float:
    """Bits one ``dim``-vector costs with a vector quantizer (not a ``kv_compression`` method: those
    combine them, see :mod:`storage.kvquant.methods`):

    - ``fp16``: ``16·d``;
    - ``mse`` (TurboQuant values): ``b·d + 16`` (indices, fp16 norm);
    - ``prod`` (TurboQuant keys): ``(b−1)·d + d + 16 + 16`` (indices, sign bits, fp16 norm and γ);
    - ``kivi_keys``: ``b·d + 32·d/G`` (fp16 scale + zero per channel, amortised over G tokens);
    - ``kivi_values``: ``b·d + 32·⌈d/G⌉`` (fp16 scale + zero per group of G channels of the token);
    - ``kivi``: the common value of the two when ``G | d`` (``b·d + 32·d/G``).
    """
    if method not in _PER_VECTOR:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return _PER_VECTOR[method](bits, dim, group)


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
