"""How a type's config names its attention sizes and layers, found by matching the tiny model's
attention calls against a few generic rule forms (no per-type code).

The API reads configs without torch, so it cannot run the model: it evaluates these rules
(:mod:`storage.models.architectures`). Each rule is the first candidate that gives, on the tiny config,
exactly what the model's attention calls showed.
"""

from __future__ import annotations

from typing import Any

from storage.models.architectures import attention_layers, canonical, evaluate
from storage.models.facts import ModelFacts

CANDIDATES: dict[str, tuple[str, ...]] = {
    "num_layers": ("num_hidden_layers", "decoder_layers", "num_layers"),
    "num_heads": ("num_attention_heads", "decoder_attention_heads", "num_heads"),
    "num_kv_heads": (
        "num_key_value_heads",
        "num_kv_heads",
        "multi_query_group_num",
        "n_head_kv",
        "num_attention_heads",
        "decoder_attention_heads",
        "1",
    ),
    "head_dim": (
        "head_dim",
        "qk_head_dim",
        "qk_nope_head_dim+qk_rope_head_dim",
        "hidden_size/num_attention_heads",
        "d_model/decoder_attention_heads",
        "kv_channels",
        "attention_head_dim",
    ),
    "v_head_dim": ("v_head_dim", "head_dim", "hidden_size/num_attention_heads"),
}


def _attention_layer_rule(
    values: dict[str, Any], layers: int, wanted: tuple[int, ...]
) -> dict[str, Any] | None:
    """A rule that gives exactly the layers ``wanted`` out of ``layers``, read from ``values``."""
    candidates: list[dict[str, Any]] = []
    # per-layer patterns first: keys that name layers, then any other list or string of that length
    keys = sorted(values, key=lambda k: ("layer" not in k and "pattern" not in k, k))
    for key in keys:
        value = values[key]
        named = any(word in key for word in ("layer", "pattern", "block_type"))
        if (isinstance(value, list) or (isinstance(value, str) and named)) and len(value) == layers:
            entries = list(value)
            if all(isinstance(e, (str, int)) and not isinstance(e, bool) for e in entries):
                chosen = sorted({entries[i] for i in wanted}, key=str)
                candidates.append({"kind": "values", "key": key, "values": chosen})
        if isinstance(value, list) and value and all(type(i) is int for i in value):
            candidates.append({"kind": "indices", "key": key})
    periods = [
        {"kind": "period", "period": key, "offset": key.removesuffix("_period") + "_offset"}
        for key in keys
        if key.endswith("_period") and key.removesuffix("_period") + "_offset" in values
    ]
    candidates = periods + candidates  # a period/offset pair is what such configs mean
    for rule in candidates:
        try:
            if attention_layers(rule, values, layers) == wanted:
                return rule
        except (TypeError, ValueError):
            continue
    return None


def config_rules(config: Any, facts: ModelFacts) -> tuple[dict[str, str], dict[str, Any]]:
    """``(attribute_map, rules)`` for the matrix file: the config classes' aliases, and for each
    fact the first candidate rule that reproduces what the attention calls showed."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    attribute_map = {**getattr(text, "attribute_map", {}), **getattr(config, "attribute_map", {})}
    values = canonical(config.to_dict(), attribute_map)
    observed = {
        "num_layers": facts.num_layers,
        "num_heads": facts.num_heads,
        "num_kv_heads": facts.num_kv_heads,
        "head_dim": facts.head_dim,
    }
    if facts.v_head_dim:
        observed["v_head_dim"] = facts.v_head_dim
    rules: dict[str, Any] = {}
    for name, want in observed.items():
        found = next((c for c in CANDIDATES[name] if evaluate(c, values) == want), None)
        if found is not None:
            rules[name] = found
    if facts.attention_layers is not None:
        rule = _attention_layer_rule(values, facts.num_layers, facts.attention_layers)
        if rule is not None:
            rules["attention_layers"] = rule
    if facts.sinks:
        rules["sinks"] = True
    return attribute_map, rules
