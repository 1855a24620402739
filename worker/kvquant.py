"""Torch encoders of the compressed KV formats, run on the worker's device while the cache is produced.

They write exactly the arrays that ``storage.kvquant`` documents and decodes with numpy alone:
TurboQuant ``mse`` (:class:`TurboQuantMSE`, values and MSE-only keys), TurboQuant ``prod``
(:class:`TurboQuantProd`, keys with the unbiased inner-product estimator) and :class:`KIVI`.
Codebooks, the rotation ``Π`` and the QJL matrix ``S`` are the numpy arrays of ``storage.kvquant``
moved to the device, so encoder and decoder share them. Bit packing produces the same bytes as
:func:`storage.kvquant.bitpack.pack_bits` (little-endian bit order along the last axis).

Arithmetic is float32 whatever the input dtype. KIVI codes, scales and zeros equal the numpy
reference bit for bit on CPU and CUDA (IEEE division and round-half-even in both). TurboQuant indices
depend on the rotation matmul, whose float32 rounding differs between BLAS libraries, so a coordinate
lying within ~1e-7 of a decision threshold can take the neighbouring index; keep TF32 matmuls off
(``torch.backends.cuda.matmul.allow_tf32 = False``, the default) while encoding.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from storage.kvquant.bitpack import packed_size
from storage.kvquant.codebook import Distribution, lloyd_max_codebook, midpoints
from storage.kvquant.kivi import quantized_tokens
from storage.kvquant.rotation import qjl_matrix, rotation_matrix
from storage.kvquant.turboquant import QJL_SCALE

Encoded = dict[str, torch.Tensor]


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes ``[..., n]`` (each ``< 2**bits``, not checked) → uint8 ``[..., ceil(n·bits/8)]``."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    lead, n = codes.shape[:-1], codes.shape[-1]
    codes = codes.to(torch.uint8)
    shifts = torch.arange(bits, device=codes.device, dtype=torch.uint8)
    stream = ((codes.unsqueeze(-1) >> shifts) & 1).reshape(*lead, n * bits)
    nbytes = packed_size(n, bits)
    pad = nbytes * 8 - n * bits
    if pad:
        stream = torch.cat([stream, stream.new_zeros(*lead, pad)], dim=-1)
    stream = stream.reshape(*lead, nbytes, 8)
    out = stream[..., 0].clone()
    for k in range(1, 8):
        out |= stream[..., k] << k
    return out


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: uint8 ``[..., count]``."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    lead = packed.shape[:-1]
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    stream = ((packed.unsqueeze(-1) >> shifts) & 1).reshape(*lead, packed.shape[-1] * 8)
    stream = stream[..., : count * bits].reshape(*lead, count, bits)
    out = stream[..., 0].clone()
    for k in range(1, bits):
        out |= stream[..., k] << k
    return out


def to_numpy(encoded: Encoded) -> dict[str, np.ndarray]:
    """The encoded arrays on the host, ready to store (dtypes kept)."""
    return {name: t.detach().cpu().numpy() for name, t in encoded.items()}


def _tensor(a: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(device)


class TurboQuantMSE:
    """``Q_mse`` with ``bits`` (1..8) bits for vectors of ``dim``: ``encode(x [..., dim])`` →
    ``{"idx_packed": uint8 [..., ceil(dim·bits/8)], "norms": float16 [...]}``."""

    def __init__(
        self,
        dim: int,
        bits: int,
        seed: int,
        device: torch.device | str = "cpu",
        *,
        distribution: Distribution = "beta",
    ) -> None:
        self.dim, self.bits, self.seed, self.distribution = dim, bits, seed, distribution
        self.device = torch.device(device)
        codebook = lloyd_max_codebook(bits, dim, distribution=distribution).astype(np.float32)
        self.codebook = _tensor(codebook, self.device)
        self.boundaries = _tensor(midpoints(codebook), self.device)
        self.rotation = _tensor(rotation_matrix(dim, seed), self.device)

    @property
    def params(self) -> dict[str, Any]:
        return {
            "method": "mse",
            "dim": self.dim,
            "bits": self.bits,
            "seed": self.seed,
            "distribution": self.distribution,
            "rotation": "qr",
        }

    def indices(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unpacked codebook indices (uint8 ``[..., dim]``) and float16 norms of ``x``."""
        x = x.to(self.device, torch.float32)
        norms = torch.linalg.vector_norm(x, dim=-1)
        u = x / torch.where(norms > 0, norms, torch.ones_like(norms)).unsqueeze(-1)
        y = u @ self.rotation.T
        return torch.bucketize(y, self.boundaries).to(torch.uint8), norms.to(torch.float16)

    def encode(self, x: torch.Tensor) -> Encoded:
        idx, norms = self.indices(x)
        return {"idx_packed": pack_bits(idx, self.bits), "norms": norms}

    def decode(self, encoded: Encoded) -> torch.Tensor:
        """``x̃ = ‖x‖ Πᵀ c[idx]``, float32 ``[..., dim]``."""
        idx = unpack_bits(encoded["idx_packed"].to(self.device), self.bits, self.dim)
        norms = encoded["norms"].to(self.device, torch.float32)
        return (self.codebook[idx.long()] @ self.rotation) * norms.unsqueeze(-1)


