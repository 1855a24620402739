"""The real reason a model type is not exported exactly, in words a researcher can act on."""

from __future__ import annotations

import inspect
import re
import sys
from typing import Any


def _modeling_source(model_type: str) -> str:
    """Source of the modeling module behind ``model_type``'s causal-LM class ('' if unknown)."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    cls = getattr(transformers, str(name), None) if name else None
    module = sys.modules.get(cls.__module__) if cls is not None else None
    try:
        return inspect.getsource(module) if module is not None else ""
    except (OSError, TypeError):
        return ""


def no_attention_reason(model_type: str) -> str:
    """Why no layer called attention: legacy attention code, or no attention at all."""
    source = _modeling_source(model_type)
    if "ALL_ATTENTION_FUNCTIONS" in source:
        return (
            "not verified: its attention goes through AttentionInterface, but no layer of the matrix's "
            "tiny model of this type called it"
        )
    modules = re.findall(r"^class (\w*Attention\w*)\(nn\.Module\)", source, re.MULTILINE)
    if modules:
        return (
            "no layer calls transformers' AttentionInterface: its attention modules "
            f"({', '.join(modules[:3])}) are code of its own, which the capture cannot wrap without "
            "changing the model"
        )
    return "it has no attention layers (recurrent or state-space model): there is no attention to export"


def refusal_reason(model_type: str, exc: BaseException, *, stage: str) -> str:
    """A refusal reason for an exception raised while building (``config``) or exporting (``export``)."""
    from storage.errors import CertificationFailed, UnsupportedModel

    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:240]
    if stage == "config":
        return f"not verified: the matrix cannot build a tiny model from the type's config class ({text})"
    message = str(exc)
    if "no layer called attention" in message:
        return no_attention_reason(model_type)
    if isinstance(exc, UnsupportedModel):
        return message.split(": ", 1)[-1]  # the probe's own reason, without the type's name
    if isinstance(exc, CertificationFailed):
        return f"the worker's self-check fails: {message.split('. The data')[0]}"
    return f"the export failed on the tiny model ({text})"


def unknown_mechanism_reason(names: tuple[str, ...], error: Any) -> str:
    """A layer's attention takes keyword arguments the probabilities do not model."""
    known = {
        "indices": "sparse attention over selected keys (indices)",
        "position_bias": "a learned relative position bias (position_bias)",
        "block_indices": "block-sparse attention (block_indices)",
    }
    described = ", ".join(known.get(n, n) for n in names)
    return f"its attention function takes {described}, which the capture does not reproduce (error {error})"
