"""One settings class per deployable (API, worker, client/CLI), each read from ``QKVAULT_*``; the
table of environment variables in docs/operations.md is generated from them and cannot drift."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from api.settings import ApiSettings
from qkvault.settings import ClientSettings
from storage.settings import ServiceSettings, huggingface_hub_cache
from storage.settings_doc import (
    BEGIN,
    END,
    deployables,
    env_rows,
    generated_part,
    render_env_table,
    with_table,
)
from worker.settings import WorkerSettings

REPO = Path(__file__).resolve().parents[1]
ADMISSION_LIMITS = (
    "max_prompts",
    "max_new_tokens",
    "max_total_tokens",
    "max_stored_bytes",
    "max_jobs_in_flight",
)


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No ``QKVAULT_*`` from the caller's shell; the test sets what it reads."""
    for name in list(os.environ):
        if name.startswith("QKVAULT_"):
            monkeypatch.delenv(name)
    return monkeypatch


def test_docs_table_is_generated_from_the_classes() -> None:
    """Fails when a field or its description changed: run ``python scripts/settings_table.py --write``."""
    assert {cls.deployable for cls in deployables()} == {"API", "worker", "client/CLI"}
    doc = (REPO / "docs" / "operations.md").read_text(encoding="utf-8")
    assert generated_part(doc) == render_env_table(deployables()), (
        "docs/operations.md's settings table is stale: run .venv/bin/python scripts/settings_table.py --write"
    )


def test_table_rows_name_their_readers() -> None:
    rows = {(row.name, row.read_by) for row in env_rows(deployables())}
    assert ("QKVAULT_REDIS_URL", ("API", "worker")) in rows  # shared: declared once, one row
    assert ("QKVAULT_MAX_PROMPTS", ("API",)) in rows
    assert ("QKVAULT_LEASE_TIMEOUT_S", ("worker",)) in rows
    assert ("QKVAULT_API_KEY", ("client/CLI",)) in rows
    # the client reads QKVAULT_DATABASE_URL with another default (the embedded stack's index): its own row
    assert {r for n, r in rows if n == "QKVAULT_DATABASE_URL"} == {("API", "worker"), ("client/CLI",)}


def test_only_the_generated_part_is_rewritten() -> None:
    doc = f"intro\n{BEGIN}\nold\n{END}\noutro\n"
    out = with_table(doc, "| new |")
    assert out == f"intro\n{BEGIN}\n| new |\n{END}\noutro\n" and generated_part(out) == "| new |"
    with pytest.raises(ValueError, match="markers"):
        with_table("no markers", "| new |")


def test_admission_limits_live_in_the_api_settings_only() -> None:
    for name in ADMISSION_LIMITS:
        assert name in ApiSettings.model_fields
        assert name not in WorkerSettings.model_fields and name not in ServiceSettings.model_fields
    for name in ("lease_timeout_s", "chunk_checksum", "device", "api_key", "api_base_url"):
        assert name not in ApiSettings.model_fields


def test_api_settings_from_env(env: pytest.MonkeyPatch) -> None:
    env.setenv("QKVAULT_DATABASE_URL", "postgresql+psycopg://u@db/q")
    env.setenv("QKVAULT_MAX_PROMPTS", "7")
    env.setenv("QKVAULT_MAX_STORED_BYTES", "1024")
    env.setenv("QKVAULT_S3_REGION", "")  # empty: unset
    env.setenv("QKVAULT_HUB_CACHE_DIR", "")
    settings = ApiSettings()
    assert (settings.database_url, settings.max_prompts, settings.max_stored_bytes) == (
        "postgresql+psycopg://u@db/q",
        7,
        1024,
    )
    assert settings.s3_region is None and settings.hub_cache_dir is None
    env.setenv("QKVAULT_MAX_PROMPTS", "0")
    with pytest.raises(ValidationError, match="max_prompts"):
        ApiSettings()


