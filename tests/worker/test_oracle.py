"""Correctness oracle: exported attention equals HF eager attention (output_attentions=True), and
exported q/k/v equal what the attention function consumed — for a padded batch of two prompts of
different lengths, prompt rows and generated rows, across architectures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from .export_helpers import export
from .oracle import eager_attentions, recorded_qkv

PROMPTS = ["The quick brown fox jumps over the lazy dog, twice.", "Hi there"]
ATOL_FP16 = 2e-3  # fp16 storage: half-ulp at 1.0 is 4.9e-4; probabilities computed in fp32


def _spec(model_id: str, **capture: Any) -> dict[str, Any]:
    return {
        "model": {"id": model_id},
        "prompts": PROMPTS,
        "generation": {"max_new_tokens": 5, "stop_at_eos": False},
        "capture": {"attention": True, "qkv": True, **capture},
        "storage": {"chunk_rows": 16},  # several row blocks per sequence, partial last blocks
    }


def _check_against_oracle(ds: Any, folder: str, atol: float, check_qkv: bool = True) -> None:
    layers = ds["layer"].values.tolist()
    heads = ds["head"].values.tolist()
    kv_heads = ds["kv_head"].values.tolist()
    for b in range(ds.sizes["batch"]):
        length = int(ds["length"][b])
        prompt_length = int(ds["prompt_length"][b])
        assert length > prompt_length, "generated rows must be present"
        tokens = ds["tokens"][b, :length].values.tolist()
        assert (ds["tokens"][b, length:].values == -1).all()
        reference = eager_attentions(folder, tokens)
        for lp, layer in enumerate(layers):
            got = ds["attention"][lp, b].values.astype(np.float32)  # [H, T, T]
            ref = reference[layer][heads]
            np.testing.assert_allclose(
                got[:, :length, :length], ref, atol=atol, rtol=0, err_msg=f"layer {layer} sequence {b}"
            )
            assert not got[:, length:, :].any() and not got[:, :, length:].any(), "padding leaked"
            np.testing.assert_allclose(got[:, :length].sum(-1), 1.0, atol=5e-3)
        if check_qkv:
            seen = recorded_qkv(folder, tokens)
            for lp, layer in enumerate(layers):
                q, k, v = seen[layer]
                np.testing.assert_allclose(ds["q"][lp, b, :, :length].values, q[heads], atol=1e-4, rtol=1e-4)
                np.testing.assert_allclose(
                    ds["k"][lp, b, :, :length].values, k[kv_heads], atol=1e-4, rtol=1e-4
                )
                np.testing.assert_allclose(
                    ds["v"][lp, b, :, :length].values, v[kv_heads], atol=1e-4, rtol=1e-4
                )
                assert not ds["q"][lp, b, :, length:].values.any()


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "gpt2"])
def test_tiny_models_match_eager(kind: str, tiny_model_dir: Any, tmp_path: Path) -> None:
    folder = str(tiny_model_dir(kind))
    ds, hooks, _ = export(_spec(folder), tmp_path / "b.zarr")
    assert ds.attrs["complete"] is True and ds.attrs["model"]["model_type"] == kind
    _check_against_oracle(ds, folder, ATOL_FP16)
    assert hooks.units == hooks.units_total == 2 * (1 + 5)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_row_blocks_larger_than_a_sub_block_match_eager(
    kind: str, tiny_model_dir: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Row blocks larger than ``SUB_BLOCK_ROWS``: each block's probabilities are computed in causal
    sub-blocks over the keys up to each sub-block's last row (zeros right of it), prompt and
    generated rows. (Sub-blocks of 32 rows in 128-row chunks: the
    tiny models have 256 positions. A padded batch, and the sliding-window model, whose calls carry
    the model's mask, take the masked path, tested above.)"""
    import worker.capture.session as session

    monkeypatch.setattr(session, "SUB_BLOCK_ROWS", 32)
    folder = str(tiny_model_dir(kind))
    spec = _spec(folder)
    spec["prompts"] = [" ".join(PROMPTS) * 3]  # ~190 tokens: 2 row blocks; no padding: the fast path
    spec["storage"]["chunk_rows"] = 128
    ds, _, _ = export(spec, tmp_path / "b.zarr")
    assert 128 + 32 < int(ds["prompt_length"][0]) < 250
    _check_against_oracle(ds, folder, ATOL_FP16, check_qkv=False)


def test_sliding_window_is_respected(tiny_model_dir: Any, tmp_path: Path) -> None:
    folder = str(tiny_model_dir("mistral"))  # sliding_window=6, prompts far longer
    ds, _, _ = export(_spec(folder), tmp_path / "b.zarr")
    length = int(ds["length"][0])
    att = ds["attention"][0, 0].values.astype(np.float32)
    assert length > 20
    nonzero_per_row = (att[:, :length, :length] > 0).sum(-1)
    assert nonzero_per_row.max() == 6
    assert (np.tril(np.ones((length, length)), -6) * att[:, :length, :length]).max() == 0


