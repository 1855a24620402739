"""Where a model's weights go on a worker: the placement part of the model spec, what a worker
reports it has, and whether one can run the other — declared once, torch-free, for the API's
admission check and the worker's own check before it loads a model (docs/operations.md,
"Model placement").

- ``model.device_map`` (``"auto"``, ``"balanced"``, ``"balanced_low_0"``, ``"sequential"``; null:
  the whole model on the worker's one device, as before) spreads the model's layers over the GPUs
  of one worker process with accelerate; ``model.num_gpus`` says over how many (the first N the
  worker sees; null: all of them) and ``model.max_memory_gib`` caps each device.
- ``model.quantization`` loads 4-bit or 8-bit bitsandbytes weights; the bundle records it.

A worker reports :class:`WorkerCapabilities` (its devices, GPUs with their memory, whether
accelerate and bitsandbytes import) in the index (:mod:`storage.index.workers`);
:func:`unmet_needs` tells why a worker cannot run a placement, in words that name the spec field and
the fix.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, model_validator

from storage.errors import QkvaultError

DeviceMap = Literal["auto", "balanced", "balanced_low_0", "sequential"]
ComputeDtype = Literal["bfloat16", "float16", "float32"]
GIB = 1 << 30
MAX_GPUS = 64
MAX_GIB = 1 << 20  # 1 PiB: a bound, not a size anyone has
_DEVICE_KEY = re.compile(r"0|[1-9][0-9]?|cpu")


class PlacementUnavailable(QkvaultError, RuntimeError):
    """No worker can place the model as the spec asks (too few GPUs, a package missing)."""

    problem_type = "placement-unavailable"
    status = 422


class QuantizationSpec(BaseModel):
    """Weights quantised on load by bitsandbytes (``BitsAndBytesConfig``). The exported tensors are
    those of the quantised model: its attention, q/k/v and hidden states; the bundle's
    ``model.quantization`` attribute says so."""

    model_config = ConfigDict(extra="forbid")

    bits: Literal[4, 8] = Field(description="4 (NF4/FP4 weights) or 8 (LLM.int8 weights)")
    method: Literal["bitsandbytes"] = Field("bitsandbytes", description="the quantiser; only bitsandbytes")
    compute_dtype: ComputeDtype | None = Field(
        None,
        description="4-bit only: dtype of the matmuls on dequantised weights (null: the model's dtype, "
        "model.dtype)",
    )
    quant_type: Literal["nf4", "fp4"] | None = Field(
        None, description="4-bit only: the 4-bit data type (null: nf4)"
    )
    double_quant: bool = Field(False, description="4-bit only: quantise the quantisation constants too")

    @model_validator(mode="after")
    def _four_bit_options(self) -> QuantizationSpec:
        if self.bits == 8:
            given = [
                name
                for name, on in (
                    ("compute_dtype", self.compute_dtype is not None),
                    ("quant_type", self.quant_type is not None),
                    ("double_quant", self.double_quant),
                )
                if on
            ]
            if given:
                raise ValueError(
                    f"model.quantization.{given[0]} applies to 4-bit weights only: drop it, or use bits 4"
                )
        return self

    @property
    def resolved_quant_type(self) -> str | None:
        return (self.quant_type or "nf4") if self.bits == 4 else None


class Placement(Protocol):
    """The placement fields of :class:`storage.models.spec.ModelSpec`, where they are declared."""

    @property
    def device_map(self) -> DeviceMap | None: ...
    @property
    def num_gpus(self) -> int | None: ...
    @property
    def max_memory_gib(self) -> dict[str, float] | None: ...
    @property
    def quantization(self) -> QuantizationSpec | None: ...


def check_placement(placement: Placement) -> None:
    """Raise ValueError (a 422 naming the field) for placement fields that do not fit together."""
    if placement.device_map is None and (
        placement.num_gpus is not None or placement.max_memory_gib is not None
    ):
        name = "num_gpus" if placement.num_gpus is not None else "max_memory_gib"
        raise ValueError(f"model.{name} needs model.device_map: set device_map (e.g. 'auto') or drop {name}")
    if placement.max_memory_gib is not None and not placement.max_memory_gib:
        raise ValueError("model.max_memory_gib is empty: name at least one device, or drop it")
    for key, gib in (placement.max_memory_gib or {}).items():
        if not _DEVICE_KEY.fullmatch(key):
            raise ValueError(
                f"model.max_memory_gib key {key!r} is not a device: use a GPU index "
                '("0", "1", ... as the worker numbers its visible GPUs) or "cpu"'
            )
        if not 0 < gib <= MAX_GIB:
            raise ValueError(f"model.max_memory_gib[{key!r}] = {gib}: give a number of GiB in (0, {MAX_GIB}]")
        if key != "cpu" and placement.num_gpus is not None and int(key) >= placement.num_gpus:
            raise ValueError(
                f"model.max_memory_gib names GPU {key} but model.num_gpus is {placement.num_gpus} "
                f"(GPUs 0..{placement.num_gpus - 1}): raise num_gpus or drop that key"
            )


def placement_dict(placement: Placement) -> dict[str, Any]:
    """The placement as the bundle attributes and the model cache key record it (JSON)."""
    quant = placement.quantization
    memory = placement.max_memory_gib
    return {
        "device_map": placement.device_map,
        "num_gpus": placement.num_gpus,
        "max_memory_gib": dict(sorted(memory.items())) if memory else None,
        "quantization": None if quant is None else quant.model_dump(mode="json"),
    }


def is_placed(placement: Placement) -> bool:
    """Whether the spec asks for more than the worker's one device at the model's dtype."""
    return placement.device_map is not None or placement.quantization is not None


def gguf_spec(model_id: str, gguf_file: str | None) -> bool:
    """Whether a model id names GGUF weights (as :func:`storage.models.facts.resolve_source` sees it)."""
    return bool(gguf_file) or model_id.startswith("pkg:") or model_id.lower().endswith(".gguf")


# -- what a worker has ---------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuInfo:
    index: int  # as the worker numbers its visible GPUs (CUDA_VISIBLE_DEVICES)
    name: str
    memory_bytes: int


@dataclass(frozen=True)
class WorkerCapabilities:
    """What one worker process can place a model on. ``accelerate`` / ``bitsandbytes``: the installed
    version when the package imports in that process, else None."""

    device: str  # the worker's device setting resolved: "cpu", "cuda", "cuda:1"
    gpus: tuple[GpuInfo, ...] = ()
    accelerate: str | None = None
    bitsandbytes: str | None = None
    torch: str | None = None
    notes: tuple[str, ...] = field(default=())  # why a package did not import, for the operator

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["gpus"] = [asdict(g) for g in self.gpus]
        out["notes"] = list(self.notes)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WorkerCapabilities:
        return cls(
            device=str(data.get("device", "cpu")),
            gpus=tuple(
                GpuInfo(int(g["index"]), str(g.get("name", "")), int(g.get("memory_bytes", 0)))
                for g in data.get("gpus") or ()
            ),
            accelerate=data.get("accelerate"),
            bitsandbytes=data.get("bitsandbytes"),
            torch=data.get("torch"),
            notes=tuple(data.get("notes") or ()),
        )

    def summary(self) -> str:
        gpus = ", ".join(f"{g.index}: {g.name} {g.memory_bytes / GIB:.0f} GiB" for g in self.gpus)
        return (
            f"device {self.device}, {len(self.gpus)} GPU(s){f' ({gpus})' if gpus else ''}, "
            f"accelerate {self.accelerate or 'missing'}, bitsandbytes {self.bitsandbytes or 'missing'}"
        )


Need = Literal["accelerate", "bitsandbytes", "gpus", "gpu_memory"]


@dataclass(frozen=True)
class Unmet:
    """One reason a worker cannot place a model: what is missing (``need``; jobs are routed by all
    but ``gpu_memory``, :mod:`storage.models.routing`), the spec field it concerns and the message."""

    need: Need
    field: str  # "model.num_gpus"
    message: str


def gpus_needed(placement: Placement) -> int:
    """GPUs a worker must have: ``num_gpus``, else the highest GPU named in ``max_memory_gib`` + 1."""
    if placement.num_gpus is not None:
        return placement.num_gpus
    named = [int(k) for k in placement.max_memory_gib or {} if k != "cpu"]
    return max(named) + 1 if named else 0


def unmet_needs(placement: Placement, caps: WorkerCapabilities) -> list[Unmet]:
    """Why ``caps`` cannot run ``placement`` (empty: it can)."""
    out: list[Unmet] = []
    if placement.device_map is not None and caps.accelerate is None:
        out.append(
            Unmet(
                "accelerate",
                "model.device_map",
                "model.device_map needs the Python package accelerate on the worker",
            )
        )
    quant = placement.quantization
    if quant is not None:
        if caps.bitsandbytes is None:
            out.append(
                Unmet(
                    "bitsandbytes",
                    "model.quantization",
                    f"model.quantization ({quant.bits}-bit) needs the Python package bitsandbytes on the "
                    "worker (pip install 'qkvault[quant]')",
                )
            )
        if caps.accelerate is None and placement.device_map is None:
            out.append(
                Unmet(
                    "accelerate",
                    "model.quantization",
                    "model.quantization needs the Python package accelerate",
                )
            )
    need = gpus_needed(placement)
    if need > len(caps.gpus):
        out.append(
            Unmet(
                "gpus",
                "model.num_gpus" if placement.num_gpus is not None else "model.max_memory_gib",
                f"the model is to be spread over {need} GPU(s) but the worker has {len(caps.gpus)}",
            )
        )
    by_index = {g.index: g for g in caps.gpus}
    for key, gib in sorted((placement.max_memory_gib or {}).items()):
        gpu = by_index.get(int(key)) if key != "cpu" else None
        if gpu is not None and gib * GIB > gpu.memory_bytes:
            out.append(
                Unmet(
                    "gpu_memory",
                    "model.max_memory_gib",
                    f"model.max_memory_gib[{key!r}] = {gib:g} GiB exceeds GPU {key}'s "
                    f"{gpu.memory_bytes / GIB:.1f} GiB",
                )
            )
    return out


def placement_refusal(
    placement: Placement, reports: list[tuple[str, WorkerCapabilities]]
) -> PlacementUnavailable | None:
    """The error to raise when none of ``reports`` (worker id, capabilities) can run ``placement``;
    ``None`` when one can, or when there are no reports (nothing is known: the worker checks)."""
    if not reports:
        return None
    verdicts = [(worker, caps, unmet_needs(placement, caps)) for worker, caps in reports]
    if any(not unmet for _, _, unmet in verdicts):
        return None
    # the worker closest to fitting names the fix
    worker, caps, unmet = min(verdicts, key=lambda v: (len(v[2]), -len(v[1].gpus)))
    most_gpus = max(len(c.gpus) for _, c, _ in verdicts)
    reasons = "; ".join(u.message for u in unmet)
    return PlacementUnavailable(
        f"no live worker can place this model: {reasons} (closest: worker {worker}, {caps.summary()}; "
        f"{len(reports)} live worker(s), the largest with {most_gpus} GPU(s)). Fix: ask for what a "
        "worker has (fewer GPUs in model.num_gpus / model.max_memory_gib, or no model.quantization), or "
        "start a worker that has it (docs/operations.md, 'Model placement')",
        detail={
            "field": unmet[0].field,
            "fields": sorted({u.field for u in unmet}),
            "live_workers": len(reports),
            "max_gpus": most_gpus,
        },
    )
