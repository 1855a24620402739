"""Fetch the objects of a bundle through presigned URLs (``GET /v1/jobs/{id}/bundle/urls``).

The URLs carry their own signature: they are fetched with a plain HTTP client that holds no API
key and no S3 credentials, so neither ever reaches the object store.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import httpx

from qkvault.bundlefile import PIECE_BYTES
from qkvault.errors import QkvaultClientError


def fetch_objects(objects: Iterable[Mapping[str, Any]], dest: Path, timeout: httpx.Timeout) -> Path:
    """Write each ``{"key", "url"}`` to ``dest/<key>``; the directory appears whole or not at all
    (written to ``<dest>.partial`` first). Returns ``dest``."""
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        with httpx.Client(timeout=timeout, follow_redirects=True) as plain:
            for obj in objects:
                key, url = str(obj["key"]), str(obj["url"])
                target = partial / key
                if partial.resolve() not in target.resolve().parents:
                    raise QkvaultClientError(f"refusing object key {key!r}: it points outside the bundle")
                target.parent.mkdir(parents=True, exist_ok=True)
                with plain.stream("GET", url) as response:
                    if response.status_code >= 400:
                        raise QkvaultClientError(
                            f"presigned GET of {key} failed: HTTP {response.status_code} (expired? ask for "
                            "new URLs, with a longer expires_in if needed)",
                            status=response.status_code,
                        )
                    with open(target, "wb") as fh:
                        for piece in response.iter_bytes(PIECE_BYTES):
                            fh.write(piece)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(partial, dest)
    except httpx.HTTPError as exc:
        shutil.rmtree(partial, ignore_errors=True)
        raise QkvaultClientError(f"presigned download into {dest} failed: {exc}") from exc
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return dest
