"""Lloyd–Max codebooks for one coordinate of a uniformly random unit vector (TurboQuant step 3).

A coordinate ``x`` of a unit vector drawn uniformly from the sphere in R^d has density
``∝ (1 − x²)^((d−3)/2)`` on ``[−1, 1]`` (``distribution="beta"``, exact), close to ``N(0, 1/d)`` for large
``d`` (``distribution="gaussian"``). The codebook is the ``2^b``-level scalar quantiser minimising
``E[(x − Q(x))²]`` for that density, found by Lloyd–Max iteration (cells = midpoints between
centroids, centroids = conditional means of their cells; Newton steps on that fixed point make it
converge in a few iterations even at 8 bits) with the cell integrals taken from cumulative moment
tables on a fine grid (2^18 intervals). numpy only; nothing is computed at import, results are
cached per ``(bits, dim, distribution)``.

The beta density is tabulated in the angle ``θ`` (``x = cos θ``, density ``∝ sin^(d−2) θ``), which is
smooth for every ``d ≥ 2`` (the ``x`` form is singular at ``±1`` for ``d = 2``).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Literal

import numpy as np

Distribution = Literal["beta", "gaussian"]
DISTRIBUTIONS: tuple[str, ...] = ("beta", "gaussian")

_Tables = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
_GRID = 2**18  # grid intervals of the moment tables
_GAUSS_RANGE = 12.0  # the tables span ±12 standard deviations (1/√d) at most
_TOL = 1e-11  # stop when no centroid moves more than this (in units of the coordinate std 1/√d)
_MAX_ITER = 10_000


def _check(bits: int, dim: int, distribution: str) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    if dim < 2:
        raise ValueError(f"dim must be >= 2, got {dim}")
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")


def _cumtrapz(y: np.ndarray, t: np.ndarray) -> np.ndarray:
    out = np.zeros_like(y)
    np.cumsum((y[1:] + y[:-1]) * 0.5 * np.diff(t), out=out[1:])
    return out


@lru_cache(maxsize=32)
def _moment_tables(dim: int, distribution: str) -> _Tables:
    """``(x, M0, M1, M2)``: nodes ``x`` increasing and ``Mk(x) = ∫_{−∞}^{x} tᵏ f(t) dt`` (``M0(∞) = 1``)."""
    if distribution == "beta":
        # x = cos θ increases along the table; past 12 standard deviations the mass is < 1e-30
        lim = min(1.0, _GAUSS_RANGE / math.sqrt(dim))
        theta = np.linspace(math.acos(-lim), math.acos(lim), _GRID + 1)
        x = np.cos(theta)
        x[0], x[-1] = -lim, lim
        # density in θ ∝ sin^(d−2) θ; dθ is negative along the table, so integrate over −θ.
        w = np.sin(theta) ** (dim - 2) if dim > 2 else np.ones_like(theta)
        t = -theta
    else:
        sigma = 1.0 / math.sqrt(dim)
        x = np.linspace(-_GAUSS_RANGE, _GAUSS_RANGE, _GRID + 1) * sigma
        w = np.exp(-0.5 * (x / sigma) ** 2)
        t = x
    z = _cumtrapz(w, t)[-1]
    m0, m1, m2 = (_cumtrapz(w * x**k / z, t) for k in (0, 1, 2))
    for m in (x, m0, m1, m2):
        m.setflags(write=False)
    return x, m0, m1, m2


def _cell_moments(centroids: np.ndarray, tables: _Tables) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mass, first and second moment of each midpoint cell of ``centroids``."""
    x, m0, m1, m2 = tables
    edges = np.concatenate(([x[0]], 0.5 * (centroids[1:] + centroids[:-1]), [x[-1]]))
    p, s1, s2 = (np.diff(np.interp(edges, x, m)) for m in (m0, m1, m2))
    return p, s1, s2


def _density(x: np.ndarray, dim: int, distribution: str) -> np.ndarray:
    """The density at ``x``, normalised like :func:`_moment_tables` (only used for Newton steps)."""
    if distribution == "beta":
        # ∫ sin^(d−2) θ dθ over [0, π] = √π Γ((d−1)/2) / Γ(d/2)
        log_z = 0.5 * math.log(math.pi) + math.lgamma((dim - 1) / 2) - math.lgamma(dim / 2)
        return np.exp((dim - 3) / 2 * np.log1p(-np.minimum(x * x, 1.0 - 1e-300)) - log_z)
    return np.exp(-0.5 * x * x * dim) * math.sqrt(dim / (2.0 * math.pi))


