"""The numpy side of the KV method registry (no torch): what a job spec accepts comes from it."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from storage.kvquant.registry import kv_method, method_names, register
from storage.kvquant.spec import KVMethodSpec


def test_spec_names_bits_and_parameters_come_from_the_registry() -> None:
    schema = KVMethodSpec.model_json_schema()["properties"]
    assert schema["method"]["enum"] == list(method_names()) == ["turboquant_prod", "turboquant_mse", "kivi"]
    assert schema["bits"]["enum"] == [2, 3, 4]
    with pytest.raises(
        ValidationError, match="Input should be 'turboquant_prod', 'turboquant_mse' or 'kivi'"
    ):
        KVMethodSpec.model_validate({"method": "kivi2", "bits": 2})
    with pytest.raises(ValidationError, match="Input should be 2, 3 or 4"):
        KVMethodSpec.model_validate({"method": "kivi", "bits": 8})
    with pytest.raises(ValidationError, match="group and residual are KIVI parameters; turboquant_prod"):
        KVMethodSpec.model_validate({"method": "turboquant_prod", "bits": 2, "residual": 0})
    assert KVMethodSpec.model_validate({"method": "kivi", "bits": 2, "group": 16}).group == 16


def test_registry_refuses_duplicates_and_names_unknown_methods() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register(kv_method("kivi"))
    with pytest.raises(ValueError, match="unknown KV method 'nope'"):
        kv_method("nope")


def test_stored_params_read_back_leniently() -> None:
    params = {"method": "kivi", "bits": 3, "group": 16, "residual": 8, "added_later": 1}
    assert KVMethodSpec.from_params(params) == KVMethodSpec(method="kivi", bits=3, group=16, residual=8)