def test_layer_and_head_selection(tiny_model_dir: Any, tmp_path: Path) -> None:
    folder = str(tiny_model_dir("llama"))  # 4 query heads, 2 kv heads
    ds, _, _ = export(_spec(folder, layers=[1], heads=[3]), tmp_path / "b.zarr")
    assert ds["layer"].values.tolist() == [1] and ds["head"].values.tolist() == [3]
    assert ds["kv_head"].values.tolist() == [1]  # head 3 reads kv head 3 // 2
    _check_against_oracle(ds, folder, ATOL_FP16)


def test_float32_storage_is_tighter(tiny_model_dir: Any, tmp_path: Path) -> None:
    folder = str(tiny_model_dir("qwen2"))
    spec = _spec(folder)
    spec["storage"]["attention_dtype"] = "float32"
    ds, _, _ = export(spec, tmp_path / "b.zarr")
    assert ds["attention"].dtype == np.float32
    _check_against_oracle(ds, folder, 1e-5, check_qkv=False)


@pytest.mark.slow
def test_smollm2_matches_eager(smollm2_id: str, tmp_path: Path) -> None:
    ds, _, lm = export(_spec(smollm2_id, layers=[0, 1, 14, 29]), tmp_path / "b.zarr")
    assert ds.attrs["model"]["num_layers"] == 30 and ds.attrs["model"]["num_kv_heads"] == 3
    _check_against_oracle(ds, lm.folder, ATOL_FP16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_cuda_bf16_matches_eager(kind: str, tiny_model_dir: Any, tmp_path: Path) -> None:
    """bf16 weights on GPU. Tolerance 2e-2: eager computes Q·Kᵀ in bf16 (8-bit mantissa, relative
    error 2^-9 of logits of magnitude up to ~10, i.e. up to ~0.02 in a logit) and rounds the
    probabilities to bf16 (abs error up to 2^-9 ≈ 2e-3), while the export computes logits and softmax
    in fp32 from the same bf16 q/k; the residual streams also differ by bf16 rounding of SDPA vs eager
    outputs. 2e-2 bounds these; a wrong mask, head mapping or padding gives errors of order 0.1-1."""
    folder = str(tiny_model_dir(kind))
    spec = _spec(folder)
    spec["model"]["dtype"] = "bfloat16"
    ds, _, lm = export(spec, tmp_path / "b.zarr", device="cuda")
    assert ds.attrs["model"]["dtype"] == "bfloat16" and lm.device.type == "cuda"
    for b in range(2):
        length = int(ds["length"][b])
        tokens = ds["tokens"][b, :length].values.tolist()
        ref = eager_attentions(folder, tokens, dtype=torch.bfloat16, device="cuda")
        for lp in range(ds.sizes["layer"]):
            got = ds["attention"][lp, b, :, :length, :length].values.astype(np.float32)
            np.testing.assert_allclose(got, ref[lp], atol=2e-2, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_smollm2_shaped_model(tmp_path: Path) -> None:
    """SmolLM2-135M's exact shape (30 layers, 9 query / 3 kv heads, head_dim 64) with random bf16
    weights, a padded batch of two prompts of ~300 and ~40 tokens, generated rows included.
    (The real GGUF is too large to carry to the GPU machine; on CPU it is tested above.)"""
    from .tiny_models import build_tiny_model

    folder = str(
        build_tiny_model(
            "llama",
            tmp_path / "smol-shape",
            overrides={
                "hidden_size": 576,
                "intermediate_size": 1536,
                "num_hidden_layers": 30,
                "num_attention_heads": 9,
                "num_key_value_heads": 3,
                "max_position_embeddings": 2048,
                "rope_theta": 100000.0,
            },
        )
    )
    spec = {
        "model": {"id": folder, "dtype": "bfloat16"},
        "prompts": ["x" * 300, "y" * 40],
        "generation": {"max_new_tokens": 6, "stop_at_eos": False},
        "capture": {"layers": [0, 15, 29]},
    }
    ds, _, _ = export(spec, tmp_path / "b.zarr", device="cuda")
    for b in range(2):
        length = int(ds["length"][b])
        tokens = ds["tokens"][b, :length].values.tolist()
        ref = eager_attentions(folder, tokens, dtype=torch.bfloat16, device="cuda")
        for lp, layer in enumerate([0, 15, 29]):
            got = ds["attention"][lp, b, :, :length, :length].values.astype(np.float32)
            np.testing.assert_allclose(got, ref[layer], atol=2e-2, rtol=0, err_msg=f"layer {layer} seq {b}")
