"""The registered attention function: delegates the model's output to SDPA, then hands what it saw
(post-RoPE query, key, value, mask) to the active capture session.

Registered under :data:`ATTN_IMPLEMENTATION` in ``AttentionInterface`` together with SDPA's mask
function in ``AttentionMaskInterface`` (without a mask function the padding mask would arrive as
``None`` and be silently lost). Nothing is registered at import time: call :func:`ensure_registered`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Protocol

import torch

ATTN_IMPLEMENTATION = "qkvault_capture"


@dataclass(frozen=True)
class AttentionCall:
    """One layer's attention call. ``query [B, H, Tq, D]``, ``key``/``value [B, KVH, Tk, D]`` —
    post-RoPE, ``key``/``value`` after the cache update (the most recent Tk positions, ending at the
    last query). ``mask``: bool ``[B, 1|H, Tq, Tk]`` (True = attend), additive float, or ``None``
    (plain causal, lower-right aligned)."""

    layer_idx: int
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    mask: torch.Tensor | None
    scaling: float
    sliding_window: int | None


class CaptureSink(Protocol):
    def on_attention(self, call: AttentionCall) -> None: ...


_ACTIVE: ContextVar[CaptureSink | None] = ContextVar("qkvault_capture_sink", default=None)


def _capture_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    output, _ = sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
    )
    sink = _ACTIVE.get()
    if sink is not None:
        head_dim = query.shape[-1]
        sink.on_attention(
            AttentionCall(
                layer_idx=int(module.layer_idx),  # type: ignore[arg-type]
                query=query,
                key=key,
                value=value,
                mask=attention_mask,
                scaling=float(scaling) if scaling is not None else head_dim**-0.5,
                sliding_window=kwargs.get("sliding_window"),
            )
        )
    return output, None


def ensure_registered() -> None:
    """Register the capture attention and its mask function with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, _capture_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


@contextlib.contextmanager
def capturing(sink: CaptureSink) -> Iterator[None]:
    """Route attention calls made in this context to ``sink``."""
    token = _ACTIVE.set(sink)
    try:
        yield
    finally:
        _ACTIVE.reset(token)
