"""KIVI baseline (Liu et al., arXiv 2402.02750): asymmetric round-to-nearest with per-group min/max.

numpy reference encoders and the decoders; ``worker.kvquant.KIVI`` writes the same arrays, bit for bit.

Per group: ``zero`` = the group minimum rounded *down* to float16, ``scale`` = ``(max − zero)/(2^b − 1)``
rounded *up* to float16 (so ``[zero, zero + (2^b − 1)·scale]`` covers the group and every element
decodes within ``scale/2``), code ``q = clip(round((x − zero)/scale), 0, 2^b − 1)`` (round half to
even, float32 arithmetic; ``q = 0`` where ``scale == 0``), decode ``x̂ = q·scale + zero`` (float32).

Keys ``k [..., T, d]`` — per channel over groups of ``G`` tokens, with a full-precision window:
    the first ``Tq = max(0, ⌊(T − R)/G⌋·G)`` tokens are quantised; the remaining ``T − Tq`` tokens (the
    ``R`` most recent plus the < G older ones that do not fill a whole group) are kept as float16.
    ``codes_packed`` uint8 ``[..., Tq, ceil(d·b/8)]`` (codes of each token packed along channels)
    ``scale``, ``zero`` float16 ``[..., Tq/G, d]`` (group ``g`` = tokens ``g·G … g·G + G − 1``)
    ``residual`` float16 ``[..., T − Tq, d]``
Values ``v [..., T, d]`` — per token over groups of ``G`` channels (the last group is partial when
``G ∤ d``):
    the first ``Tq = max(0, T − R)`` tokens are quantised, the ``R`` most recent kept as float16.
    ``codes_packed`` uint8 ``[..., Tq, ceil(d·b/8)]``
    ``scale``, ``zero`` float16 ``[..., Tq, ceil(d/G)]`` (group ``g``: channels ``g·G`` to
    ``min(d, g·G + G) − 1``)
    ``residual`` float16 ``[..., T − Tq, d]``
Decoding returns float32 ``[..., T, d]``: dequantised tokens followed by the residual window.
Bits 1..8 are accepted (KIVI uses 2 or 4; 3 works the same way).
"""

from __future__ import annotations

import numpy as np

from storage.kvquant.bitpack import pack_bits, unpack_bits

# An encoded payload: "codes_packed", "scale", "zero", "residual" → arrays (module docstring).
Encoded = dict[str, np.ndarray]


