"""The registered attention function: runs the attention implementation the model would use, then
hands what it saw (post-RoPE query, key, value, mask, and the mechanisms passed as keyword
arguments) and what it returned to the active capture session.

One name is registered per wrapped implementation (``qkvault_capture_sdpa``,
``qkvault_capture_eager``...) in ``AttentionInterface``, with the wrapped implementation's own mask
function in ``AttentionMaskInterface`` (without a mask function the padding mask would arrive as
``None`` and be silently lost). The model's output is the wrapped function's output, unchanged:
learned sinks (gpt-oss), logit soft-capping (Gemma 2), ALiBi in the mask (Falcon), chunked and
local attention keep working. Nothing is registered at import time: call :func:`ensure_registered`.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Protocol

import torch

CAPTURE_PREFIX = "qkvault_capture_"
# keyword arguments the probabilities account for (or that do not change the attention pattern)
KNOWN_KWARGS = frozenset(
    {
        "scaling",
        "dropout",
        "sliding_window",
        "softcap",
        "s_aux",
        "sinks",
        "is_causal",
        "position_ids",
        "cu_seq_lens_q",
        "cu_seq_lens_k",
        "max_length_q",
        "max_length_k",
        "output_attentions",
        "use_cache",
        "cache_position",
        "past_key_values",
        "past_key_value",
        "layer_idx",
        "attention_type",
    }
)


@dataclass(frozen=True)
class AttentionCall:
    """One layer's attention call. ``query [B, H, Tq, Dqk]``, ``key [B, KVH, Tk, Dqk]``,
    ``value [B, KVH, Tk, Dv]`` — post-RoPE, ``key``/``value`` after the cache update (the most
    recent Tk positions, ending at the last query). ``mask``: bool ``[B, 1|H, Tq, Tk]`` (True =
    attend), additive float (ALiBi and other biases included), or ``None`` (plain causal,
    lower-right aligned). ``softcap``: logits become ``softcap·tanh(logits/softcap)``; ``sinks
    [H]``: one learned logit per head joining each row's softmax (its mass is not on any key).
    ``output [B, Tq, H, Dv]``: what the model's attention function returned (before the output
    projection). ``unknown``: keyword arguments with tensor values the capture does not model;
    ``causal``: whether the module's attention is causal (its ``is_causal``)."""

    layer_idx: int
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    mask: torch.Tensor | None
    scaling: float
    sliding_window: int | None
    softcap: float | None = None
    sinks: torch.Tensor | None = None
    output: torch.Tensor | None = None
    unknown: tuple[str, ...] = ()
    causal: bool = True  # False: the module attends both ways (an encoder used as a language model)


class CaptureSink(Protocol):
    def on_attention(self, call: AttentionCall) -> None: ...


_ACTIVE: ContextVar[CaptureSink | None] = ContextVar("qkvault_capture_sink", default=None)
AttentionFunction = Callable[..., tuple[torch.Tensor, Any]]


def capture_name(inner: str) -> str:
    """The registered name that wraps implementation ``inner`` (``sdpa``, ``eager``...)."""
    return CAPTURE_PREFIX + inner


def inner_name(implementation: str) -> str:
    """``qkvault_capture_sdpa`` → ``sdpa``."""
    return implementation.removeprefix(CAPTURE_PREFIX)


def _inner_function(module: torch.nn.Module, inner: str) -> AttentionFunction:
    """The function implementation ``inner`` runs for ``module``: the modeling file's own
    ``eager_attention_forward`` for eager (each architecture has its own), else the registered one."""
    if inner == "eager":
        eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if eager is None:
            raise RuntimeError(f"{type(module).__name__}: its modeling file has no eager_attention_forward")
        return eager
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[inner]


def _sinks(kwargs: dict[str, Any]) -> torch.Tensor | None:
    for name in ("s_aux", "sinks"):
        value = kwargs.get(name)
        if isinstance(value, torch.Tensor):
            return value
    return None


# a shared attention block (Zamba 2) is told its layer by a ``layer_idx`` forward argument
_CALLED_AS_LAYER: ContextVar[int | None] = ContextVar("qkvault_called_as_layer", default=None)


def _layer_index(module: torch.nn.Module) -> int:
    """The layer index the module knows itself by, else the one its forward was called with;
    -1 when neither is known."""
    index = getattr(module, "layer_idx", None)
    if not (isinstance(index, int) and index >= 0):
        index = _CALLED_AS_LAYER.get()
    return int(index) if isinstance(index, int) and index >= 0 else -1


def _remember_called_layer(_module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    index = kwargs.get("layer_idx")
    if isinstance(index, int):
        _CALLED_AS_LAYER.set(index)


def _track_shared_blocks(model: Any) -> None:
    """Attention modules without a layer index of their own whose forward takes ``layer_idx``
    (one block shared by several layers) record the layer they are called for."""
    for module in model.modules():
        own = getattr(module, "layer_idx", None)
        shared = own is None or own == -1
        takes_layer = "layer_idx" in inspect.signature(module.forward).parameters
        if shared and takes_layer and not getattr(module, "_qkvault_tracks_layer", False):
            module.register_forward_pre_hook(_remember_called_layer, with_kwargs=True)
            module._qkvault_tracks_layer = True


def _make_capture(inner: str) -> AttentionFunction:
    def capture_attention(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, Any]:
        output, weights = _inner_function(module, inner)(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
        sink = _ACTIVE.get()
        if sink is not None:
            softcap = kwargs.get("softcap")
            sink.on_attention(
                AttentionCall(
                    layer_idx=_layer_index(module),
                    query=query,
                    key=key,
                    value=value,
                    mask=attention_mask,
                    scaling=float(scaling) if scaling is not None else query.shape[-1] ** -0.5,
                    sliding_window=kwargs.get("sliding_window"),
                    softcap=float(softcap) if softcap else None,
                    sinks=_sinks(kwargs),
                    output=output,
                    causal=bool(kwargs.get("is_causal", getattr(module, "is_causal", True))),
                    unknown=tuple(
                        sorted(
                            k
                            for k, v in kwargs.items()
                            if k not in KNOWN_KWARGS and isinstance(v, torch.Tensor)
                        )
                    ),
                )
            )
        return output, weights

    return capture_attention


def ensure_registered(inner: str) -> str:
    """Register the capture around implementation ``inner`` and its mask function with transformers
    (idempotent); returns the registered name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    name = capture_name(inner)
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, _make_capture(inner))
        mask_function = AttentionMaskInterface._global_mapping[inner]
        AttentionMaskInterface.register(name, mask_function)  # type: ignore[arg-type]
    return name


@contextlib.contextmanager
def capturing(sink: CaptureSink) -> Iterator[None]:
    """Route attention calls made in this context to ``sink``."""
    token = _ACTIVE.set(sink)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def install_capture(model: Any) -> str:
    """Route ``model``'s attention through the capture, wrapping the implementation it was loaded
    with (transformers' default: SDPA where the architecture supports it, else its eager function);
    returns the wrapped implementation's name. Idempotent."""
    current = str(model.config._attn_implementation or "eager")
    inner = inner_name(current)
    name = ensure_registered(inner)
    if current != name:
        model.set_attn_implementation(name)
    _track_shared_blocks(model)
    return inner
