"""Tiny seeded configs derived from a model type's own config class (no per-type table).

The config class is built with its defaults, then every size it has is shrunk: layers, hidden
size, heads (grouped-query where the class has kv heads), head dims, intermediate sizes, experts,
LoRA ranks of latent attention, state sizes of recurrent layers, and sliding windows are made
shorter than the test prompts. Names are the canonical ones; the class's own ``attribute_map``
routes them to its fields (``n_layer``, ``n_head``...). Generic rules (``tiny_rules``), all keyed
by attribute names:

- a size the class leaves ``None`` is still set (``head_dim``, kv heads, expert counts), except
  optional features that ``None`` switches off (windows, ``q_lora_rank``, shared KV layers);
- names the class cannot take are skipped: read-only properties (``layer_types`` derived from
  ``attn_layer_period``...) and setters that refuse (``num_hidden_layers`` of prophetnet);
- every list as long as the default layer count is a per-layer pattern and is shrunk with it,
  keeping every kind it has (hybrids keep attention and non-attention layers); per-layer sizes
  take the tiny size; layer-index lists (``attn_layer_indices``) keep indices below the layer count;
- derived sizes follow the shrunk ones: latent attention (``kv_lora_rank``) has as many kv heads
  as query heads and rope on ``head_dim = qk_rope_head_dim``; rotary dims fit the head dim;
  state-space heads cover ``expand * hidden_size``; layers that share KV caches come last;
- encoder-decoder sizes (``decoder_layers``, ``d_model``...) shrink like the decoder-only ones;
- vision / audio towers of multimodal types are shrunk to one small layer;
- a tiny value that the class's validators refuse by name falls back to its default.
"""

from __future__ import annotations

import re
from typing import Any

from worker.archmatrix import tiny_rules as rules

VOCAB = 256 + 2  # bytes + <bos> + <eos>: the byte tokenizer of the matrix
BOS, EOS = 256, 257
SLIDING_WINDOW = 6  # shorter than the matrix's prompts: windows are exercised
NUM_LAYERS = 4
HIDDEN = 64
HEADS = 4
KV_HEADS = 2
HEAD_DIM = 16

# canonical name -> tiny value, applied when the config class has the attribute (or an alias)
SIZES: dict[str, Any] = {
    "num_hidden_layers": NUM_LAYERS,
    "hidden_size": HIDDEN,
    "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS,
    "multi_query_group_num": KV_HEADS,
    "head_dim": HEAD_DIM,
    "d_head": HEAD_DIM,
    "index_num_heads": HEADS // KV_HEADS,
    "index_n_heads": HEADS,
    "index_head_dim": HEAD_DIM,
    "intermediate_size": 128,
    "ffn_hidden_size": 128,
    "n_inner": 128,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
    "expert_intermediate_size": 32,
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "moe_num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_k": 2,
    "top_k": 2,
    "n_shared_experts": 1,
    "n_group": 1,
    "topk_group": 1,
    "first_k_dense_replace": 1,
    "q_lora_rank": 16,
    "kv_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 16,
    "rotary_dim": HEAD_DIM // 2,
    "v_head_dim": 16,
    # encoder-decoder types (their causal LM is the decoder alone)
    "encoder_layers": NUM_LAYERS,
    "decoder_layers": NUM_LAYERS,
    "num_encoder_layers": NUM_LAYERS,
    "num_decoder_layers": NUM_LAYERS,
    "encoder_attention_heads": HEADS,
    "num_encoder_attention_heads": HEADS,
    "num_decoder_attention_heads": HEADS,
    "ffn_dim": 128,
    "decoder_attention_heads": HEADS,
    "d_model": HIDDEN,
    "encoder_ffn_dim": 128,
    "decoder_ffn_dim": 128,
    "max_position_embeddings": 512,
    "vocab_size": VOCAB,
    "vocab_size_per_layer_input": VOCAB,
    "hidden_size_per_layer_input": 16,
    "bos_token_id": BOS,
    "eos_token_id": EOS,
    "pad_token_id": EOS,
    "decoder_start_token_id": BOS,
    "tie_word_embeddings": False,
    # recurrent / state-space layers of hybrid models
    "mamba_d_state": 8,
    "mamba_n_heads": 8,
    "mamba_d_head": 16,
    "mamba_head_dim": 16,
    "mamba_n_groups": 1,
    "mamba_expand": 2,
    "mamba_d_conv": 4,
    "state_size": 8,
    "ssm_state_size": 8,
    "linear_num_value_heads": 4,
    "linear_num_key_heads": 2,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "linear_num_heads": 4,  # Kimi Linear's delta-rule layers: 32 x 128 by default (≈ 25 s a check)
    "linear_head_dim": 16,
    "attn_layer_period": 2,
    "attn_layer_offset": 1,
    "expert_layer_period": 2,
    "expert_layer_offset": 1,
    # windows shorter than the prompts
    "sliding_window": SLIDING_WINDOW,
    "attention_chunk_size": SLIDING_WINDOW + 2,
    # deterministic, no dropout
    "attention_dropout": 0.0,
    "hidden_dropout": 0.0,
    "resid_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "attn_pdrop": 0.0,
}


