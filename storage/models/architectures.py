"""The architecture matrix's verdicts, read without torch: which model types are admitted, why the
others are refused, and how a type's config names its sizes.

``storage/models/architectures.json`` is written by ``python -m worker.archmatrix`` (docs/architectures.md)
from a real export of a tiny model of every causal-LM type in transformers' registry, compared with
eager attention. The API and the worker both read it; nothing here is per-type code: each entry
carries the config class's own ``attribute_map`` and the rules, found by the matrix, that give the
attention head sizes and the attention layers from a config.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

MATRIX_FILE = Path(__file__).with_name("architectures.json")

# canonical size names and where a config may keep them (the config class's attribute_map adds more)
CANONICAL_SIZES = ("num_hidden_layers", "num_attention_heads", "hidden_size", "max_position_embeddings")


@dataclass(frozen=True)
class Architecture:
    """One model type's verdict. ``status``: ``exact`` (admitted) or ``refused`` (``reason`` says
    why); ``derived``: derived attention reconstructs it exactly; ``max_error``: the largest
    difference from eager attention the matrix measured; ``rules``: how its config names sizes."""

    model_type: str
    status: str
    reason: str = ""
    derived: bool = False
    derived_reason: str = ""
    max_error: float | None = None
    notes: str = ""
    attribute_map: dict[str, str] = field(default_factory=dict)
    rules: dict[str, Any] = field(default_factory=dict)

    @property
    def admitted(self) -> bool:
        return self.status == "exact"

    @classmethod
    def from_json(cls, model_type: str, data: dict[str, Any]) -> Architecture:
        return cls(model_type=model_type, **data)


@lru_cache(maxsize=4)
def _load(path: str, mtime_ns: int) -> dict[str, Any]:
    with open(path, encoding="utf-8") as fh:
        data: dict[str, Any] = json.load(fh)
    return data


def matrix(path: Path = MATRIX_FILE) -> dict[str, Any]:
    """The whole matrix file (``transformers`` version, ``types``)."""
    if not path.is_file():
        return {"transformers": None, "types": {}}
    return _load(str(path), path.stat().st_mtime_ns)


def architecture(model_type: str, path: Path = MATRIX_FILE) -> Architecture | None:
    entry = matrix(path)["types"].get(model_type)
    return None if entry is None else Architecture.from_json(model_type, entry)


def admitted_types(path: Path = MATRIX_FILE) -> list[str]:
    return sorted(t for t, e in matrix(path)["types"].items() if e["status"] == "exact")


# -- config facts by rule ---------------------------------------------------------------------
def canonical(config: dict[str, Any], attribute_map: dict[str, str]) -> dict[str, Any]:
    """``config`` with canonical names added for the aliases of ``attribute_map`` (``n_layer`` →
    ``num_hidden_layers``); a composite config's text part (``text_config``) is merged in."""
    merged = dict(config)
    text = config.get("text_config")
    if isinstance(text, dict):
        merged.update({k: v for k, v in text.items() if k != "model_type"})
    for canonical_name, alias in attribute_map.items():
        if merged.get(canonical_name) is None and alias in merged:
            merged[canonical_name] = merged[alias]
    return merged


def evaluate(expression: str, config: dict[str, Any]) -> int | None:
    """A size rule: a config key, ``a+b``, ``a/b`` or ``a*b`` of keys, or an integer literal."""
    for op in ("+", "/", "*"):
        if op in expression:
            left, right = (evaluate(part, config) for part in expression.split(op, 1))
            if left is None or right is None or (op == "/" and right == 0):
                return None
            return left + right if op == "+" else left * right if op == "*" else left // right
    if expression.isdigit():
        return int(expression)
    value = config.get(expression)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return int(value)


def attention_layers(rule: dict[str, Any] | None, config: dict[str, Any], num_layers: int) -> tuple[int, ...]:
    """The layers that have attention, by the matrix's rule (``None``: every layer)."""
    if not rule:
        return tuple(range(num_layers))
    kind = rule["kind"]
    if kind == "values":  # a per-layer list or string; attention where the entry is one of values
        pattern = config.get(rule["key"]) or []
        return tuple(i for i, v in enumerate(pattern) if v in rule["values"] and i < num_layers)
    if kind == "indices":  # a list of attention layer indices
        return tuple(sorted(int(i) for i in config.get(rule["key"]) or [] if int(i) < num_layers))
    if kind == "period":  # every period-th layer from offset
        period, offset = config.get(rule["period"]), config.get(rule["offset"])
        if not isinstance(period, int) or not isinstance(offset, int) or period <= 0:
            return ()
        return tuple(i for i in range(num_layers) if i % period == offset)
    raise ValueError(f"unknown attention-layer rule {kind!r}")
