"""What a job captures: detail presets, explicit switches that override them, and selections.

Presets (``capture.detail``) expand to explicit settings (:meth:`CaptureSpec.resolved`); the
resolved settings are what the worker runs and what the bundle records.

``attention: "derived"`` stores post-RoPE q and k instead of the T×T probabilities; readers
reconstruct any block exactly (:mod:`storage.bundle.derived`, docs/bundle-format.md).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from storage.bundle.labels import SummaryParams

Detail = Literal["summary", "attention_only", "top_heads", "full"]
SWITCHES = ("attention", "qkv", "hidden_states", "summary", "alternatives")

PRESETS: dict[str, dict[str, bool]] = {
    # per-head metrics and labels, token alternatives; no matrices
    "summary": {
        "attention": False,
        "qkv": False,
        "hidden_states": False,
        "summary": True,
        "alternatives": True,
    },
    # attention, no q/k/v
    "attention_only": {
        "attention": True,
        "qkv": False,
        "hidden_states": False,
        "summary": False,
        "alternatives": False,
    },
    # attention of the N heads per layer that rank highest on a summary metric of this same run
    "top_heads": {
        "attention": True,
        "qkv": False,
        "hidden_states": False,
        "summary": True,
        "alternatives": False,
    },
    # everything
    "full": {"attention": True, "qkv": True, "hidden_states": True, "summary": True, "alternatives": True},
}
NO_PRESET = {"attention": True, "qkv": False, "hidden_states": False, "summary": False, "alternatives": False}

# Per-head summary metrics (HEAD_METRICS.md) a researcher can rank heads by.
RankMetric = Literal[
    "sink",
    "bos",
    "local",
    "middle",
    "prev",
    "self",
    "prev_argmax_rate",
    "max_weight",
    "entropy",
    "entropy_norm",
    "effective_keys",
    "k90",
    "k90_frac",
    "sparsity_1pct",
    "mean_distance",
    "mean_distance_norm",
    "middle_k90",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InductionProbeSpec(_Strict):
    """Induction score on a repeated random-token probe: a random sequence of ``length`` tokens
    shown twice; a head's score is its mean attention, from each token of the second copy, on the
    token after that token's previous occurrence. Flagged as an induction head above ``threshold``."""

    length: int = Field(64, ge=4, le=4096, description="random tokens per copy")
    seed: int = Field(0, ge=0)
    threshold: float = Field(0.4, ge=0, le=1)


class TopHeadsSpec(_Strict):
    n: int = Field(4, ge=1, le=1024, description="heads kept per layer")
    metric: RankMetric = Field("entropy", description="summary metric (mean over eligible rows) to rank by")
    order: Literal["lowest", "highest"] = Field("lowest", description="keep the lowest or highest values")


