"""A job spec checked against the facts of its model (read without torch, :mod:`storage.models`):
what the API checks at admission and the worker again once the model is loaded."""

from __future__ import annotations

from storage.errors import InvalidJobSpec
from storage.jobs.capture import CaptureSpec
from storage.jobs.spec import JobSpec
from storage.models.architectures import architecture
from storage.models.facts import ModelFacts


def check_spec_for_model(spec: JobSpec, facts: ModelFacts, *, verified_only: bool = True) -> None:
    """What this model can export for ``spec``: selections in range (:func:`check_selection`),
    derived attention only where the matrix verified its reconstruction (unless
    ``verified_only=False``: the matrix's own runs), compressed KV only where q/k and v heads have
    one size and the fidelity report models the softmax."""
    check_selection(spec.capture, facts)
    entry = architecture(facts.model_type) if verified_only else None
    if spec.capture.resolved().derived_attention and entry is not None and not entry.derived:
        raise InvalidJobSpec(
            f'capture.attention="derived" is not exact for model type {facts.model_type!r}: '
            f"{entry.derived_reason or 'not verified'}; export the attention itself (attention=true)",
            detail={"field": "capture.attention"},
        )
    if spec.kv_compression and (facts.sinks or facts.attn_logit_softcapping):
        mechanism = "learned attention sinks" if facts.sinks else "logit soft-capping"
        raise InvalidJobSpec(
            f"kv_compression's fidelity report scores the compressed keys with a plain softmax; this "
            f"{facts.model_type} model uses {mechanism}, which it does not model yet: drop kv_compression",
            detail={"field": "kv_compression"},
        )
    if spec.kv_compression and facts.v_head_dim is not None:
        raise InvalidJobSpec(
            f"kv_compression needs one head size for k and v; this {facts.model_type} model has "
            f"q/k heads of {facts.head_dim} and v heads of {facts.v_head_dim} (latent attention): "
            "drop kv_compression or export k/v with capture.qkv",
            detail={"field": "kv_compression"},
        )


def check_selection(capture: CaptureSpec, facts: ModelFacts) -> None:
    """Layer and head selections must lie inside the model's real ranges."""
    if capture.layers and facts.attention_layers is not None:
        bad = [i for i in capture.layers if i not in facts.attention_layers]
        if bad:
            raise InvalidJobSpec(
                f"capture.layers {bad} have no attention: this {facts.model_type} model has attention "
                f"in layers {list(facts.attention_layers)} only (the others are recurrent/state-space "
                "or MLP layers); choose among those",
                detail={"field": "capture.layers", "attention_layers": list(facts.attention_layers)},
            )
    if capture.layers and capture.layers[-1] >= facts.num_layers:
        bad = [i for i in capture.layers if i >= facts.num_layers]
        raise InvalidJobSpec(
            f"capture.layers {bad} out of range: model has {facts.num_layers} layers "
            f"(0..{facts.num_layers - 1})",
            detail={"field": "capture.layers", "num_layers": facts.num_layers},
        )
    if capture.heads and capture.heads[-1] >= facts.num_heads:
        bad = [i for i in capture.heads if i >= facts.num_heads]
        raise InvalidJobSpec(
            f"capture.heads {bad} out of range: model has {facts.num_heads} query heads "
            f"(0..{facts.num_heads - 1})",
            detail={"field": "capture.heads", "num_heads": facts.num_heads},
        )
    if capture.query_rows and facts.max_positions and capture.query_rows[-1][1] > facts.max_positions:
        raise InvalidJobSpec(
            f"capture.query_rows {capture.query_rows[-1]} out of range: the model has "
            f"{facts.max_positions} positions (0..{facts.max_positions - 1})",
            detail={"field": "capture.query_rows", "max_positions": facts.max_positions},
        )
    exported_heads = len(capture.heads or ()) or facts.num_heads
    if capture.top_heads and capture.top_heads.n > exported_heads:
        raise InvalidJobSpec(
            f"capture.top_heads.n {capture.top_heads.n} is more than the {exported_heads} "
            "heads per layer that are exported",
            detail={"field": "capture.top_heads.n", "num_heads": facts.num_heads},
        )