# the sub-configs of multimodal types that are not the text model, and the sizes they are shrunk to
TOWERS = ("vision_config", "audio_config")
TOWER_SIZES: dict[str, Any] = {
    "num_hidden_layers": 1,
    "hidden_size": HIDDEN,
    "intermediate_size": 128,
    "num_attention_heads": HEADS,
}

# Narrow per-type overrides, only where no generic rule exists (reason for each):
OVERRIDES: dict[str, dict[str, Any]] = {
    # layer kinds come as [[kinds, repeat]] groups, not as a per-layer list: 2 x (global, local) = 4 layers
    "gpt_neo": {"attention_types": [[["global", "local"], NUM_LAYERS // 2]]},
    # the default leaves the per-layer kinds unset although the model reads them
    "lfm2_moe": {"layer_types": ["conv", "full_attention", "conv", "full_attention"]},
    # its four models (patcher, byte encoder, global, byte decoder) are sub-configs the generic rules
    # do not reach, and its hash embeddings have 500,002 rows per group: at full size the check ran
    # out of its 30 s at 5.9 GB of memory; tiny, it finishes in seconds with the verdict itself
    "blt": {
        "encoder_hash_byte_group_vocab": 512,
        "patcher_config": {**TOWER_SIZES, "max_position_embeddings": 256},
        "encoder_config": {**TOWER_SIZES, "hidden_size_global": HIDDEN, "max_position_embeddings": 512},
        "decoder_config": {**TOWER_SIZES, "hidden_size_global": HIDDEN, "max_position_embeddings": 512},
        "global_config": {**TOWER_SIZES, "num_hidden_layers": 2, "max_position_embeddings": 256},
    },
}


def tiny_config(model_type: str, overrides: dict[str, Any] | None = None) -> Any:
    """A tiny config of ``model_type`` (for a composite config, its text part is shrunk)."""
    from transformers import CONFIG_MAPPING

    config_class = CONFIG_MAPPING[model_type]
    defaults = config_class()
    sizes = dict(SIZES, **OVERRIDES.get(model_type, {}), **(overrides or {}))
    text = defaults.get_text_config(decoder=True) if hasattr(defaults, "get_text_config") else defaults
    kwargs = _shrunk(text, sizes)
    towers = {k: _tower(v) for k, v in vars(defaults).items() if k in TOWERS and v is not text}
    towers = {k: v for k, v in towers.items() if v is not None}
    slot = next((k for k, v in vars(defaults).items() if v is text), None)
    if slot is None:  # the config is its own text config (or a copy of itself)
        return _build(config_class, {**kwargs, **towers})
    text_config = _build(type(text), kwargs, text.to_dict())
    return config_class(**{slot: text_config, **towers})


def _tower(config: Any) -> Any:
    """A vision / audio tower shrunk to its core sizes (left as it is when those do not fit it)."""
    if config is None or not hasattr(config, "to_dict"):
        return None
    kwargs = {k: v for k, v in TOWER_SIZES.items() if rules.has(config, k) and getattr(config, k, None)}
    try:
        return type(config)(**{**config.to_dict(), **kwargs})
    except Exception:
        return None


def _build(config_class: Any, kwargs: dict[str, Any], base: dict[str, Any] | None = None) -> Any:
    """``config_class(**base, **kwargs)``; a tiny value the class's validators refuse keeps its default."""
    for _ in range(3):
        try:
            return config_class(**{**(base or {}), **kwargs})
        except Exception as error:  # the class's validators: ValueError or a strict-dataclass error
            refused = [k for k in kwargs if re.search(rf"\b{k}\b", str(error))]
            if not refused:
                raise
            kwargs = {k: v for k, v in kwargs.items() if k not in refused}
    return config_class(**{**(base or {}), **kwargs})


def _shrunk(text: Any, sizes: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments that shrink ``text`` (the default config of the text model)."""
    layers = sizes["num_hidden_layers"]
    wanted = [
        k
        for k, v in sizes.items()
        if rules.has(text, k) and (getattr(text, k, None) is not None or k not in rules.OPTIONAL_FEATURES)
    ]
    kwargs = {k: sizes[k] for k in wanted}
    for key in ("sliding_window", "attention_chunk_size", "first_k_dense_replace"):
        if key in kwargs and getattr(text, key, None) in (None, 0):
            kwargs.pop(key)  # a window the type does not enable by default stays off
    default_layers = getattr(text, "num_hidden_layers", None)
    if isinstance(default_layers, int):
        kwargs.update(rules.per_layer_lists(text, sizes, default_layers))
        for name in rules.LAYER_INDEX_LISTS:
            if name in vars(text):
                kwargs[name] = rules.layer_indices(getattr(text, name), default_layers, layers)
    kwargs.update(rules.derived(text, kwargs))
    kwargs = {k: v for k, v in kwargs.items() if v is not rules.DROP}
    ok = rules.settable(text, list(kwargs))
    return {k: v for k, v in kwargs.items() if k in ok}