class CaptureSpec(_Strict):
    """What to capture. ``detail`` picks a preset; explicit switches override it."""

    detail: Detail | None = Field(
        None, description="preset: summary | attention_only | top_heads | full (default: attention only)"
    )
    attention: bool | Literal["derived"] | None = Field(
        None,
        description='attention probabilities (layer, batch, head, query, key); "derived": store post-RoPE '
        "q and k instead (no T×T array) and reconstruct any block on read",
    )
    qkv: bool | None = Field(None, description="post-RoPE q (per query head) and k, v (per kv head)")
    hidden_states: bool | None = Field(None, description="residual stream after each selected layer")
    summary: bool | None = Field(None, description="per-head metrics and pattern labels (every row seen)")
    alternatives: bool | None = Field(None, description="top-k tokens and log-probabilities per step")
    alternatives_k: int = Field(5, ge=1, le=100, description="k of the token alternatives")
    prompt_alternatives: bool = Field(False, description="also the alternatives at every prompt position")
    top_heads: TopHeadsSpec | None = Field(None, description="with detail=top_heads: how heads are chosen")
    layers: list[int] | None = Field(None, description="model layer indices to export; default all")
    heads: list[int] | None = Field(
        None, description="query-head indices to export; default all. k/v export the kv heads they read."
    )
    generation_steps: list[int] | None = Field(
        None, description="keep attention rows of these generated steps only (0 = first generated token)"
    )
    query_rows: list[tuple[int, int]] | None = Field(
        None, description="keep attention rows of these [start, end) token-position ranges only"
    )
    summary_params: SummaryParams = Field(default_factory=SummaryParams)
    induction_probe: InductionProbeSpec | None = Field(
        None, description="also run the induction probe (needs summary): summary/induction (layer, head)"
    )

    @field_validator("layers", "heads", "generation_steps")
    @classmethod
    def _sorted_unique(cls, value: list[int] | None) -> list[int] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("must not be empty: omit the field (or use null) to select all")
        if any(v < 0 for v in value):
            raise ValueError("indices must be >= 0")
        if len(set(value)) != len(value):
            raise ValueError("indices must be unique")
        return sorted(value)

    @field_validator("query_rows")
    @classmethod
    def _ranges(cls, value: list[tuple[int, int]] | None) -> list[tuple[int, int]] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("must not be empty: omit the field (or use null) to keep every row")
        for start, end in value:
            if not 0 <= start < end:
                raise ValueError(
                    f"range [{start}, {end}) is empty or negative: use [start, end) with start < end"
                )
        return sorted(value)

    def switches(self) -> dict[str, bool]:
        """The explicit on/off of every capture, after applying the preset and the overrides
        (``attention`` is on for both materialised and derived attention)."""
        base = PRESETS[self.detail] if self.detail else NO_PRESET
        return {
            name: bool(base[name] if getattr(self, name) is None else getattr(self, name))
            for name in SWITCHES
        }

    @model_validator(mode="after")
    def _consistent(self) -> CaptureSpec:
        on = self.switches()
        if not any(on.values()):
            raise ValueError(f"nothing to capture: turn on at least one of {', '.join(SWITCHES)}")
        if self.detail == "top_heads" and not on["summary"]:
            raise ValueError("detail=top_heads ranks heads by their summary metrics: summary cannot be false")
        if self.induction_probe is not None and not on["summary"]:
            raise ValueError("induction_probe is part of the summary: summary cannot be false")
        if self.top_heads is not None and self.detail != "top_heads":
            raise ValueError("top_heads settings need detail=top_heads")
        if self.attention == "derived":
            if self.detail == "top_heads":
                raise ValueError(
                    'attention="derived" stores no probabilities, but detail=top_heads stores the '
                    "materialised attention of the heads it ranks: use attention=true with top_heads, or "
                    'attention="derived" with summary=true and pick heads from the summary when reading'
                )
            if self.query_rows is not None or self.generation_steps is not None:
                raise ValueError(
                    'attention="derived" stores q and k of every position, and any attention row can be '
                    "reconstructed when reading (ds.attention.isel(query=...)): drop capture.query_rows "
                    "and capture.generation_steps"
                )
        return self

    def resolved(self) -> ResolvedCapture:
        derived = self.attention == "derived"
        on = self.switches()
        return ResolvedCapture(
            **{**on, "attention": on["attention"] and not derived},
            derived_attention=derived,
            alternatives_k=self.alternatives_k,
            prompt_alternatives=self.prompt_alternatives,
            top_heads=(self.top_heads or TopHeadsSpec()) if self.detail == "top_heads" else None,
            layers=self.layers,
            heads=self.heads,
            generation_steps=self.generation_steps,
            query_rows=self.query_rows,
            summary_params=self.summary_params,
            induction_probe=self.induction_probe,
            detail=self.detail,
        )


class ResolvedCapture(_Strict):
    """Explicit capture settings (no preset left to interpret): what the worker runs."""

    detail: Detail | None
    attention: bool  # materialised T×T probabilities
    qkv: bool
    hidden_states: bool
    summary: bool
    alternatives: bool
    alternatives_k: int
    prompt_alternatives: bool
    top_heads: TopHeadsSpec | None
    layers: list[int] | None
    heads: list[int] | None
    generation_steps: list[int] | None
    query_rows: list[tuple[int, int]] | None
    summary_params: SummaryParams
    induction_probe: InductionProbeSpec | None = None
    # attention="derived": q and k stored for reconstruction, no T×T array (``attention`` is false)
    derived_attention: bool = False

    @property
    def selects_rows(self) -> bool:
        return self.generation_steps is not None or self.query_rows is not None

    def keeps_row(self, position: int, prompt_length: int) -> bool:
        """Whether the attention row of token ``position`` is stored (metrics still see every row)."""
        if not self.selects_rows:
            return True
        if self.query_rows and any(start <= position < end for start, end in self.query_rows):
            return True
        step = position - prompt_length
        return bool(self.generation_steps) and step >= 0 and step in (self.generation_steps or ())
