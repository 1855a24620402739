"""Typed dependencies: handlers declare what they need (``index: IndexDep``), never reach into
``app.state`` themselves. Ownership is checked once, in :func:`get_my_job`.

Dependencies that only hand out an object are ``async`` (no thread-pool hop); the one that queries
the database is a plain ``def`` (FastAPI runs it in its thread pool)."""

from __future__ import annotations

from typing import Annotated

from celery import Celery
from fastapi import Depends, Path, Request

from api.services import Services
from api.settings import ApiSettings
from storage.index import Index, JobRecord
from storage.objectstore import ObjectStore

# Single-user mode: every request acts as this owner until API keys arrive.
LOCAL_OWNER = "local"


async def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


async def get_settings(services: ServicesDep) -> ApiSettings:
    return services.settings


async def get_index(services: ServicesDep) -> Index:
    return services.index


async def get_object_store(services: ServicesDep) -> ObjectStore:
    return services.object_store


async def get_celery_app(services: ServicesDep) -> Celery:
    return services.celery_app


async def get_owner() -> str:
    """Who is asking. Swap this dependency (``app.dependency_overrides``) when authentication lands."""
    return LOCAL_OWNER


SettingsDep = Annotated[ApiSettings, Depends(get_settings)]
IndexDep = Annotated[Index, Depends(get_index)]
ObjectStoreDep = Annotated[ObjectStore, Depends(get_object_store)]
CeleryDep = Annotated[Celery, Depends(get_celery_app)]
OwnerDep = Annotated[str, Depends(get_owner)]

JobIdPath = Annotated[str, Path(min_length=1, max_length=64, description="job id (also the Celery task id)")]


def get_my_job(job_id: JobIdPath, index: IndexDep, owner: OwnerDep) -> JobRecord:
    """The caller's job, or a 404 problem (a job of another owner looks missing)."""
    return index.get_job(job_id, owner=owner)


JobDep = Annotated[JobRecord, Depends(get_my_job)]


async def root_path(request: Request) -> str:
    """Mount prefix (``--root-path``) to put in front of links and ``Location``."""
    return str(request.scope.get("root_path", ""))


RootPathDep = Annotated[str, Depends(root_path)]
