"""TurboQuant (Zandieh et al., arXiv 2504.19874): numpy reference encoders, decoders and the
inner-product estimator. The torch encoders in ``worker.kvquant`` write the same arrays.

Stored arrays for vectors ``x [..., d]`` (``...`` any leading axes, e.g. ``[T]`` or ``[L, H, T]``):

``mse`` (b bits, 1 ≤ b ≤ 8), ``Q_mse``:
    ``idx_packed``  uint8 ``[..., ceil(d·b/8)]``  codebook indices of ``y = Π x/‖x‖``, packed with
                    :func:`~storage.kvquant.bitpack.pack_bits` (little-endian bit order)
    ``norms``       float16 ``[...]``  ‖x‖
    decode: ``x̃ = ‖x‖ · Πᵀ c[idx]`` (row form ``norms[..., None] * (c[idx] @ Π)``), float32.
``prod`` (b bits, 2 ≤ b ≤ 9), ``Q_prod`` for keys: ``Q_mse`` with ``b − 1`` bits plus
    ``signs_packed`` uint8 ``[..., ceil(d/8)]``  bit ``i`` = 1 where ``(S r)_i ≥ 0`` (+1), 0 where < 0
                    (−1), ``r = x − x̃_mse`` the residual against the *decoded* MSE part
    ``gamma``       float16 ``[...]``  ‖r‖
    estimate: ``⟨q, k⟩ ≈ ⟨q, x̃_mse⟩ + γ · √(π/2)/d · ⟨S q, sign(S r)⟩`` (unbiased over the Gaussian S).

Fixed per export (stored once): the float32 codebook (``2^b`` sorted centroids from
:func:`~storage.kvquant.codebook.lloyd_max_codebook`, beta distribution at ``dim`` by default), the
float32 rotation ``Π`` and QJL matrix ``S`` (or their seeds, see :mod:`storage.kvquant.rotation`).
Nearest centroid = ``searchsorted(midpoints, y, side="left")``: a value on a threshold takes the lower
index (torch: ``bucketize(y, midpoints, right=False)``). A zero vector encodes with norm 0 and decodes
to 0. Norms must fit float16 (< 65504).
"""

from __future__ import annotations

import math

import numpy as np

from storage.kvquant.bitpack import pack_bits, unpack_bits
from storage.kvquant.codebook import midpoints

QJL_SCALE = math.sqrt(math.pi / 2.0)  # times γ/d: Gaussian S (rows of norm ≈ √d)


# An encoded payload: array name → array, as listed in the module docstring.
Encoded = dict[str, np.ndarray]


def _f32(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float32)


def _check_codebook(codebook: np.ndarray, bits: int) -> np.ndarray:
    c = _f32(codebook)
    if c.shape != (1 << bits,):
        raise ValueError(f"codebook must have 2**{bits} entries, got shape {c.shape}")
    return c


def mse_encode(x: np.ndarray, codebook: np.ndarray, rotation: np.ndarray, bits: int) -> Encoded:
    """Reference ``Q_mse`` encoder of ``x [..., d]`` (float32 arithmetic)."""
    c = _check_codebook(codebook, bits)
    x = _f32(x)
    norms = np.linalg.norm(x, axis=-1)
    u = x / np.where(norms > 0, norms, np.float32(1.0))[..., None]
    y = u @ _f32(rotation).T
    idx = np.searchsorted(midpoints(c), y, side="left").astype(np.uint8)
    return {"idx_packed": pack_bits(idx, bits), "norms": norms.astype(np.float16)}


def mse_decode(
    idx_packed: np.ndarray, norms: np.ndarray, codebook: np.ndarray, rotation: np.ndarray, bits: int, dim: int
) -> np.ndarray:
    """``x̃ = ‖x‖ Πᵀ c[idx]`` as float32 ``[..., dim]``."""
    c = _check_codebook(codebook, bits)
    idx = unpack_bits(idx_packed, bits, dim)
    return (c[idx] @ _f32(rotation)) * _f32(norms)[..., None]


def _signs_pm1(signs_packed: np.ndarray, dim: int) -> np.ndarray:
    """±1 float32 ``[..., dim]`` from the packed sign bits."""
    return unpack_bits(signs_packed, 1, dim).astype(np.float32) * np.float32(2.0) - np.float32(1.0)


