"""An S3 test server that checks presigned URLs the way S3 does: moto behind a signature gate.

moto's S3 server accepts any request: it checks neither ``X-Amz-Signature`` nor
``X-Amz-Expires`` of a presigned URL, nor refuses anonymous reads of a private bucket. Real S3
(and SeaweedFS, MinIO) do all three. This WSGI gate in front of moto's in-process app adds them:

- a query-signed request (presigned URL) must carry a valid SigV4 signature for this exact method,
  host, path and query, recomputed here with botocore and the server's secret, and must arrive
  before ``X-Amz-Date + X-Amz-Expires``;
- a request with neither a SigV4 signature nor an ``Authorization`` header is refused (private
  bucket; legacy SigV2 query signatures count as none: S3 refuses them for new buckets);
- header-signed requests (s3fs writing the bundle) pass through to moto unchanged.

Refusals are 403 with S3's XML error codes (``AccessDenied``, ``SignatureDoesNotMatch``).
"""

from __future__ import annotations

import hmac
import secrets
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from botocore.auth import S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

SIGV4_TIMESTAMP = "%Y%m%dT%H%M%SZ"


@dataclass(frozen=True)
class GatedS3:
    endpoint_url: str
    key: str
    secret: str
    bucket: str

    def storage_options(self) -> dict[str, Any]:
        return {"endpoint_url": self.endpoint_url, "key": self.key, "secret": self.secret}

    def new_store_url(self) -> str:
        return f"s3://{self.bucket}/gated-{secrets.token_hex(6)}"


def _denied(start_response: Any, code: str, message: str) -> Iterable[bytes]:
    body = f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>{message}</Message>"
    body += "</Error>"
    start_response("403 Forbidden", [("Content-Type", "application/xml")])
    return [body.encode()]


def check_presigned(
    method: str, url: str, access_key: str, secret_key: str, now: datetime | None = None
) -> str | None:
    """None when ``url`` is a valid, unexpired SigV4 presigned URL for ``method``; else why not."""
    parts = urlsplit(url)
    params = dict(parse_qsl(parts.query, keep_blank_values=True))
    try:
        signature = params["X-Amz-Signature"]
        credential = params["X-Amz-Credential"].split("/")
        signed_at = datetime.strptime(params["X-Amz-Date"], SIGV4_TIMESTAMP).replace(tzinfo=UTC)
        expires_s = int(params["X-Amz-Expires"])
    except (KeyError, ValueError):
        return "AuthorizationQueryParametersError"
    if credential[0] != access_key or len(credential) != 5:
        return "InvalidAccessKeyId"
    if (now or datetime.now(UTC)) > signed_at + timedelta(seconds=expires_s):
        return "AccessDenied: Request has expired"
    unsigned_query = "&".join(p for p in parts.query.split("&") if not p.startswith("X-Amz-Signature="))
    request = AWSRequest(method=method, url=parts._replace(query=unsigned_query).geturl())
    request.context["timestamp"] = params["X-Amz-Date"]
    auth = S3SigV4QueryAuth(Credentials(access_key, secret_key), "s3", credential[2], expires=expires_s)
    expected = auth.signature(auth.string_to_sign(request, auth.canonical_request(request)), request)
    if not hmac.compare_digest(expected, signature):
        return "SignatureDoesNotMatch"
    return None


class SignatureGate:
    def __init__(self, app: Any, access_key: str, secret_key: str) -> None:
        self.app, self.access_key, self.secret_key = app, access_key, secret_key

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        raw = environ.get("REQUEST_URI") or environ.get("RAW_URI") or environ.get("PATH_INFO", "/")
        query = environ.get("QUERY_STRING", "")
        if "?" not in raw and query:
            raw = f"{raw}?{query}"
        url = f"http://{environ['HTTP_HOST']}{raw}"
        if "X-Amz-Signature=" in query:
            problem = check_presigned(environ["REQUEST_METHOD"], url, self.access_key, self.secret_key)
            if problem is not None:
                code, _, message = problem.partition(": ")
                return _denied(start_response, code, message or problem)
        elif "HTTP_AUTHORIZATION" not in environ:
            return _denied(start_response, "AccessDenied", "Access Denied (anonymous request)")
        result: Iterable[bytes] = self.app(environ, start_response)
        return result


@contextmanager
def gated_s3(bucket: str = "qkvault-gated") -> Iterator[GatedS3]:
    """moto's S3 behind :class:`SignatureGate` on 127.0.0.1:<free port>, ``bucket`` created."""
    import logging

    import s3fs
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    key, secret = "gate-access-key", "gate-secret-key"
    app = SignatureGate(DomainDispatcherApplication(create_backend_app), key, secret)
    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=MotoRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    wz_logger = logging.getLogger("werkzeug")
    old_level = wz_logger.level
    wz_logger.setLevel(logging.WARNING)
    thread.start()
    try:
        info = GatedS3(f"http://127.0.0.1:{server.server_port}", key, secret, bucket)
        fs = s3fs.S3FileSystem(**info.storage_options(), skip_instance_cache=True)
        if not fs.exists(bucket):
            fs.mkdir(bucket)
        yield info
    finally:
        server.shutdown()
        thread.join(timeout=10)
        wz_logger.setLevel(old_level)