def _check(bits: int, group: int, residual: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    if group < 1 or residual < 0:
        raise ValueError(f"need group >= 1 and residual >= 0, got {group}, {residual}")


def quantized_tokens(length: int, group: int, residual: int, *, kind: str) -> int:
    """How many of ``length`` tokens KIVI quantises (``kind`` "keys" or "values"); the rest stay float16."""
    if kind == "keys":
        return max(0, (length - residual) // group * group)
    if kind == "values":
        return max(0, length - residual)
    raise ValueError(f"kind must be 'keys' or 'values', got {kind!r}")


def f16_down(a: np.ndarray) -> np.ndarray:
    """Largest float16 ≤ each float32 element."""
    h = np.asarray(a, dtype=np.float32).astype(np.float16)
    return np.where(h.astype(np.float32) > a, np.nextafter(h, np.float16(-np.inf)), h)


def f16_up(a: np.ndarray) -> np.ndarray:
    """Smallest float16 ≥ each float32 element."""
    h = np.asarray(a, dtype=np.float32).astype(np.float16)
    return np.where(h.astype(np.float32) < a, np.nextafter(h, np.float16(np.inf)), h)


def _scale_zero(mn: np.ndarray, mx: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    zero = f16_down(mn)
    scale = f16_up((mx - zero.astype(np.float32)) / np.float32((1 << bits) - 1))
    return scale, zero


def _codes(x: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int) -> np.ndarray:
    """``x``, ``scale``, ``zero`` broadcast to x's shape (float32 / float16)."""
    s = scale.astype(np.float32)
    q = np.round((x - zero.astype(np.float32)) / np.where(s > 0, s, np.float32(1.0)))
    q = np.clip(np.where(s > 0, q, np.float32(0.0)), 0, (1 << bits) - 1)
    return q.astype(np.uint8)


def _channel_groups(x: np.ndarray, group: int) -> np.ndarray:
    """``[..., d]`` → ``[..., ceil(d/G), G]``, the partial last group padded with its last channel."""
    d = x.shape[-1]
    n = -(-d // group)
    pad = n * group - d
    if pad:
        x = np.concatenate([x, np.repeat(x[..., -1:], pad, axis=-1)], axis=-1)
    return x.reshape(*x.shape[:-1], n, group)


def kivi_encode_keys(k: np.ndarray, bits: int, group: int = 32, residual: int = 128) -> Encoded:
    """Reference KIVI key encoder of ``k [..., T, d]`` (see the module docstring)."""
    _check(bits, group, residual)
    k = np.asarray(k, dtype=np.float32)
    length, dim = k.shape[-2:]
    tq = quantized_tokens(length, group, residual, kind="keys")
    xq = k[..., :tq, :].reshape(*k.shape[:-2], tq // group, group, dim)
    scale, zero = _scale_zero(xq.min(axis=-2), xq.max(axis=-2), bits)
    codes = _codes(xq, scale[..., None, :], zero[..., None, :], bits).reshape(*k.shape[:-2], tq, dim)
    return {
        "codes_packed": pack_bits(codes, bits),
        "scale": scale,
        "zero": zero,
        "residual": k[..., tq:, :].astype(np.float16),
    }


def kivi_decode_keys(
    codes_packed: np.ndarray,
    scale: np.ndarray,
    zero: np.ndarray,
    residual: np.ndarray,
    bits: int,
    dim: int,
    group: int = 32,
) -> np.ndarray:
    """Float32 ``[..., T, dim]`` keys from :func:`kivi_encode_keys`'s arrays."""
    codes = unpack_bits(codes_packed, bits, dim).astype(np.float32)
    tq = codes.shape[-2]
    if scale.shape[-2] * group != tq:
        raise ValueError(f"{tq} quantised tokens do not make {scale.shape[-2]} groups of {group}")
    g = codes.reshape(*codes.shape[:-2], tq // group, group, dim)
    deq = g * scale.astype(np.float32)[..., None, :] + zero.astype(np.float32)[..., None, :]
    deq = deq.reshape(codes.shape)
    return np.concatenate([deq, residual.astype(np.float32)], axis=-2)


def kivi_encode_values(v: np.ndarray, bits: int, group: int = 32, residual: int = 128) -> Encoded:
    """Reference KIVI value encoder of ``v [..., T, d]`` (see the module docstring)."""
    _check(bits, group, residual)
    v = np.asarray(v, dtype=np.float32)
    length, dim = v.shape[-2:]
    tq = quantized_tokens(length, group, residual, kind="values")
    xg = _channel_groups(v[..., :tq, :], group)
    scale, zero = _scale_zero(xg.min(axis=-1), xg.max(axis=-1), bits)
    codes = _codes(xg, scale[..., None], zero[..., None], bits)
    codes = codes.reshape(*codes.shape[:-2], codes.shape[-2] * group)[..., :dim]
    return {
        "codes_packed": pack_bits(codes, bits),
        "scale": scale,
        "zero": zero,
        "residual": v[..., tq:, :].astype(np.float16),
    }


def kivi_decode_values(
    codes_packed: np.ndarray,
    scale: np.ndarray,
    zero: np.ndarray,
    residual: np.ndarray,
    bits: int,
    dim: int,
    group: int = 32,
) -> np.ndarray:
    """Float32 ``[..., T, dim]`` values from :func:`kivi_encode_values`'s arrays."""
    codes = unpack_bits(codes_packed, bits, dim).astype(np.float32)
    s = np.repeat(scale.astype(np.float32), group, axis=-1)[..., :dim]
    z = np.repeat(zero.astype(np.float32), group, axis=-1)[..., :dim]
    return np.concatenate([codes * s + z, residual.astype(np.float32)], axis=-2)
