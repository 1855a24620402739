"""Compressed KV export: complete fidelity report, numpy reader = worker dequantisation, stored
bytes next to the theoretical ratio."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import xarray as xr

from storage.kvquant.reader import KVBundle
from worker.kvfidelity import METRICS
from worker.kvquant import KIVI, TurboQuantMSE, TurboQuantProd

from .export_helpers import export

# head_dim 32, grouped-query attention with 2 query heads per kv head
KV_MODEL = {
    "hidden_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
}
METHODS = [{"method": m, "bits": 3} for m in ("turboquant_prod", "turboquant_mse", "kivi")]


@pytest.fixture(scope="module")
def kv_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    from .tiny_models import build_tiny_model

    root = tmp_path_factory.mktemp("kv")
    folder = build_tiny_model("llama", root / "m", overrides=KV_MODEL)
    spec = {
        "model": {"id": str(folder)},
        "prompts": ["abc def " * 40, "hello"],
        "generation": {"max_new_tokens": 5, "stop_at_eos": False},
        "capture": {"qkv": True, "attention": False},
        "kv_compression": METHODS,
    }
    ds, _, _ = export(spec, root / "b.zarr")
    return root / "b.zarr", ds


def test_fidelity_report_is_complete(kv_bundle: tuple[Path, Any]) -> None:
    path, ds = kv_bundle
    report = ds.attrs["kv_compression"]
    assert sorted(report) == ["kivi_3", "turboquant_mse_3", "turboquant_prod_3"]
    for name, entry in report.items():
        group = xr.open_zarr(str(path), group=f"kv/{name}", zarr_format=3)
        for metric in METRICS:
            values = group[f"fidelity_{metric}"].values
            assert values.shape == (2, 2) and np.isfinite(values).all(), (name, metric)
        # every real query row of both query heads reading each kv head
        assert (group["fidelity_rows"].values == 2 * int(ds["length"].sum())).all()
        assert 0 < entry["fidelity"]["score_cosine"] <= 1 and 0 <= entry["fidelity"]["top1"] <= 100
        assert entry["stored_bytes"] > 0 and entry["stored_ratio"] > 1 and entry["theoretical_ratio"] > 1
        assert group.attrs["params"]["bits"] == 3


def test_numpy_reader_equals_worker_dequantisation(kv_bundle: tuple[Path, Any]) -> None:
    path, ds = kv_bundle
    reader = KVBundle(path)
    dim = int(ds.sizes["head_dim"])
    for b in range(2):
        length = int(ds["length"][b])
        k = torch.from_numpy(ds["k"][0, b, :, :length].values)
        v = torch.from_numpy(ds["v"][0, b, :, :length].values)
        q = ds["q"][0, b, ::2, :length].values  # one query head per kv head
        mse = TurboQuantMSE(dim, 3, 0)
        k_hat, v_hat = reader.dequantize("turboquant_mse_3", 0, b)
        np.testing.assert_allclose(k_hat, mse.decode(mse.encode(k)).numpy(), atol=1e-5)
        np.testing.assert_allclose(v_hat, mse.decode(mse.encode(v)).numpy(), atol=1e-5)
        prod = TurboQuantProd(dim, 3, 0, 1)
        want = prod.scores(torch.from_numpy(q), prod.encode(k)).numpy()
        np.testing.assert_allclose(reader.scores("turboquant_prod_3", 0, b, q), want, rtol=1e-4, atol=1e-4)
        kivi = KIVI(3)
        k_hat, v_hat = reader.dequantize("kivi_3", 0, b)
        np.testing.assert_allclose(k_hat, kivi.decode_keys(kivi.encode_keys(k), dim).numpy(), atol=1e-6)
        np.testing.assert_allclose(v_hat, kivi.decode_values(kivi.encode_values(v), dim).numpy(), atol=1e-6)
        if length <= 128:  # shorter than KIVI's residual window: kept exactly (fp16)
            np.testing.assert_allclose(k_hat, k.numpy(), atol=2e-3, rtol=1e-3)


def test_duplicate_methods_and_foreign_parameters_are_refused() -> None:
    from pydantic import ValidationError

    from storage.jobs.spec import JobSpec

    base = {"model": {"id": "a/b"}, "prompts": ["x"]}
    with pytest.raises(ValidationError, match="more than once"):
        JobSpec.model_validate({**base, "kv_compression": [{"method": "kivi", "bits": 2}] * 2})
    with pytest.raises(ValidationError, match="KIVI parameters"):
        JobSpec.model_validate(
            {**base, "kv_compression": [{"method": "turboquant_mse", "bits": 2, "group": 16}]}
        )


@pytest.mark.slow
def test_smollm2_three_methods_at_3_bits(smollm2_id: str, tmp_path: Path) -> None:
    # ~1,130 tokens of a frozen text (the README changes; this test's figures must not)
    prompt = (Path(__file__).resolve().parents[2] / "scripts" / "data" / "long-prompt.txt").read_text()[:3600]
    spec = {
        "model": {"id": smollm2_id},
        "prompts": [prompt],
        "generation": {"max_new_tokens": 4},
        "capture": {"attention": False, "qkv": True},
        "kv_compression": METHODS,
    }
    ds, _, _ = export(spec, tmp_path / "b.zarr")
    length = int(ds["length"][0])
    assert length >= 1024
    for name, entry in ds.attrs["kv_compression"].items():
        ratio = entry["stored_ratio"] / entry["theoretical_ratio"]
        assert 0.9 <= ratio <= 1.1, (
            f"{name}: stored {entry['stored_ratio']} vs theoretical {entry['theoretical_ratio']}"
        )
        group = xr.open_zarr(str(tmp_path / "b.zarr"), group=f"kv/{name}", zarr_format=3)
        assert (
            group["fidelity_score_cosine"].shape == (30, 3) and np.isfinite(group["fidelity_kl"].values).all()
        )
    # the numpy reader's dequantisation equals the worker's own, on the real model's keys and values
    reader, dim = KVBundle(tmp_path / "b.zarr"), 64
    for layer in (0, 29):
        k = torch.from_numpy(ds["k"][layer, 0, :, :length].values)
        v = torch.from_numpy(ds["v"][layer, 0, :, :length].values)
        mse = TurboQuantMSE(dim, 3, 0)
        k_hat, v_hat = reader.dequantize("turboquant_mse_3", layer, 0)
        # the worker encoded row blocks as they came; re-encoding the whole sequence at once can round a
        # coordinate lying on a decision threshold the other way (float32 matmul of another shape)
        for got, want in (
            (k_hat, mse.decode(mse.encode(k)).numpy()),
            (v_hat, mse.decode(mse.encode(v)).numpy()),
        ):
            assert np.mean(np.abs(got - want) > 1e-4) < 1e-3
        kivi = KIVI(3)
        k_hat, v_hat = reader.dequantize("kivi_3", layer, 0)
        np.testing.assert_allclose(k_hat, kivi.decode_keys(kivi.encode_keys(k), dim).numpy(), atol=1e-5)
        np.testing.assert_allclose(v_hat, kivi.decode_values(kivi.encode_values(v), dim).numpy(), atol=1e-5)


def test_generation_check_reports_token_agreement(tmp_path: Path) -> None:
    """Greedy decoding from the compressed prompt cache: a KIVI window covering the whole prompt
    keeps every key exact, so agreement is 100 %; 2-bit TurboQuant is reported as it is."""
    from .tiny_models import build_tiny_model

    folder = build_tiny_model("llama", tmp_path / "m", overrides=KV_MODEL)
    spec = {
        "model": {"id": str(folder)},
        "prompts": ["abc def " * 12, "hi"],
        "generation": {"max_new_tokens": 8},
        "capture": {"attention": False, "alternatives": True},
        "kv_compression": [
            {"method": "kivi", "bits": 2, "residual": 512, "check_generation": True},
            {"method": "turboquant_mse", "bits": 2, "check_generation": True},
        ],
    }
    ds, _, _ = export(spec, tmp_path / "b.zarr")
    exact_check = ds.attrs["kv_compression"]["kivi_2"]["generation_check"]
    assert exact_check["token_agreement"] == 100.0 and exact_check["tokens_compared"] == 16
    assert exact_check["first_divergence"] == [None, None]
    lossy = ds.attrs["kv_compression"]["turboquant_mse_2"]["generation_check"]
    assert 0.0 <= lossy["token_agreement"] <= 100.0 and lossy["tokens_compared"] == 16