class TurboQuantProd:
    """``Q_prod`` with ``bits`` (2..9) bits for keys: ``bits − 1``-bit :class:`TurboQuantMSE` plus the
    1-bit QJL signs of the residual. ``encode`` adds ``"signs_packed"`` (uint8 ``[..., ceil(dim/8)]``,
    1 = ``(S r)_i ≥ 0``) and ``"gamma"`` (float16 ``‖r‖``) to the MSE arrays."""

    def __init__(
        self,
        dim: int,
        bits: int,
        seed: int,
        qjl_seed: int,
        device: torch.device | str = "cpu",
        *,
        distribution: Distribution = "beta",
    ) -> None:
        if not 2 <= bits <= 9:
            raise ValueError(f"prod bits must be in 2..9, got {bits}")
        if qjl_seed == seed:
            raise ValueError("the QJL matrix needs a seed other than the rotation's")
        self.dim, self.bits, self.seed, self.qjl_seed = dim, bits, seed, qjl_seed
        self.mse = TurboQuantMSE(dim, bits - 1, seed, device, distribution=distribution)
        self.device = self.mse.device
        self.qjl = _tensor(qjl_matrix(dim, qjl_seed), self.device)

    @property
    def params(self) -> dict[str, Any]:
        return {
            **self.mse.params,
            "method": "prod",
            "bits": self.bits,
            "mse_bits": self.bits - 1,
            "qjl_seed": self.qjl_seed,
            "qjl": "gaussian",
        }

    def encode(self, x: torch.Tensor) -> Encoded:
        x = x.to(self.device, torch.float32)
        encoded = self.mse.encode(x)
        r = x - self.mse.decode(encoded)
        signs = (r @ self.qjl.T >= 0).to(torch.uint8)
        encoded["signs_packed"] = pack_bits(signs, 1)
        encoded["gamma"] = torch.linalg.vector_norm(r, dim=-1).to(torch.float16)
        return encoded

    def decode_mse(self, encoded: Encoded) -> torch.Tensor:
        """The MSE part ``x̃_mse`` (float32 ``[..., dim]``); only :meth:`inner_product` is unbiased."""
        return self.mse.decode(encoded)

    def _qjl_parts(
        self, q: torch.Tensor, encoded: Encoded
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q = q.to(self.device, torch.float32)
        signs = unpack_bits(encoded["signs_packed"].to(self.device), 1, self.dim).to(torch.float32)
        signs = signs * 2.0 - 1.0
        scale = encoded["gamma"].to(self.device, torch.float32) * (QJL_SCALE / self.dim)
        return q, signs, scale

    def inner_product(self, q: torch.Tensor, encoded: Encoded) -> torch.Tensor:
        """``⟨q, k̃_mse⟩ + γ·√(π/2)/d·⟨S q, sign(S r)⟩`` elementwise over broadcast leading axes."""
        q, signs, scale = self._qjl_parts(q, encoded)
        qjl_term = ((q @ self.qjl.T) * signs).sum(-1)
        return (q * self.decode_mse(encoded)).sum(-1) + scale * qjl_term

    def dequantize(self, encoded: Encoded) -> torch.Tensor:
        """``x̃_mse + γ·√(π/2)/d·Sᵀ sign(S r)``: the key vector whose inner product with any query is
        the unbiased estimate (as :func:`storage.kvquant.turboquant.prod_dequantize`)."""
        _, signs, scale = self._qjl_parts(torch.zeros(1, device=self.device), encoded)
        return self.decode_mse(encoded) + scale.unsqueeze(-1) * (signs @ self.qjl)

    def scores(self, q: torch.Tensor, encoded: Encoded) -> torch.Tensor:
        """Estimated ``q Kᵀ``: ``q [..., Nq, d]`` against keys encoded as ``[..., T]`` → ``[..., Nq, T]``."""
        q, signs, scale = self._qjl_parts(q, encoded)
        qjl_term = (q @ self.qjl.T) @ signs.transpose(-1, -2)
        return q @ self.decode_mse(encoded).transpose(-1, -2) + scale.unsqueeze(-2) * qjl_term


def _f16_toward(a: torch.Tensor, up: bool) -> torch.Tensor:
    """float32 → the nearest float16 on the given side (``up``: smallest ≥ a, else largest ≤ a)."""
    h = a.to(torch.float16)
    wrong = h.to(torch.float32) < a if up else h.to(torch.float32) > a
    target = torch.full_like(h, math.inf if up else -math.inf)
    return torch.where(wrong, torch.nextafter(h, target), h)


class KIVI:
    """KIVI with ``bits`` (1..8) bits, groups of ``group`` and a float16 window of the ``residual`` most
    recent tokens; arrays and rules as in :mod:`storage.kvquant.kivi` (keys per channel over token
    groups, values per token over channel groups). Inputs ``[..., T, d]`` on any device."""

    def __init__(self, bits: int, group: int = 32, residual: int = 128) -> None:
        if not 1 <= bits <= 8 or group < 1 or residual < 0:
            raise ValueError(f"need bits in 1..8, group >= 1, residual >= 0; got {bits}, {group}, {residual}")
        self.bits, self.group, self.residual = bits, group, residual
        self.levels = (1 << bits) - 1

    @property
    def params(self) -> dict[str, Any]:
        return {"method": "kivi", "bits": self.bits, "group": self.group, "residual": self.residual}

    def _scale_zero(self, mn: torch.Tensor, mx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        zero = _f16_toward(mn, up=False)
        # divide by a full tensor: CUDA turns division by a scalar into a multiplication by its reciprocal
        scale = _f16_toward((mx - zero.to(torch.float32)) / torch.full_like(mx, self.levels), up=True)
        return scale, zero

    def _codes(self, x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        s = scale.to(torch.float32)
        q = torch.round((x - zero.to(torch.float32)) / torch.where(s > 0, s, torch.ones_like(s)))
        q = torch.where(s > 0, q, torch.zeros_like(q))
        return q.clamp(0, self.levels).to(torch.uint8)

    def encode_keys(self, k: torch.Tensor) -> Encoded:
        k = k.to(torch.float32)
        length, dim = k.shape[-2:]
        tq = quantized_tokens(length, self.group, self.residual, kind="keys")
        xq = k[..., :tq, :].reshape(*k.shape[:-2], tq // self.group, self.group, dim)
        scale, zero = self._scale_zero(xq.amin(dim=-2), xq.amax(dim=-2))
        codes = self._codes(xq, scale.unsqueeze(-2), zero.unsqueeze(-2)).reshape(*k.shape[:-2], tq, dim)
        return {
            "codes_packed": pack_bits(codes, self.bits),
            "scale": scale,
            "zero": zero,
            "residual": k[..., tq:, :].to(torch.float16),
        }

    def decode_keys(self, encoded: Encoded, dim: int) -> torch.Tensor:
        codes = unpack_bits(encoded["codes_packed"], self.bits, dim).to(torch.float32)
        lead, tq = codes.shape[:-2], codes.shape[-2]
        g = codes.reshape(*lead, tq // self.group, self.group, dim)
        scale, zero = (encoded[name].to(torch.float32).unsqueeze(-2) for name in ("scale", "zero"))
        deq = g * scale + zero
        return torch.cat([deq.reshape(codes.shape), encoded["residual"].to(torch.float32)], dim=-2)

    def encode_values(self, v: torch.Tensor) -> Encoded:
        v = v.to(torch.float32)
        length, dim = v.shape[-2:]
        tq = quantized_tokens(length, self.group, self.residual, kind="values")
        xq = v[..., :tq, :]
        n = -(-dim // self.group)
        pad = n * self.group - dim
        if pad:  # the partial last channel group, padded with its last channel (same min and max)
            xq = torch.cat([xq, xq[..., -1:].expand(*xq.shape[:-1], pad)], dim=-1)
        xg = xq.reshape(*xq.shape[:-1], n, self.group)
        scale, zero = self._scale_zero(xg.amin(dim=-1), xg.amax(dim=-1))
        codes = self._codes(xg, scale.unsqueeze(-1), zero.unsqueeze(-1)).reshape(*xq.shape)[..., :dim]
        return {
            "codes_packed": pack_bits(codes, self.bits),
            "scale": scale,
            "zero": zero,
            "residual": v[..., tq:, :].to(torch.float16),
        }

    def decode_values(self, encoded: Encoded, dim: int) -> torch.Tensor:
        codes = unpack_bits(encoded["codes_packed"], self.bits, dim).to(torch.float32)
        s = encoded["scale"].to(torch.float32).repeat_interleave(self.group, dim=-1)[..., :dim]
        z = encoded["zero"].to(torch.float32).repeat_interleave(self.group, dim=-1)[..., :dim]
        return torch.cat([codes * s + z, encoded["residual"].to(torch.float32)], dim=-2)
