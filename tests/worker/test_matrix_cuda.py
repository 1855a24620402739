"""The CUDA oracle over the architecture matrix: bf16 weights on the GPU, the export against eager
bf16 attention (tolerance 2e-2, tests/worker/test_oracle.py explains it), the model's logits
unchanged by the capture — on the hard cases: soft-capping, sinks, hybrids, latent attention,
MoE, ALiBi-capable Falcon, sliding windows. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from worker.archmatrix.check import CUDA_BF16, check_type

CUDA_TYPES = [
    "llama",
    "mistral",
    "gemma2",
    "gemma3_text",
    "gpt_oss",
    "granite_swa",
    "qwen3_next",
    "jamba",
    "zamba2",
    "deepseek_v2",
    "deepseek_v3",
    "mixtral",
    "falcon",
    "phi",
    "gpt_neox",
]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("model_type", CUDA_TYPES)
def test_cuda_bf16_export_matches_eager(model_type: str) -> None:
    result = check_type(model_type, precision=CUDA_BF16)
    assert result.status == "exact", result.reason
    assert result.max_error is not None and result.max_error <= CUDA_BF16.atol
