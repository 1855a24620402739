"""``capture.attention="derived"`` at the API: the spec validates, the estimate counts q and k (no
T×T array), and combinations that make no sense get a 422 naming the fix. Nothing runs a model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.api.support import write_tiny_model


@pytest.fixture
def tiny(tmp_path: Path) -> str:
    return write_tiny_model(tmp_path / "tiny-llama")


def _spec(model: str, capture: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": {"id": model},
        "prompts": ["hello world", "hi"],
        "generation": {"max_new_tokens": 5},
        "capture": capture,
        "storage": {"chunk_rows": 16},
    }


def test_derived_estimate_has_q_and_k_and_no_attention(client: TestClient, tiny: str) -> None:
    derived = client.post("/v1/jobs/estimate", json=_spec(tiny, {"attention": "derived"}))
    assert derived.status_code == 200, derived.text
    body = derived.json()
    arrays = {a["name"]: a for a in body["arrays"]}
    names = ["tokens", "length", "prompt_length", "layer", "head", "kv_head", "q", "k"]
    assert list(arrays) == [*names, "attention_scaling", "attention_window", "attention_chunk"]
    assert arrays["q"]["shape"] == [2, 2, 4, 17, 8] and arrays["k"]["shape"] == [2, 2, 2, 17, 8]
    assert arrays["attention_scaling"]["dtype"] == "float64" and arrays["attention_window"]["shape"] == [2]
    assert any("attention derived" in a for a in body["assumptions"])
    with_v = client.post("/v1/jobs/estimate", json=_spec(tiny, {"attention": "derived", "qkv": True})).json()
    assert "v" in {a["name"] for a in with_v["arrays"]}
    full = client.post("/v1/jobs/estimate", json=_spec(tiny, {"attention": True, "qkv": True})).json()
    assert with_v["raw_bytes"] < full["raw_bytes"]


@pytest.mark.parametrize(
    ("capture", "fix"),
    [
        ({"attention": "derived", "detail": "top_heads"}, "use attention=true with top_heads"),
        ({"attention": "derived", "query_rows": [[0, 4]]}, "drop capture.query_rows"),
        ({"attention": "derived", "generation_steps": [0]}, "drop capture.query_rows"),
        ({"attention": "derive"}, "derived"),
    ],
)
def test_derived_combinations_refused(
    client: TestClient, tiny: str, capture: dict[str, Any], fix: str
) -> None:
    response = client.post("/v1/jobs/estimate", json=_spec(tiny, capture))
    assert response.status_code == 422, response.text
    assert fix in response.text


def test_derived_job_is_accepted(client: TestClient, tiny: str) -> None:
    response = client.post("/v1/jobs", json=_spec(tiny, {"detail": "full", "attention": "derived"}))
    assert response.status_code == 202, response.text
    capture = response.json()["spec"]["capture"]
    assert capture["attention"] == "derived" and capture["detail"] == "full"
