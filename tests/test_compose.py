"""docker-compose.yml holds what production needs (and passes `docker compose config` where a
compose CLI exists)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def _compose() -> dict[str, Any]:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_services_and_health_checks() -> None:
    services = _compose()["services"]
    for name in ("redis", "postgres", "api", "worker", "flower", "migrate"):
        assert name in services, f"compose lacks the {name} service"
    for name in ("redis", "postgres", "api"):
        assert "healthcheck" in services[name], f"{name} has no health check"
    redis_command = " ".join(map(str, services["redis"]["command"]))
    assert "--appendonly yes" in redis_command and "noeviction" in redis_command
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    s3 = [n for n, s in services.items() if "s3" in " ".join(map(str, s.get("command", [])))]
    assert s3, "no S3-compatible server"


@pytest.mark.skipif(not shutil.which("docker"), reason="no docker CLI")
def test_docker_compose_config_passes() -> None:
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip("docker CLI has no compose plugin")
    result = subprocess.run(
        ["docker", "compose", "--env-file", ".env.example", "config", "-q"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
