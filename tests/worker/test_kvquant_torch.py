"""Torch encoders of the compressed KV formats write what the numpy decoders of ``storage.kvquant``
read: torch encode → numpy decode equals torch decode, on CPU and (marked ``gpu``) on CUDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from storage import kvquant as nq
from worker.kvquant import KIVI, TurboQuantMSE, TurboQuantProd, pack_bits, to_numpy, unpack_bits

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")],
    ),
]


def _keys(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Key-like data: per-channel offsets and scales, a few large channels, one zero vector."""
    g = torch.Generator().manual_seed(seed)
    dim = shape[-1]
    x = torch.randn(shape, generator=g) * (torch.rand(dim, generator=g) * 2 + 0.2) + torch.randn(
        dim, generator=g
    )
    x[..., :2] *= 8.0
    x.reshape(-1, dim)[0] = 0.0
    return x


@pytest.mark.parametrize("device", DEVICES)
def test_bit_packing_matches_numpy_bytes(device: str) -> None:
    rng = np.random.default_rng(0)
    for bits in range(1, 9):
        for count in (1, 5, 13, 64, 127):
            codes = rng.integers(0, 2**bits, (3, 2, count), dtype=np.uint8)
            packed = pack_bits(torch.from_numpy(codes).to(device), bits)
            assert packed.dtype == torch.uint8 and packed.device.type == device
            np.testing.assert_array_equal(packed.cpu().numpy(), nq.pack_bits(codes, bits))
            np.testing.assert_array_equal(unpack_bits(packed, bits, count).cpu().numpy(), codes)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("dim", "bits"), [(64, 1), (64, 3), (128, 2), (128, 4), (96, 3)])
def test_mse_torch_encode_numpy_decode(device: str, dim: int, bits: int) -> None:
    quant = TurboQuantMSE(dim, bits, seed=3, device=device)
    x = _keys((4, 60, dim), seed=dim + bits).to(device)
    enc = quant.encode(x)
    assert (
        enc["idx_packed"].shape == (4, 60, nq.packed_size(dim, bits))
        and enc["idx_packed"].dtype == torch.uint8
    )
    assert enc["norms"].shape == (4, 60) and enc["norms"].dtype == torch.float16
    arrays = to_numpy(enc)
    idx, _ = quant.indices(x)
    np.testing.assert_array_equal(
        nq.unpack_bits(arrays["idx_packed"], bits, dim), idx.cpu().numpy()
    )  # bit-exact
    codebook = nq.lloyd_max_codebook(bits, dim).astype(np.float32)
    rot = nq.rotation_matrix(dim, 3)
    np.testing.assert_array_equal(quant.codebook.cpu().numpy(), codebook)
    np.testing.assert_array_equal(quant.rotation.cpu().numpy(), rot)
    dec_np = nq.mse_decode(arrays["idx_packed"], arrays["norms"], codebook, rot, bits, dim)
    dec_t = quant.decode(enc).cpu().numpy()
    scale = np.abs(dec_np).max()
    np.testing.assert_allclose(dec_t, dec_np, rtol=1e-6, atol=1e-6 * scale)
    assert np.all(dec_np[0, 0] == 0)  # the zero vector
    # against the numpy reference encoder: float32 rotations differ only in the last bits, so at most
    # a rare coordinate on a decision threshold takes the neighbouring index
    ref = nq.mse_encode(x.cpu().numpy(), codebook, rot, bits)
    np.testing.assert_array_equal(ref["norms"], arrays["norms"])
    diff = np.abs(nq.unpack_bits(ref["idx_packed"], bits, dim).astype(int) - idx.cpu().numpy().astype(int))
    assert diff.max() <= 1 and diff.mean() < 1e-3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("dim", "bits"), [(64, 2), (128, 3), (128, 4)])
