"""Independent references: eager attention with output_attentions=True, and the q/k/v that a plain
SDPA forward pass hands to its attention function (recorded by a separate registered function)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

ORACLE_IMPL = "qkvault_test_recording_sdpa"


def eager_attentions(
    folder: str, tokens: list[int], *, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> list[np.ndarray]:
    """Per layer ``[H, T, T]`` float32 from HF eager attention on the unpadded sequence."""
    from transformers import AutoModelForCausalLM

    model = (
        AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=dtype)
        .to(device)  # type: ignore[arg-type]
        .eval()
    )
    with torch.no_grad():
        out = model(torch.tensor([tokens], device=device), output_attentions=True)
    return [a[0].float().cpu().numpy() for a in out.attentions]


def recorded_qkv(folder: str, tokens: list[int]) -> dict[int, tuple[np.ndarray, ...]]:
    """Per layer ``(q [H, T, D], k [KVH, T, D], v [KVH, T, D])`` as SDPA attention received them."""
    from transformers import AttentionInterface, AutoModelForCausalLM
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    seen: dict[int, tuple[np.ndarray, ...]] = {}

    def recording(
        module: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Any,
        **kwargs: Any,
    ) -> Any:
        seen[module.layer_idx] = tuple(t[0].float().cpu().numpy() for t in (query, key, value))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(ORACLE_IMPL, recording)
    AttentionMaskInterface.register(ORACLE_IMPL, sdpa_mask)
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation=ORACLE_IMPL).eval()
    with torch.no_grad():
        model(torch.tensor([tokens]))
    return seen
