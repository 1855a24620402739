"""Typed dependencies: handlers declare what they need (``index: IndexDep``), never reach into
``app.state`` themselves. Who is asking is decided once, in :func:`get_principal` (a bearer API
key looked up by its hash); ownership is checked once, in :func:`get_my_job`.

Dependencies that only hand out an object are ``async`` (no thread-pool hop); the ones that query
the database are plain ``def`` (FastAPI runs them in its thread pool)."""

from __future__ import annotations

from typing import Annotated

from celery import Celery
from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api.problems import ApiProblem
from api.services import Services
from api.settings import ApiSettings
from storage.index import Index, JobRecord
from storage.index.apikeys import ApiKeyRecord, ApiKeys
from storage.inputs import utf8
from storage.stores.objectstore import ObjectStore

UNAUTHENTICATED = "unauthenticated"
_CREATE_HINT = (
    "send the header `Authorization: Bearer <key>`; an administrator creates keys with "
    "`qkvault keys create --owner NAME` (the embedded stack prints its own key at start)"
)
bearer_scheme = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKey",
    bearerFormat="qk_<43 characters>",
    description="API key created with `qkvault keys create`; sent as `Authorization: Bearer qk_...`",
)


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


SettingsDep = Annotated[ApiSettings, Depends(get_settings)]
IndexDep = Annotated[Index, Depends(get_index)]
ObjectStoreDep = Annotated[ObjectStore, Depends(get_object_store)]
CeleryDep = Annotated[Celery, Depends(get_celery_app)]


def _unauthenticated(detail: str, *, invalid: bool) -> ApiProblem:
    # RFC 6750 section 3: a request without credentials gets no error code; a bad token gets invalid_token
    challenge = 'Bearer realm="qkvault"' + (', error="invalid_token"' if invalid else "")
    return ApiProblem(
        401,
        UNAUTHENTICATED,
        f"{detail}; {_CREATE_HINT}",
        title="Unauthorized",
        headers={"WWW-Authenticate": challenge},
    )


def get_principal(
    index: IndexDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> ApiKeyRecord:
    """The API key of the request, or a 401 problem (missing, unknown or revoked key)."""
    if credentials is None or not credentials.credentials:
        raise _unauthenticated("this endpoint needs an API key", invalid=False)
    record = ApiKeys(index).authenticate(credentials.credentials)
    if record is None:
        raise _unauthenticated("the API key is not valid (unknown, mistyped or revoked)", invalid=True)
    return record


PrincipalDep = Annotated[ApiKeyRecord, Depends(get_principal)]


async def get_owner(principal: PrincipalDep) -> str:
    """The owner new jobs belong to: the owner of the API key."""
    return principal.owner


async def get_owner_scope(principal: PrincipalDep) -> str | None:
    """Whose jobs the caller may see: their own, or everyone's (None) for an admin key."""
    return None if principal.admin else principal.owner


OwnerDep = Annotated[str, Depends(get_owner)]
OwnerScopeDep = Annotated[str | None, Depends(get_owner_scope)]

JobIdPath = Annotated[
    str,
    Path(min_length=1, max_length=64, description="job id (also the Celery task id)"),
    utf8("job_id", nul=False),  # PostgreSQL refuses NUL in text: a 422 here, not a 500 from the query
]


def get_my_job(job_id: JobIdPath, index: IndexDep, scope: OwnerScopeDep) -> JobRecord:
    """The caller's job (any job for an admin), or a 404 problem: a job of another owner looks
    exactly like a missing one."""
    return index.get_job(job_id, owner=scope)


JobDep = Annotated[JobRecord, Depends(get_my_job)]


async def root_path(request: Request) -> str:
    """Mount prefix (``--root-path``) to put in front of links and ``Location``."""
    return str(request.scope.get("root_path", ""))


RootPathDep = Annotated[str, Depends(root_path)]