def _lloyd_step(c: np.ndarray, tables: _Tables) -> tuple[np.ndarray, np.ndarray]:
    """One Lloyd–Max update ``T(c)`` (centroids of the midpoint cells) and the cell masses."""
    p, s1, _ = _cell_moments(c, tables)
    new = np.where(p > 0, s1 / np.where(p > 0, p, 1.0), c)
    return 0.5 * (new - new[::-1]), p  # the density is even: keep the codebook exactly symmetric


@lru_cache(maxsize=64)
def _codebook(bits: int, dim: int, distribution: str) -> np.ndarray:
    """Lloyd–Max fixed point ``c = T(c)``, solved by Newton steps on ``T(c) − c`` (T's Jacobian is
    tridiagonal: centroid j moves only with its two edges), falling back to a plain Lloyd step when a
    Newton step would break the ordering or not shrink the residual."""
    tables = _moment_tables(dim, distribution)
    x, m0, _, _ = tables
    levels = 2**bits
    # start from the quantile midpoints: already close to the optimum
    c = np.interp((np.arange(levels) + 0.5) / levels, m0, x)
    tol = _TOL / math.sqrt(dim)
    t, p = _lloyd_step(c, tables)
    for _ in range(_MAX_ITER):
        residual = t - c
        size = float(np.max(np.abs(residual)))
        if size < tol:
            c = t
            break
        edges = 0.5 * (c[1:] + c[:-1])
        f = _density(edges, dim, distribution)
        pos = p > 0
        # ∂T_j/∂e_j = f(e_j)(T_j − e_j)/P_j (lower edge), ∂T_j/∂e_{j+1} = f(e_{j+1})(e_{j+1} − T_j)/P_j
        jac = np.zeros((levels, levels))
        inv_p = np.where(pos, 1.0 / np.where(pos, p, 1.0), 0.0)
        lower = f * (t[1:] - edges) * inv_p[1:]  # cell j+1's lower edge is e_j = (c_j + c_{j+1})/2
        upper = f * (edges - t[:-1]) * inv_p[:-1]  # cell j's upper edge
        idx = np.arange(levels - 1)
        jac[idx + 1, idx] += 0.5 * lower
        jac[idx + 1, idx + 1] += 0.5 * lower
        jac[idx, idx] += 0.5 * upper
        jac[idx, idx + 1] += 0.5 * upper
        try:
            step = np.linalg.solve(np.eye(levels) - jac, residual)
        except np.linalg.LinAlgError:
            step = residual
        cand = c + step
        if np.all(np.diff(cand) > 0):
            t_cand, p_cand = _lloyd_step(cand, tables)
            if float(np.max(np.abs(t_cand - cand))) < size:
                c, t, p = cand, t_cand, p_cand
                continue
        c = t
        if size < 1e3 * tol:  # Newton stalled at the tables' resolution: the Lloyd step is as good
            break
        t, p = _lloyd_step(c, tables)
    c.setflags(write=False)
    return c


def lloyd_max_codebook(bits: int, dim: int, *, distribution: Distribution = "beta") -> np.ndarray:
    """Sorted Lloyd–Max centroids (``float64 [2**bits]``, symmetric about 0) for one coordinate of a
    uniformly random unit vector in R^dim. Multiply by ``√dim`` to compare with the standard-normal
    Lloyd–Max tables (``distribution="gaussian"`` gives exactly those, scaled by ``1/√dim``)."""
    _check(bits, dim, distribution)
    return _codebook(bits, dim, distribution).copy()


def expected_distortion(bits: int, dim: int, *, distribution: Distribution = "beta") -> float:
    """``dim · E[(x − Q(x))²]`` for a coordinate ``x`` of the given distribution and its Lloyd–Max
    quantiser ``Q``: the expected squared error ``E‖u − ũ‖²`` of a quantised unit vector (D_mse)."""
    _check(bits, dim, distribution)
    c = _codebook(bits, dim, distribution)
    p, s1, s2 = _cell_moments(c, _moment_tables(dim, distribution))
    return float(dim * np.sum(s2 - 2.0 * c * s1 + c * c * p))


def distortion_bound(bits: int) -> float:
    """TurboQuant's upper bound on D_mse: ``(√3·π/2) · 4^−bits``."""
    return math.sqrt(3.0) * math.pi / 2.0 * 4.0**-bits


def midpoints(codebook: np.ndarray) -> np.ndarray:
    """Decision thresholds of a sorted float32 codebook: ``(c[i] + c[i+1]) / 2`` in float32, the
    boundaries both encoders search (a value equal to a threshold takes the lower index)."""
    c = np.asarray(codebook, dtype=np.float32)
    return ((c[1:] + c[:-1]) / np.float32(2.0)).astype(np.float32)