def prod_encode(
    x: np.ndarray, codebook: np.ndarray, rotation: np.ndarray, qjl: np.ndarray, bits: int
) -> Encoded:
    """Reference ``Q_prod`` encoder (``bits`` total: ``codebook`` is the ``bits − 1``-bit one)."""
    if not 2 <= bits <= 9:
        raise ValueError(f"prod bits must be in 2..9, got {bits}")
    x = _f32(x)
    mse = mse_encode(x, codebook, rotation, bits - 1)
    r = x - mse_decode(mse["idx_packed"], mse["norms"], codebook, rotation, bits - 1, x.shape[-1])
    signs = (r @ _f32(qjl).T >= 0).astype(np.uint8)
    return {
        "idx_packed": mse["idx_packed"],
        "norms": mse["norms"],
        "signs_packed": pack_bits(signs, 1),
        "gamma": np.linalg.norm(r, axis=-1).astype(np.float16),
    }


def prod_decode(
    idx_packed: np.ndarray, norms: np.ndarray, codebook: np.ndarray, rotation: np.ndarray, bits: int, dim: int
) -> np.ndarray:
    """The MSE part ``x̃_mse`` (float32 ``[..., dim]``) of a ``bits``-bit ``Q_prod`` code; combine with
    :func:`prod_inner_product` / :func:`prod_scores` for the unbiased inner product."""
    return mse_decode(idx_packed, norms, codebook, rotation, bits - 1, dim)


def prod_inner_product(
    q: np.ndarray, mse_part: np.ndarray, signs_packed: np.ndarray, gamma: np.ndarray, qjl: np.ndarray
) -> np.ndarray:
    """Unbiased ``⟨q, k⟩`` estimate, elementwise over the broadcast leading axes of ``q [..., d]`` and
    the key's arrays (``mse_part [..., d]``, ``signs_packed [..., ceil(d/8)]``, ``gamma [...]``):
    ``⟨q, k̃_mse⟩ + γ · √(π/2)/d · ⟨S q, sign(S r)⟩``. float32 ``[...]``."""
    q = _f32(q)
    dim = q.shape[-1]
    sq = q @ _f32(qjl).T
    qjl_term = np.sum(sq * _signs_pm1(signs_packed, dim), axis=-1)
    scale = _f32(gamma) * np.float32(QJL_SCALE / dim)
    return np.sum(q * _f32(mse_part), axis=-1) + scale * qjl_term


def prod_scores(
    q: np.ndarray, mse_part: np.ndarray, signs_packed: np.ndarray, gamma: np.ndarray, qjl: np.ndarray
) -> np.ndarray:
    """Estimated score matrix ``q Kᵀ``: ``q [..., Nq, d]`` against the keys ``mse_part [..., T, d]``,
    ``signs_packed [..., T, ceil(d/8)]``, ``gamma [..., T]`` → float32 ``[..., Nq, T]``."""
    q = _f32(q)
    dim = q.shape[-1]
    sq = q @ _f32(qjl).T
    qjl_term = sq @ np.swapaxes(_signs_pm1(signs_packed, dim), -1, -2)
    scale = _f32(gamma)[..., None, :] * np.float32(QJL_SCALE / dim)
    return q @ np.swapaxes(_f32(mse_part), -1, -2) + scale * qjl_term


def prod_dequantize(
    mse_part: np.ndarray, signs_packed: np.ndarray, gamma: np.ndarray, qjl: np.ndarray
) -> np.ndarray:
    """A key-vector estimate ``x̃_mse + γ · √(π/2)/d · Sᵀ sign(S r)`` (float32 ``[..., d]``).

    Its inner product with any fixed ``q`` equals :func:`prod_inner_product`, so it is unbiased for
    inner products only: as a vector it is a poor estimate of ``k`` (its QJL term is typically longer
    than the residual ‖r‖ = γ it stands for, so ‖k̃‖ and ‖k̃ − k‖ are inflated), and nonlinear uses of
    it do not inherit the unbiasedness."""
    m = _f32(mse_part)
    dim = m.shape[-1]
    scale = _f32(gamma)[..., None] * np.float32(QJL_SCALE / dim)
    return m + scale * (_signs_pm1(signs_packed, dim) @ _f32(qjl))
