"""Random matrices of TurboQuant, reproducible from a seed with numpy alone.

Both draw ``np.random.default_rng(seed).standard_normal((dim, dim))`` in float64 (PCG64: the same
stream on every numpy >= 1.17 and platform) and return float32; the torch encoders are built from
these arrays, so encoder and decoder share one matrix. Rotation and QJL matrix must come from
different seeds: with one seed the QJL matrix would be the Gaussian whose QR gives the rotation.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


def _gaussian(dim: int, seed: int) -> np.ndarray:
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    return np.random.default_rng(seed).standard_normal((dim, dim))


@lru_cache(maxsize=64)
def _rotation(dim: int, seed: int) -> np.ndarray:
    q, r = np.linalg.qr(_gaussian(dim, seed))
    signs = np.where(np.diagonal(r) < 0, -1.0, 1.0)
    out = (q * signs).astype(np.float32)
    out.setflags(write=False)
    return out


def rotation_matrix(dim: int, seed: int) -> np.ndarray:
    """Haar-random orthogonal ``Π`` (float32 ``[dim, dim]``): ``Q`` of the QR factorisation of a Gaussian
    matrix, columns multiplied by ``sign(diag R)`` (so Q is unique, independent of the LAPACK build).
    Applied to row vectors as ``y = u @ Π.T`` (``y = Π u``); decoding uses ``c @ Π`` (``Πᵀ c``).
    Cached per ``(dim, seed)``; each call returns a fresh copy."""
    return _rotation(dim, seed).copy()


def qjl_matrix(dim: int, seed: int) -> np.ndarray:
    """QJL projection ``S`` (float32 ``[dim, dim]``) with i.i.d. N(0, 1) entries (rows of norm ≈ √dim,
    hence the estimator constant ``√(π/2)/dim``). Use a seed other than the rotation's."""
    return _gaussian(dim, seed).astype(np.float32)