def test_worker_settings_from_env(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert WorkerSettings().model_cache_dir == Path.home() / ".cache" / "qkvault" / "models"
    env.setenv("QKVAULT_CHUNK_CHECKSUM", "sha256")
    env.setenv("QKVAULT_DEVICE", "cpu")
    env.setenv("QKVAULT_MODEL_CACHE_DIR", "~/models")
    env.setenv("QKVAULT_QUEUE_NAME", "q2")
    settings = WorkerSettings()
    assert (settings.chunk_checksum, settings.device, settings.queue_name) == ("sha256", "cpu", "q2")
    assert settings.model_cache_dir == Path.home() / "models"
    assert WorkerSettings.model_fields["model_cache_dir"].default == Path("~/.cache/qkvault/models")
    env.setenv("QKVAULT_HEARTBEAT_INTERVAL_S", "30")
    env.setenv("QKVAULT_LEASE_TIMEOUT_S", "30")
    with pytest.raises(ValidationError, match="raise QKVAULT_LEASE_TIMEOUT_S"):
        WorkerSettings()


def test_checkout_model_cache_from_env(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from worker.models import checkout_model_cache_dir

    env.setenv("QKVAULT_TEST_MODEL_CACHE", str(tmp_path / "cache"))
    assert checkout_model_cache_dir() == tmp_path / "cache" and (tmp_path / "cache").is_dir()


def test_client_settings_from_env(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    settings = ClientSettings()
    assert (
        settings.home == Path(".qkvault")
        and settings.api_base_url is None
        and settings.api_key_value() is None
    )
    assert settings.keys_database_url() == f"sqlite:///{Path('.qkvault').resolve() / 'index.db'}"
    env.setenv("QKVAULT_HOME", str(tmp_path))
    env.setenv("QKVAULT_API_BASE_URL", "http://api.example:8000")
    env.setenv("QKVAULT_API_KEY", " qk_secret ")
    settings = ClientSettings()
    assert settings.home == tmp_path and settings.api_base_url == "http://api.example:8000"
    assert settings.api_key_value() == "qk_secret" and "qk_secret" not in repr(settings)
    assert settings.keys_database_url() == f"sqlite:///{tmp_path / 'index.db'}"
    assert settings.keys_database_url(tmp_path / "other") == f"sqlite:///{tmp_path / 'other' / 'index.db'}"
    env.setenv("QKVAULT_DATABASE_URL", "sqlite:///x.db")
    assert ClientSettings().keys_database_url(tmp_path / "other") == "sqlite:///x.db"
    env.setenv("QKVAULT_API_KEY", "")
    assert ClientSettings().api_key_value() is None


def test_client_reads_its_settings(env: pytest.MonkeyPatch) -> None:
    from qkvault.client import API_BASE_URL_ENV, API_KEY_ENV, Client

    assert (API_BASE_URL_ENV, API_KEY_ENV) == ("QKVAULT_API_BASE_URL", "QKVAULT_API_KEY")
    assert Client().base_url == "http://127.0.0.1:8000" and not Client().has_api_key
    env.setenv("QKVAULT_API_BASE_URL", "http://api.example:8000/v1/")
    env.setenv("QKVAULT_API_KEY", "qk_env")
    from_env = Client()
    assert from_env.base_url == "http://api.example:8000" and from_env.has_api_key
    assert Client("http://other:1").base_url == "http://other:1"  # an argument wins


def test_embedded_stack_keeps_a_model_cache_the_user_set(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from qkvault.embedded import EmbeddedStack

    stack = EmbeddedStack(tmp_path)
    assert stack._child_settings(1, 2)["QKVAULT_MODEL_CACHE_DIR"] == str(tmp_path.resolve() / "models")
    env.setenv("QKVAULT_MODEL_CACHE_DIR", str(tmp_path / "mine"))
    assert "QKVAULT_MODEL_CACHE_DIR" not in stack._child_settings(1, 2)  # inherited by the children


def test_model_roots_from_env(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``QKVAULT_MODEL_ROOTS``: comma-separated or a JSON list of absolute folders; unset, the model
    cache and the Hugging Face hub cache (and, on the API, ``QKVAULT_HUB_CACHE_DIR``)."""
    from huggingface_hub import constants

    env.setenv("QKVAULT_MODEL_CACHE_DIR", str(tmp_path / "cache"))
    default = WorkerSettings().model_root_dirs()
    assert (
        default
        == (tmp_path / "cache", Path(constants.HF_HUB_CACHE))
        == (tmp_path / "cache", huggingface_hub_cache())
    )
    env.setenv("QKVAULT_HUB_CACHE_DIR", str(tmp_path / "workers-hf"))
    assert ApiSettings().model_root_dirs() == (*default, tmp_path / "workers-hf")
    env.setenv("QKVAULT_MODEL_ROOTS", f" {tmp_path}/a/ , ~/b ,{tmp_path}/c/../d")
    expected = (tmp_path / "a", Path.home() / "b", tmp_path / "d")
    assert WorkerSettings().model_root_dirs() == ApiSettings().model_root_dirs() == expected
    env.setenv("QKVAULT_MODEL_ROOTS", f'["{tmp_path}/with,comma"]')
    assert WorkerSettings().model_root_dirs() == (tmp_path / "with,comma",)
    env.setenv("QKVAULT_MODEL_ROOTS", "models")
    with pytest.raises(ValidationError, match="model root 'models' is not an absolute path"):
        WorkerSettings()


def test_embedded_stack_children_admit_their_model_cache(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``qkvault up``: the API's and the worker's default model roots hold the stack's model cache."""
    from qkvault.embedded import EmbeddedStack

    for name, value in EmbeddedStack(tmp_path)._child_settings(1, 2).items():
        env.setenv(name, value)
    for settings in (WorkerSettings(), ApiSettings()):
        assert tmp_path.resolve() / "models" in settings.model_root_dirs()


HAND_READ = re.compile(
    r"""(environ\s*(\.get\(|\[)|getenv\()\s*f?["']QKVAULT_|["']QKVAULT_\w*["']\s+in\s+os\.environ"""
)


def test_nothing_reads_qkvault_variables_by_hand() -> None:
    """Only the settings classes read ``QKVAULT_*`` in the deployables' packages."""
    offenders = []
    for package in ("api", "worker", "storage", "qkvault"):
        for path in sorted((REPO / package).rglob("*.py")):
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if HAND_READ.search(line):
                    offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not offenders, "read these through the deployable's settings class:\n" + "\n".join(offenders)
    assert HAND_READ.search('x = os.environ.get("QKVAULT_HOME")')
    assert HAND_READ.search("os.environ['QKVAULT_DATABASE_URL']")
