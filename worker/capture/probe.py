"""What a loaded model's attention really is, read off one tiny forward pass under capture.

Configs name their sizes in many ways (``n_head``, ``num_attention_heads``, latent attention's
``qk_nope_head_dim + qk_rope_head_dim``, hybrid models' per-layer block types); the attention calls
themselves are the ground truth: which layers call attention, with how many query and kv heads,
which q/k and v head sizes, and which mechanisms (sliding window, soft-capping, sinks).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from storage.errors import UnsupportedModel
from storage.models.facts import ModelFacts
from worker.capture.hook import AttentionCall, capturing


@dataclass(frozen=True)
class LayerAttention:
    """One layer's attention as called: heads, sizes and mechanisms."""

    num_heads: int
    num_kv_heads: int
    qk_head_dim: int
    v_head_dim: int
    sliding_window: int | None
    softcap: float | None
    sinks: bool
    unknown: tuple[str, ...]
    causal: bool
    cross: bool  # keys are not the layer's own positions (cross attention)
    calls: int = 1  # attention calls of this layer in one forward pass


@dataclass
class AttentionProbe:
    """Per attention layer (the model's real indices) what its attention call looked like."""

    layers: dict[int, LayerAttention] = field(default_factory=dict)

    def on_attention(self, call: AttentionCall) -> None:
        _, heads, q_len, qk_dim = call.query.shape
        seen = self.layers.get(call.layer_idx)
        if seen is not None:
            self.layers[call.layer_idx] = replace(seen, calls=seen.calls + 1)
            return
        self.layers[call.layer_idx] = LayerAttention(
            num_heads=int(heads),
            num_kv_heads=int(call.key.shape[1]),
            qk_head_dim=int(qk_dim),
            v_head_dim=int(call.value.shape[-1]),
            sliding_window=int(call.sliding_window) if call.sliding_window else None,
            softcap=call.softcap,
            sinks=call.sinks is not None,
            unknown=call.unknown,
            causal=call.causal,
            cross=call.key.shape[2] != q_len,
        )

    @property
    def attention_layers(self) -> tuple[int, ...]:
        return tuple(sorted(self.layers))


def probe_attention(model: Any, device: torch.device, tokens: int = 2) -> AttentionProbe:
    """Run ``tokens`` tokens through ``model`` (its capture installed) and record every attention call."""
    probe = AttentionProbe()
    ids = torch.ones((1, tokens), dtype=torch.long, device=device)
    with torch.inference_mode(), capturing(probe):
        model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    return probe


def facts_with_probe(config_facts: ModelFacts, probe: AttentionProbe) -> ModelFacts:
    """``config_facts`` corrected by what the attention calls showed (the calls win: they are what
    the export sees). Refuses a model whose layers differ in head counts or sizes (the bundle's
    arrays have one head axis) or that calls no attention through the interface."""
    if not probe.layers:
        raise UnsupportedModel(
            f"model type {config_facts.model_type!r}: no layer called attention through transformers' "
            "AttentionInterface, so there is nothing the capture can export"
        )
    kind = config_facts.model_type
    layers = probe.layers
    if -1 in layers:
        raise UnsupportedModel(
            f"model type {kind!r}: an attention block has no layer index of its own (one block shared "
            "by several layers), so its calls cannot be told apart by layer"
        )
    if any(a.cross for a in layers.values()):
        raise UnsupportedModel(
            f"model type {kind!r}: cross attention (keys from another sequence) in layers "
            f"{[i for i, a in layers.items() if a.cross]}; the capture exports causal self-attention"
        )
    if not all(a.causal for a in layers.values()):
        raise UnsupportedModel(
            f"model type {kind!r}: bidirectional attention (an encoder, is_causal false, used with a "
            "language-model head); the capture exports causal decoder attention"
        )
    if any(a.calls > 1 for a in layers.values()):
        raise UnsupportedModel(
            f"model type {kind!r}: a layer calls attention more than once per forward pass (shared, "
            "repeated or differential attention blocks); one export row per layer and token cannot hold it"
        )
    shapes = {(a.num_heads, a.num_kv_heads, a.qk_head_dim, a.v_head_dim) for a in layers.values()}
    if len(shapes) > 1:
        raise UnsupportedModel(
            f"model type {kind!r}: attention layers differ in (heads, kv heads, q/k size, v size): "
            f"{sorted(shapes)}; one bundle holds one head layout"
        )
    ((heads, kv_heads, qk_dim, v_dim),) = shapes
    attention_layers = probe.attention_layers
    num_layers = max(config_facts.num_layers, attention_layers[-1] + 1)
    softcaps = [a.softcap for a in layers.values() if a.softcap is not None]
    return replace(
        config_facts,
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=qk_dim,
        v_head_dim=v_dim if v_dim != qk_dim else None,
        attention_layers=attention_layers if attention_layers != tuple(range(num_layers)) else None,
        attn_logit_softcapping=max(softcaps) if softcaps else None,
        sinks=any(a.sinks for a in layers.values()),
    )
