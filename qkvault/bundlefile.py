"""A bundle on this machine: opened with xarray (:func:`open_dataset`), and a downloaded zip's
destination, how its bytes are written (to a ``.partial`` file, checked, then renamed: a
destination never holds half a bundle) and the progress line shown meanwhile.
:meth:`qkvault.client.Client.download` fetches the bytes."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qkvault.errors import QkvaultClientError
from qkvault.job import human_bytes
from qkvault.progress import ProgressLine
from storage.settings import DEFAULT_HOME

if TYPE_CHECKING:
    import xarray as xr

DEFAULT_DOWNLOAD_DIR = DEFAULT_HOME / "downloads"
PIECE_BYTES = 1 << 20  # 1 MiB download pieces


def open_dataset(
    path_or_url: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None
) -> xr.Dataset:
    """Open a bundle lazily with xarray: a downloaded ``.zip``, a ``.zarr`` directory, or an fsspec
    URL such as ``s3://bucket/jobs/<id>.zarr`` (``storage_options`` go to s3fs). Thin wrapper of
    :func:`storage.bundle.open_bundle` raising :class:`QkvaultClientError`."""
    from storage.bundle import open_bundle
    from storage.errors import QkvaultError

    text = os.fspath(path_or_url)
    try:
        return open_bundle(text, storage_options=storage_options)
    except FileNotFoundError as exc:
        raise QkvaultClientError(
            f"bundle not found: {text} (give a .zip, a .zarr directory or a job id)"
        ) from exc
    except QkvaultError as exc:
        raise QkvaultClientError(exc.message) from exc


def bundle_filename(job_id: str) -> str:
    return f"{job_id}.zarr.zip"


def zip_destination(job_id: str, dest_path: str | os.PathLike[str] | None) -> Path:
    """``dest_path`` as a file path: a directory (existing, or written with a trailing ``/``) gets
    ``<id>.zarr.zip`` in it; default: that name in the current directory. Its parent is created."""
    dest = Path(dest_path) if dest_path is not None else Path(bundle_filename(job_id))
    if dest.is_dir() or str(dest_path).endswith(("/", os.sep)):
        dest = dest / bundle_filename(job_id)
    dest.parent.mkdir(parents=True, exist_ok=True)
    return dest


def partial_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".partial")


class ZipWriter:
    """Writes the pieces of one download to ``<dest>.partial``, shows progress, and moves the file
    to ``dest`` once it is whole: ``total`` bytes (when the server sent a length) and a zip."""

    def __init__(self, job_id: str, dest: Path, printer: ProgressLine | None) -> None:
        self.job_id, self.dest, self.printer = job_id, dest, printer
        self.partial = partial_path(dest)
        self.received = 0
        self.total: int | None = None  # known once the headers arrived (0: no Content-Length)
        self.done = False

    def write(self, pieces: Iterable[bytes], total: int) -> None:
        self.total = total
        with open(self.partial, "wb") as fh:
            for piece in pieces:
                fh.write(piece)
                self.received += len(piece)
                if self.printer:
                    self.printer.update(download_line(self.received, total), key="download")
            fh.flush()
            os.fsync(fh.fileno())
        if total and self.received != total:
            raise ended_early(self.job_id, self.received, total)
        if not zipfile.is_zipfile(self.partial):
            raise QkvaultClientError(
                f"download of job {self.job_id} is not a zip file ({self.received} bytes)"
            )
        os.replace(self.partial, self.dest)
        self.done = True

    def discard(self) -> None:
        self.partial.unlink(missing_ok=True)

    def close(self) -> None:
        if self.printer:
            done = download_line(self.received, self.received, done=self.dest) if self.done else None
            self.printer.close(done)


def ended_early(job_id: str, received: int, total: int, cause: Exception | None = None) -> QkvaultClientError:
    expected = f"{received} of {total} bytes" if total else f"{received} bytes"
    why = f" ({type(cause).__name__}: the connection closed mid-body)" if cause is not None else ""
    return QkvaultClientError(
        f"download of job {job_id} ended early: received {expected}{why}; nothing was kept, try again"
    )


def download_line(received: int, total: int, *, done: Path | None = None) -> str:
    if done is not None:
        return f"[downloaded] {human_bytes(received)} -> {done}"
    if total:
        return f"[downloading] {human_bytes(received)} / {human_bytes(total)} {received * 100 / total:.0f}%"
    return f"[downloading] {human_bytes(received)}"
