"""Compressed KV export settings (KV_COMPRESSION.md): methods, bit widths, parameters."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

KVMethod = Literal["turboquant_prod", "turboquant_mse", "kivi"]


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

    method: KVMethod
    bits: Literal[2, 3, 4]
    seed: int = Field(0, ge=0, description="seed of the random rotation (and, +1, of the QJL matrix)")
    group: int = Field(
        32, ge=1, le=1024, description="KIVI group size (tokens for keys, channels for values)"
    )
    residual: int = Field(128, ge=0, le=65536, description="KIVI full-precision window of recent tokens")
    check_generation: bool = Field(
        False,
        description="also decode greedily from the compressed prompt cache and report token agreement "
        "with the exact greedy run (needs generation.max_new_tokens > 0)",
    )

    @property
    def name(self) -> str:
        """Group name in the bundle: ``kv/<method>_<bits>``."""
        return f"{self.method}_{self.bits}"

    @model_validator(mode="after")
    def _params_apply(self) -> KVMethodSpec:
        if self.method != "kivi" and (self.group != 32 or self.residual != 128):
            raise ValueError(f"group and residual are KIVI parameters; {self.method} does not use them")
        return self


def unique_methods(methods: list[KVMethodSpec]) -> list[KVMethodSpec]:
    names = [m.name for m in methods]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"kv_compression lists {', '.join(duplicates)} more than once")
    return methods
