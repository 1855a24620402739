"""Optional end-to-end check of a compressed KV cache: after the exact prefill, replace every
layer's cached keys and values of the prompt by their dequantised versions, decode greedily, and
report how many generated tokens agree with the exact greedy run."""

from __future__ import annotations

from typing import Any

import torch

from storage.kvquant.spec import KVMethodSpec
from worker.generation import Batch, cache_argument
from worker.kvexport import codec_for


def _round_trip(method: KVMethodSpec, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantised ``k``/``v [KVH, T, D]`` with the method's codec (TurboQuant prod keys: the MSE part
    plus the QJL correction, the key estimate whose inner products are unbiased)."""
    return codec_for(method, k.shape[-1], k.device).round_trip(k, v)


def greedy_tokens(
    model: Any, batch: Batch, method: KVMethodSpec | None, max_new_tokens: int
) -> list[list[int]]:
    """Greedy decoding after the exact prefill, with every layer's cached prompt keys and values
    replaced by their dequantised versions (``method=None``: the exact cache)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    cache_arg = cache_argument(model)
    mask = batch.attention_mask
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    generated: list[list[int]] = [[] for _ in batch.pads]
    with torch.inference_mode():
        logits = model(
            input_ids=batch.input_ids,
            attention_mask=mask,
            position_ids=pos,
            use_cache=True,
            **{cache_arg: cache},
        ).logits[:, -1]
        if method is not None:
            for layer in cache.layers:
                keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)  # [B, KVH, T, D]
                assert isinstance(keys, torch.Tensor) and isinstance(values, torch.Tensor)
                for b, pad in enumerate(batch.pads):
                    k_hat, v_hat = _round_trip(method, keys[b, :, pad:].float(), values[b, :, pad:].float())
                    keys[b, :, pad:] = k_hat.to(keys.dtype)
                    values[b, :, pad:] = v_hat.to(values.dtype)
        for _ in range(max_new_tokens):
            next_ids = logits.float().argmax(-1)
            for b, token in enumerate(next_ids.tolist()):
                generated[b].append(int(token))
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            pos = pos[:, -1:] + 1
            logits = model(
                input_ids=next_ids[:, None],
                attention_mask=mask,
                position_ids=pos,
                use_cache=True,
                **{cache_arg: cache},
            ).logits[:, -1]
    return generated


def agreement(generated: list[list[int]], exact: list[list[int]]) -> dict[str, Any]:
    """Token agreement (%) position by position, and where each sequence first diverges."""
    compared = agree = 0
    first_divergence = []
    for ours, theirs in zip(generated, exact, strict=True):
        n = min(len(ours), len(theirs))
        compared += n
        agree += sum(a == b for a, b in zip(ours[:n], theirs[:n], strict=True))
        first_divergence.append(next((i for i in range(n) if ours[i] != theirs[i]), None))
    return {
        "token_agreement": round(100.0 * agree / max(compared, 1), 2),
        "tokens_compared": compared,
        "first_divergence": first_divergence,
    }
