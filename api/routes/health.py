"""Liveness (``/healthz``: the process answers) and readiness (``/readyz``: database and Redis answer)."""

from __future__ import annotations

import logging

import redis
from fastapi import APIRouter

from api.deps import IndexDep, SettingsDep
from api.problems import ApiProblem
from api.schemas import Health

log = logging.getLogger("qkvault.api")

router = APIRouter(tags=["health"])


@router.get(
    "/healthz",
    response_model=Health,
    response_model_exclude_none=True,
    summary="Liveness: the API process is up",
)
def healthz() -> Health:
    return Health(status="ok")


def _check_database(index: IndexDep) -> str:
    # One cheap indexed query through the public API: proves the connection and the migrated schema.
    index.list_jobs(owner="__readyz__", limit=1)
    return "ok"


def _check_redis(url: str, timeout_s: float) -> str:
    client = redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
    try:
        client.ping()
    finally:
        client.close()
    return "ok"


@router.get("/readyz", response_model=Health, summary="Readiness: database and Redis answer")
def readyz(index: IndexDep, settings: SettingsDep) -> Health:
    checks: dict[str, str] = {}
    for name, check in (
        ("database", lambda: _check_database(index)),
        ("redis", lambda: _check_redis(settings.redis_url, settings.broker_timeout_s)),
    ):
        try:
            checks[name] = check()
        except Exception as exc:
            log.warning("readiness check %s failed: %s", name, exc)
            checks[name] = f"unavailable: {type(exc).__name__}"
    failed = sorted(k for k, v in checks.items() if v != "ok")
    if failed:
        raise ApiProblem(
            503, "not-ready", f"not ready: {', '.join(failed)} unavailable", extensions={"checks": checks}
        )
    return Health(status="ok", checks=checks)
