"""The web page (docs/viewer.md): ``GET /`` redirects to ``/ui/``, and ``/ui/`` serves the static
single-page app of ``api/ui/`` (package data: index.html, ES modules, CSS; no build step).

The page needs no API key to load: it asks for one, keeps it in the browser's localStorage and
calls the ``/v1`` routes with ``Authorization: Bearer``. These routes are not part of the API's
OpenAPI schema. Files are read from the package on each request (a few tens of KiB).
"""

from __future__ import annotations

from importlib import resources
from typing import Annotated

from fastapi import APIRouter, Path
from fastapi.responses import RedirectResponse, Response

from api.deps import RootPathDep
from api.problems import ApiProblem

PREFIX = "/ui"
PACKAGE = "api.ui"
INDEX = "index.html"
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}
# The page loads only its own files and talks only to this server.
HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
        "connect-src 'self'; object-src 'none'; base-uri 'self'; frame-ancestors 'none'"
    ),
}

router = APIRouter(include_in_schema=False, tags=["ui"])


def ui_files() -> dict[str, resources.abc.Traversable]:
    """The page's files by name (``api/ui/*.html|js|css``)."""
    folder = resources.files(PACKAGE)
    return {
        entry.name: entry
        for entry in folder.iterdir()
        if entry.is_file() and any(entry.name.endswith(suffix) for suffix in MEDIA_TYPES)
    }


def _serve(name: str) -> Response:
    files = ui_files()
    entry = files.get(name)
    if entry is None:
        raise ApiProblem(
            404,
            "not-found",
            f"the viewer has no file {name!r}; open {PREFIX}/ (its files: {', '.join(sorted(files))})",
        )
    suffix = name[name.rfind(".") :]
    return Response(entry.read_bytes(), media_type=MEDIA_TYPES[suffix], headers=HEADERS)


@router.get("/")
async def root(root_path: RootPathDep) -> RedirectResponse:
    return RedirectResponse(f"{root_path}{PREFIX}/", status_code=307)


@router.get(PREFIX)
async def ui_without_slash(root_path: RootPathDep) -> RedirectResponse:
    return RedirectResponse(f"{root_path}{PREFIX}/", status_code=307)  # relative links need the slash


@router.get(f"{PREFIX}/")
def ui_index() -> Response:
    return _serve(INDEX)


@router.get(PREFIX + "/{name}")
def ui_file(name: Annotated[str, Path(max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]) -> Response:
    return _serve(name)
