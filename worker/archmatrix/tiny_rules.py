"""Generic rules that keep a shrunk config consistent; all keyed by config attribute names.

Helpers of :mod:`worker.archmatrix.tiny`: which keyword arguments a config class accepts, how
per-layer patterns shrink with the layer count, and which derived sizes must follow the shrunk ones
(latent attention, rotary dims, state-space heads, hybrid layer indices).
"""

from __future__ import annotations

import copy
from typing import Any

# sizes that are ``None`` by default because the feature is off: they stay off
OPTIONAL_FEATURES = frozenset(
    {"sliding_window", "attention_chunk_size", "first_k_dense_replace", "q_lora_rank", "num_kv_shared_layers"}
)
# lists of layer indices: the layers of a pattern that are attention layers
LAYER_INDEX_LISTS = ("attn_layer_indices", "hybrid_layer_ids", "full_attn_idxs")
# attention layers a hybrid keeps when its index list is empty: every other layer
HYBRID_ATTENTION = (1, 3)
DROP = object()  # a derived value meaning: leave this name to the class's own derivation


def resolve(config: Any, name: str) -> str:
    """The field ``name`` is stored in (through the class's ``attribute_map``)."""
    return str(getattr(config, "attribute_map", {}).get(name, name))


def has(config: Any, name: str) -> bool:
    return name in getattr(config, "attribute_map", {}) or hasattr(config, name)


def settable(config: Any, names: list[str]) -> set[str]:
    """The names that can be set on the config: not read-only properties, nor ones whose setter refuses."""
    probe = copy.deepcopy(config)
    ok = set()
    for name in names:
        attr = getattr(type(config), resolve(config, name), None)
        if isinstance(attr, property) and attr.fset is None:
            continue
        try:
            setattr(probe, name, getattr(probe, name, None))
        except (AttributeError, NotImplementedError, TypeError, ValueError):
            continue
        ok.add(name)
    return ok


def shrink_pattern(pattern: list[Any], layers: int) -> list[Any]:
    """The first ``layers`` entries of a per-layer pattern; kinds cycle where the head lacks one."""
    if not all(isinstance(k, str) for k in pattern):
        return pattern[:layers]  # numbers per layer (sparsity, multipliers...): truncated
    kinds = list(dict.fromkeys(pattern))
    head = pattern[:layers]
    if all(k in head for k in kinds) or len(kinds) > layers:
        return head
    return [kinds[i % len(kinds)] for i in range(layers)]


def per_layer_lists(config: Any, sizes: dict[str, Any], default_layers: int) -> dict[str, list[Any]]:
    """Every list attribute as long as the default layer count, shrunk to the tiny layer count.

    A per-layer list of a size (``num_attention_heads_per_layer``) takes the tiny size on every
    layer; a pattern of kinds with no attention layer at all (``linear_attention`` everywhere) gets
    full attention on the hybrid's attention layers when the class has attention heads.
    """
    layers = sizes["num_hidden_layers"]
    out: dict[str, list[Any]] = {}
    for name, value in vars(config).items():
        if name.startswith("_") or not isinstance(value, list) or len(value) != default_layers:
            continue
        if default_layers <= layers:
            continue
        size = next((k for k in sizes if name.startswith(k + "_")), None)
        if size is not None and all(isinstance(v, int) for v in value):
            out[name] = [sizes[size]] * layers
            continue
        out[name] = shrink_pattern(value, layers)
        if set(out[name]) == {"linear_attention"} and has(config, "num_attention_heads"):
            out[name] = ["full_attention" if i in HYBRID_ATTENTION else k for i, k in enumerate(out[name])]
    return out


def layer_indices(value: list[int] | None, default_layers: int, layers: int) -> list[int]:
    """Attention-layer indices kept below ``layers`` (scaled down when none would be)."""
    kept = sorted({i for i in value or [] if i < layers})
    if not kept and value:
        kept = sorted({min(layers - 1, i * layers // default_layers) for i in value})
    if not kept or len(kept) == layers:
        kept = [i for i in HYBRID_ATTENTION if i < layers]
    return kept


def derived(config: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Sizes that must follow the shrunk ones (names as the class has them)."""
    out: dict[str, Any] = {}

    def val(name: str) -> Any:
        return kwargs.get(name, getattr(config, name, None))

    hidden, heads = val("hidden_size"), val("num_attention_heads")
    head_dim = val("head_dim")
    if has(config, "head_dim") and head_dim is None and hidden and heads:
        head_dim = out["head_dim"] = hidden // heads
    if has(config, "num_key_value_heads") and val("num_key_value_heads") is None and heads:
        out["num_key_value_heads"] = heads
    if val("kv_lora_rank") is not None:
        # latent attention: keys/values are expanded per query head; rope runs on head_dim
        out["num_key_value_heads"] = heads
        if has(config, "head_dim") and val("qk_rope_head_dim"):
            out["head_dim"] = val("qk_rope_head_dim")
        if has(config, "qk_head_dim") and val("qk_nope_head_dim") is not None:
            out["qk_head_dim"] = val("qk_nope_head_dim") + val("qk_rope_head_dim")
    if has(config, "attention_hidden_size") and "head_dim" in kwargs:
        out["head_dim"] = DROP  # the class derives it from its own attention width
    for name in ("rotary_dim", "rotary_emb_dim"):
        if isinstance(val(name), int) and head_dim and val(name) > head_dim:
            out[name] = head_dim // 2
    # state-space heads cover the expanded width: n_heads * head_dim == expand * hidden
    expand = val("mamba_expand") or val("expand")
    pairs = [("mamba_n_heads", "mamba_d_head"), ("mamba_num_heads", "mamba_head_dim")]
    if not has(config, "num_attention_heads"):  # a pure state-space model: its heads are the SSM's
        pairs.append(("num_heads", "head_dim"))
    for n_name, d_name in pairs:
        if isinstance(expand, int) and hidden and has(config, n_name) and val(d_name):
            out[n_name] = expand * hidden // val(d_name)
    if has(config, "mamba_d_ssm") and val("mamba_d_ssm") is not None and isinstance(expand, int) and hidden:
        out["mamba_d_ssm"] = expand * hidden
    layer_types = val("layer_types")
    shared = val("num_kv_shared_layers")
    if isinstance(shared, int) and shared > 0 and isinstance(layer_types, list):
        # the last layers reuse the caches of earlier ones: every kind must come before them
        kinds = list(dict.fromkeys(layer_types))
        layer_types = out["layer_types"] = [kinds[i % len(kinds)] for i in range(len(layer_types))]
        out["num_kv_shared_layers"] = max(0, len(layer_types) - len(kinds))
    if val("rope_parameters") == {} and isinstance(layer_types, list):
        # per-layer-type rope with none given: the default rope for every kind
        out["rope_parameters"] = {
            k: {"rope_type": "default", "rope_theta": 10000.0} for k in set(layer_types)
        }
    return out
