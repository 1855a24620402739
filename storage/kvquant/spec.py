"""Compressed KV export settings (KV_COMPRESSION.md): methods, bit widths, parameters.

Which method names, bit widths and method parameters are allowed comes from the method registry
(:mod:`storage.kvquant.registry`), looked up when a spec is validated: a registered method is
accepted here without a change to this file.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationInfo, field_validator, model_validator
from pydantic.config import JsonDict
from pydantic_core import PydanticCustomError

from storage.inputs import MAX_SEED
from storage.kvquant.registry import kv_method, method_names

# Parameters only some methods use (a method lists those it uses in ``KVMethodDef.params``); the
# others must keep their defaults.
METHOD_PARAMS: tuple[str, ...] = ("group", "residual")


def _one_of(values: list[str]) -> str:
    """``'a', 'b' or 'c'``, as pydantic words a literal error."""
    return values[0] if len(values) == 1 else f"{', '.join(values[:-1])} or {values[-1]}"


def _literal_error(values: list[str]) -> PydanticCustomError:
    expected = _one_of(values)
    return PydanticCustomError("literal_error", "Input should be {expected}", {"expected": expected})


def _all_bits() -> list[int]:
    return sorted({b for name in method_names() for b in kv_method(name).bits})


def _method_enum(schema: JsonDict) -> None:
    """The JSON schema lists the methods registered when it is generated."""
    schema["enum"] = list(method_names())


def _bits_enum(schema: JsonDict) -> None:
    schema["enum"] = list[JsonValue](_all_bits())


class KVMethodSpec(BaseModel):
    """One compressed copy of the KV cache.

    - ``turboquant_prod``: keys with TurboQuant's inner-product quantizer (b−1-bit MSE codes +
      1-bit QJL signs of the residual), values with the b-bit MSE quantizer;
    - ``turboquant_mse``: keys and values with the b-bit MSE quantizer;
    - ``kivi``: keys per channel over groups of ``group`` tokens, values per token over groups of
      ``group`` channels, asymmetric round-to-nearest, with the ``residual`` most recent tokens in
      full precision.
    """

    model_config = ConfigDict(extra="forbid")

    method: str = Field(json_schema_extra=_method_enum)
    bits: int = Field(json_schema_extra=_bits_enum)
    seed: int = Field(
        0, ge=0, le=MAX_SEED, description="seed of the random rotation (and, +1, of the QJL matrix)"
    )
    group: int = Field(
        32, ge=1, le=1024, description="KIVI group size (tokens for keys, channels for values)"
    )
    residual: int = Field(128, ge=0, le=65536, description="KIVI full-precision window of recent tokens")
    check_generation: bool = Field(
        False,
        description="also decode greedily from the compressed prompt cache and report token agreement "
        "with the exact greedy run (needs generation.max_new_tokens > 0)",
    )

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> KVMethodSpec:
        """The spec stored in a bundle's ``params`` attrs (fields it does not know are left out)."""
        return cls.model_validate({k: v for k, v in params.items() if k in cls.model_fields})

    @property
    def name(self) -> str:
        """Group name in the bundle: ``kv/<method>_<bits>``."""
        return f"{self.method}_{self.bits}"

    @field_validator("method", mode="before")
    @classmethod
    def _registered(cls, value: Any) -> Any:
        names = method_names()
        if not isinstance(value, str) or value not in names:
            raise _literal_error([repr(n) for n in names])
        return value

    @field_validator("bits", mode="before")
    @classmethod
    def _bits_of_method(cls, value: Any, info: ValidationInfo) -> Any:
        method = info.data.get("method")
        allowed = list(kv_method(method).bits) if method is not None else _all_bits()
        if isinstance(value, bool) or not isinstance(value, int | float) or value not in allowed:
            raise _literal_error([str(b) for b in allowed])
        return value

    @model_validator(mode="after")
    def _params_apply(self) -> KVMethodSpec:
        uses = kv_method(self.method).params
        foreign = [p for p in METHOD_PARAMS if p not in uses]
        if any(getattr(self, p) != type(self).model_fields[p].default for p in foreign):
            owners = [kv_method(n).label for n in method_names() if set(kv_method(n).params) & set(foreign)]
            raise ValueError(
                f"{' and '.join(foreign)} are {'/'.join(owners) or 'other methods'} parameters; "
                f"{self.method} does not use them"
            )
        return self


def unique_methods(methods: list[KVMethodSpec]) -> list[KVMethodSpec]:
    names = [m.name for m in methods]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"kv_compression lists {', '.join(duplicates)} more than once")
    return methods
