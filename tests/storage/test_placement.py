"""The placement part of the model spec (device_map, num_gpus, max_memory_gib, quantization): what
validation refuses and why, and whether a worker's reported capabilities can run a placement."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from storage.jobs.spec import JobSpec
from storage.models.placement import (
    GIB,
    GpuInfo,
    WorkerCapabilities,
    gpus_needed,
    is_placed,
    placement_dict,
    placement_refusal,
    unmet_needs,
)
from storage.models.spec import SMOLLM2_GGUF, ModelSpec


def _refused(model: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as info:
        JobSpec.model_validate({"model": model, "prompts": ["x"]})
    return str(info.value)


def test_default_spec_is_unplaced_and_dumps_nulls() -> None:
    spec = ModelSpec(id="org/name")
    assert not is_placed(spec)
    dumped = spec.model_dump(mode="json")
    assert {k: dumped[k] for k in ("device_map", "num_gpus", "max_memory_gib", "quantization")} == {
        "device_map": None,
        "num_gpus": None,
        "max_memory_gib": None,
        "quantization": None,
    }


def test_a_full_placement_validates_and_records_its_fields() -> None:
    spec = ModelSpec(
        id="org/name",
        device_map="balanced",
        num_gpus=2,
        max_memory_gib={"1": 70, "0": 60, "cpu": 200},
        quantization={"bits": 4, "quant_type": "fp4", "compute_dtype": "bfloat16", "double_quant": True},
    )
    assert is_placed(spec) and gpus_needed(spec) == 2
    recorded = placement_dict(spec)
    assert list(recorded["max_memory_gib"]) == ["0", "1", "cpu"]  # sorted: one cache key per placement
    assert recorded["quantization"]["quant_type"] == "fp4" and recorded["quantization"]["bits"] == 4
    assert ModelSpec(id="org/name", quantization={"bits": 4}).quantization.resolved_quant_type == "nf4"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("model", "says"),
    [
        ({"num_gpus": 2}, "model.num_gpus needs model.device_map"),
        ({"max_memory_gib": {"0": 10}}, "model.max_memory_gib needs model.device_map"),
        ({"device_map": "auto", "max_memory_gib": {"gpu0": 10}}, "key 'gpu0' is not a device"),
        ({"device_map": "auto", "max_memory_gib": {"0": 0}}, "give a number of GiB"),
        ({"device_map": "auto", "max_memory_gib": {}}, "max_memory_gib is empty"),
        (
            {"device_map": "auto", "num_gpus": 2, "max_memory_gib": {"2": 10}},
            "names GPU 2 but model.num_gpus is 2",
        ),
        ({"device_map": "everywhere"}, "device_map"),
        ({"device_map": "auto", "num_gpus": 0}, "num_gpus"),
        ({"quantization": {"bits": 3}}, "Input should be 4 or 8"),
        ({"quantization": {"bits": 8, "quant_type": "nf4"}}, "quant_type applies to 4-bit weights only"),
        ({"quantization": {"bits": 8, "double_quant": True}}, "double_quant applies to 4-bit weights only"),
        ({"quantization": {"bits": 4, "method": "gptq"}}, "bitsandbytes"),
    ],
)
def test_invalid_placements_are_refused_naming_the_field(model: dict[str, Any], says: str) -> None:
    assert says in _refused({"id": "org/name", **model})


@pytest.mark.parametrize(
    "model",
    [
        {"id": SMOLLM2_GGUF},
        {"id": "/models/llama.Q4_K_M.gguf"},
        {"id": "org/name-GGUF", "gguf_file": "model.Q8_0.gguf"},
    ],
)
def test_quantization_of_a_gguf_model_is_refused(model: dict[str, Any]) -> None:
    message = _refused({**model, "quantization": {"bits": 4}})
    assert "with a GGUF model" in message and "drop model.quantization" in message
    JobSpec.model_validate({"model": {**model, "device_map": "auto"}, "prompts": ["x"]})  # device_map is fine


_CPU = WorkerCapabilities(device="cpu", accelerate="1.16.0")
_TWO_GPUS = WorkerCapabilities(
    device="cuda",
    gpus=(GpuInfo(0, "H200", 140 * GIB), GpuInfo(1, "H200", 140 * GIB)),
    accelerate="1.16.0",
    bitsandbytes="0.50.2",
)


def test_unmet_needs_name_the_field() -> None:
    two = ModelSpec(id="o/n", device_map="auto", num_gpus=2)
    assert [u.field for u in unmet_needs(two, _CPU)] == ["model.num_gpus"]
    assert unmet_needs(two, _TWO_GPUS) == []
    big = ModelSpec(id="o/n", device_map="auto", max_memory_gib={"0": 200})
    (unmet,) = unmet_needs(big, _TWO_GPUS)
    assert unmet.field == "model.max_memory_gib" and "exceeds GPU 0's 140.0 GiB" in unmet.message
    four_bit = ModelSpec(id="o/n", quantization={"bits": 4})
    (unmet,) = unmet_needs(four_bit, _CPU)
    assert unmet.field == "model.quantization" and "bitsandbytes" in unmet.message
    bare = WorkerCapabilities(device="cpu")  # no accelerate either
    assert {u.field for u in unmet_needs(ModelSpec(id="o/n", device_map="auto"), bare)} == {
        "model.device_map"
    }


def test_refusal_needs_live_reports_and_names_the_closest_worker() -> None:
    two = ModelSpec(id="o/n", device_map="auto", num_gpus=2)
    assert placement_refusal(two, []) is None  # nothing reported: admitted, the worker checks
    assert placement_refusal(two, [("a:1", _CPU), ("b:2", _TWO_GPUS)]) is None
    refusal = placement_refusal(
        ModelSpec(id="o/n", device_map="auto", num_gpus=4), [("a:1", _CPU), ("b:2", _TWO_GPUS)]
    )
    assert refusal is not None and refusal.status == 422 and refusal.problem_type == "placement-unavailable"
    assert "spread over 4 GPU(s) but the worker has 2" in refusal.message and "worker b:2" in refusal.message
    assert refusal.detail["max_gpus"] == 2 and refusal.detail["fields"] == ["model.num_gpus"]


def test_capabilities_round_trip_through_json() -> None:
    assert WorkerCapabilities.from_dict(_TWO_GPUS.to_dict()) == _TWO_GPUS
