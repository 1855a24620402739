"""Admission where only the ``api`` extra is installed, as in the API image: a real virtual
environment built from pyproject.toml (``pip install -e .[api]``, no torch, no transformers) runs a
real uvicorn process against SQLite and Redis. Prompt lengths are counted with the model's
tokenizer there, so a prompt too long for the model is refused at submission (before a worker
spends 20 s loading the model), and the estimate says its counts are exact.

The environment is kept in ``.cache/api-only-venv`` between runs and rebuilt when pyproject.toml
changes (pip's cache makes a rebuild take about a minute)."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import venv
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from storage.index import Index
from storage.index.apikeys import ApiKeys
from tests.api.support import write_tiny_model
from tests.services import qkvault_env, start_api

pytestmark = [pytest.mark.slow, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]
API_VENV = ROOT / ".cache" / "api-only-venv"
PIP_INSTALL_TIMEOUT_S = 900


def _python(env_dir: Path) -> Path:
    return env_dir / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")


def _api_only_python() -> Path:
    """The interpreter of a virtual environment with ``qkvault[api]`` only (built when missing or
    when pyproject.toml changed)."""
    inputs = (ROOT / "pyproject.toml").read_bytes() + (ROOT / "constraints.txt").read_bytes()
    fingerprint = hashlib.sha256(inputs + sys.version.encode()).hexdigest()
    stamp = API_VENV / ".qkvault-api-only"
    python = _python(API_VENV)
    if python.exists() and stamp.exists() and stamp.read_text() == fingerprint:
        return python
    shutil.rmtree(API_VENV, ignore_errors=True)
    venv.EnvBuilder(with_pip=True).create(API_VENV)
    subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "-e",
            f"{ROOT}[api]",
            "-c",
            str(ROOT / "constraints.txt"),
        ],
        check=True,
        stdin=subprocess.DEVNULL,
        timeout=PIP_INSTALL_TIMEOUT_S,
    )
    stamp.write_text(fingerprint)
    return python


@pytest.fixture(scope="module")
def api_only_python() -> Path:
    return _api_only_python()


def _importable(python: Path, module: str) -> bool:
    probe = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
    return subprocess.run([str(python), "-c", probe], stdin=subprocess.DEVNULL, timeout=60).returncode == 0


@pytest.fixture
def api(api_only_python: Path, tmp_path: Path, redis_url: str, queue_name: str) -> Iterator[httpx.Client]:
    database_url = f"sqlite:///{tmp_path}/index.db"
    index = Index(database_url)
    index.migrate()
    key, _ = ApiKeys(index).create(owner="alice", label="api-only")
    index.dispose()
    env = qkvault_env(
        redis_url=redis_url,
        database_url=database_url,
        store_url=str(tmp_path / "store"),
        queue_name=queue_name,
        migrate_on_startup="false",
        model_roots=[tmp_path],  # where ``tiny`` is
    )
    with (
        start_api(env, python=str(api_only_python), log_path=tmp_path / "api.log") as running,
        httpx.Client(base_url=running.base_url, headers={"Authorization": f"Bearer {key}"}) as client,
    ):
        yield client


@pytest.fixture
def tiny(tmp_path: Path) -> str:
    return write_tiny_model(tmp_path / "tiny-llama")


def test_the_api_extra_has_no_torch_and_counts_tokens_exactly(api_only_python: Path) -> None:
    assert _importable(api_only_python, "tokenizers") and _importable(api_only_python, "fastapi")
    assert not _importable(api_only_python, "torch")
    assert not _importable(api_only_python, "transformers")


def test_a_prompt_too_long_for_the_model_is_refused_at_submission(api: httpx.Client, tiny: str) -> None:
    spec = {"model": {"id": tiny}, "prompts": ["x" * 300], "generation": {"max_new_tokens": 1}}
    response = api.post("/v1/jobs", json=spec)
    assert response.status_code == 422, response.text
    assert "prompt 0 is too long for the model: 301 tokens" in response.json()["detail"]
    assert api.get("/v1/jobs").json()["items"] == []  # nothing stored

    spec["prompts"] = ["hello"]
    estimate = api.post("/v1/jobs/estimate", json=spec).json()
    assert (estimate["tokens"]["prompt"], estimate["tokens"]["exact"], estimate["approximate"]) == (
        [6],
        True,
        False,
    )
