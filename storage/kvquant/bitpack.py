"""Bit packing of small integer codes along the last axis (numpy; the torch packer writes the same bytes).

Format (little-endian bit order): the ``n`` codes ``c_0 … c_{n−1}`` of ``bits`` bits each along the last
axis form one bit stream in which code ``i`` occupies stream bits ``i·bits … i·bits + bits − 1``, its
least significant bit first; stream bit ``j`` is bit ``j % 8`` (value ``2^(j % 8)``) of byte ``j // 8``.
The stream is zero-padded to a whole number of bytes, so ``[..., n]`` codes pack into
``[..., ceil(n·bits / 8)]`` bytes; every leading index is packed independently. For ``bits = 8`` the
bytes are the codes; for ``bits = 1`` it is ``np.packbits(..., bitorder="little")``.
"""

from __future__ import annotations

import numpy as np


def packed_size(count: int, bits: int) -> int:
    """Bytes that ``count`` codes of ``bits`` bits take: ``ceil(count·bits / 8)``."""
    return (count * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack ``uint8`` codes ``[..., n]`` (each ``< 2**bits``) into ``uint8 [..., ceil(n·bits/8)]``."""
    _check_bits(bits)
    codes = np.asarray(codes)
    if codes.dtype != np.uint8:
        raise TypeError(f"codes must be uint8, got {codes.dtype}")
    if codes.ndim == 0:
        raise ValueError("codes must have at least one axis")
    if bits < 8 and codes.size and int(codes.max()) >= 1 << bits:
        raise ValueError(f"a code is >= 2**{bits}")
    n = codes.shape[-1]
    stream = np.unpackbits(codes[..., None], axis=-1, bitorder="little")[..., :bits]
    stream = stream.reshape(*codes.shape[:-1], n * bits)
    return np.packbits(stream, axis=-1, bitorder="little")


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: the first ``count`` codes of ``uint8 [..., nbytes]``, as
    ``uint8 [..., count]``."""
    _check_bits(bits)
    packed = np.asarray(packed)
    if packed.dtype != np.uint8:
        raise TypeError(f"packed must be uint8, got {packed.dtype}")
    if packed.ndim == 0 or packed.shape[-1] < packed_size(count, bits):
        need = packed_size(count, bits)
        raise ValueError(f"need {need} bytes on the last axis for {count} codes of {bits} bits")
    stream = np.unpackbits(packed, axis=-1, count=count * bits, bitorder="little")
    stream = stream.reshape(*packed.shape[:-1], count, bits)
    weights = (1 << np.arange(bits, dtype=np.uint8)).astype(np.uint8)
    return (stream * weights).sum(axis=-1, dtype=np.uint8)