def test_prod_torch_encode_numpy_estimator(device: str, dim: int, bits: int) -> None:
    quant = TurboQuantProd(dim, bits, seed=5, qjl_seed=6, device=device)
    k = _keys((2, 80, dim), seed=bits).to(device)
    q = torch.randn((2, 9, dim), generator=torch.Generator().manual_seed(1)).to(device)
    enc = quant.encode(k)
    shapes = {name: (tuple(t.shape), t.dtype) for name, t in enc.items()}
    assert shapes == {
        "idx_packed": ((2, 80, nq.packed_size(dim, bits - 1)), torch.uint8),
        "norms": ((2, 80), torch.float16),
        "signs_packed": ((2, 80, dim // 8), torch.uint8),
        "gamma": ((2, 80), torch.float16),
    }
    a = to_numpy(enc)
    codebook = nq.lloyd_max_codebook(bits - 1, dim).astype(np.float32)
    rot, s = nq.rotation_matrix(dim, 5), nq.qjl_matrix(dim, 6)
    np.testing.assert_array_equal(quant.qjl.cpu().numpy(), s)
    mse_np = nq.prod_decode(a["idx_packed"], a["norms"], codebook, rot, bits, dim)
    mse_t = quant.decode_mse(enc).cpu().numpy()
    np.testing.assert_allclose(mse_t, mse_np, rtol=1e-6, atol=1e-6 * np.abs(mse_np).max())
    # the sign bits are those of S r for the residual against the decoded MSE part
    r = k.cpu().numpy() - mse_np
    signs = nq.unpack_bits(a["signs_packed"], 1, dim)
    sr = r @ s.T
    confident = np.abs(sr) > 1e-4 * np.abs(sr).max()
    np.testing.assert_array_equal(signs[confident], (sr >= 0)[confident])
    np.testing.assert_allclose(
        a["gamma"].astype(np.float32), np.linalg.norm(r, axis=-1), rtol=1e-3, atol=1e-4
    )
    # estimator: numpy on the torch arrays = torch
    scores_np = nq.prod_scores(q.cpu().numpy(), mse_np, a["signs_packed"], a["gamma"], s)
    scores_t = quant.scores(q, enc).cpu().numpy()
    tol = 1e-6 * np.abs(scores_np).max()
    np.testing.assert_allclose(scores_t, scores_np, rtol=1e-6, atol=tol)
    ip_np = nq.prod_inner_product(q.cpu().numpy()[:, :1], mse_np, a["signs_packed"], a["gamma"], s)
    ip_t = quant.inner_product(q[:, :1], enc).cpu().numpy()
    np.testing.assert_allclose(ip_t, ip_np, rtol=1e-6, atol=tol)
    np.testing.assert_allclose(ip_t, scores_t[:, 0], rtol=1e-5, atol=10 * tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("bits", "dim", "length", "residual"), [(2, 64, 300, 128), (3, 72, 200, 0), (4, 128, 97, 16)]
)
def test_kivi_torch_matches_numpy_bit_for_bit(
    device: str, bits: int, dim: int, length: int, residual: int
) -> None:
    kivi = KIVI(bits, group=32, residual=residual)
    x = _keys((2, 3, length, dim), seed=bits)
    for dtype in (torch.float32, torch.bfloat16):
        xd = x.to(device, dtype)
        xn = xd.to(torch.float32).cpu().numpy()
        for kind, enc_t, dec_t, enc_n, dec_n in (
            ("keys", kivi.encode_keys, kivi.decode_keys, nq.kivi_encode_keys, nq.kivi_decode_keys),
            ("values", kivi.encode_values, kivi.decode_values, nq.kivi_encode_values, nq.kivi_decode_values),
        ):
            enc = enc_t(xd)
            arrays = to_numpy(enc)
            ref = enc_n(xn, bits, 32, residual)
            assert set(arrays) == set(ref)
            for name, want in ref.items():
                assert arrays[name].dtype == want.dtype and arrays[name].shape == want.shape, (kind, name)
                np.testing.assert_array_equal(arrays[name], want, err_msg=f"{kind} {name}")
            decoded_np = dec_n(
                arrays["codes_packed"], arrays["scale"], arrays["zero"], arrays["residual"], bits, dim, 32
            )
            decoded_t = dec_t(enc, dim).cpu().numpy()
            np.testing.assert_array_equal(decoded_t, decoded_np)
            assert decoded_np.shape == xn.shape
            tq = nq.quantized_tokens(length, 32, residual, kind=kind)
            np.testing.assert_array_equal(decoded_np[..., tq:, :], xn[..., tq:, :].astype(np.float16))


def test_encoders_validate_arguments_and_report_params() -> None:
    with pytest.raises(ValueError):
        TurboQuantProd(64, 3, seed=1, qjl_seed=1)
    with pytest.raises(ValueError):
        TurboQuantProd(64, 1, seed=1, qjl_seed=2)
    with pytest.raises(ValueError):
        KIVI(9)
    params = TurboQuantProd(64, 3, seed=1, qjl_seed=2).params
    assert params["method"] == "prod" and params["mse_bits"] == 2 and params["qjl_seed"] == 2
    assert KIVI(2).params == {"method": "kivi", "bits": 2, "group": 32, "residual": 128}
