"""Error types shared by every qkvault package.

Each error subclasses a stdlib type as well, and its message names the object and the fix.
"""

from __future__ import annotations

from typing import Any


class QkvaultError(Exception):
    """Base class. ``problem_type`` is the RFC 9457 ``type`` slug used when crossing HTTP."""

    problem_type: str = "qkvault-error"
    status: int = 500

    def __init__(self, message: str, *, detail: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail or {}

    def to_problem(self) -> dict[str, Any]:
        """Problem document (``type``, ``title``, ``detail``) that can be stored or sent as JSON."""
        return {
            "type": self.problem_type,
            "title": type(self).__name__,
            "detail": self.message,
            **({"extra": self.detail} if self.detail else {}),
        }


class JobNotFound(QkvaultError, LookupError):
    problem_type = "job-not-found"
    status = 404


class JobStateConflict(QkvaultError, RuntimeError):
    """The job is in a state where the requested operation makes no sense (e.g. cancel a finished job)."""

    problem_type = "job-state-conflict"
    status = 409


class InvalidJobSpec(QkvaultError, ValueError):
    """The spec is well-formed but cannot run on this model (layer out of range, unsupported arch...)."""

    problem_type = "invalid-job-spec"
    status = 422


class UnsupportedModel(InvalidJobSpec):
    problem_type = "unsupported-model"


class ModelLoadError(QkvaultError, OSError):
    problem_type = "model-load-failed"
    status = 422


class ServerMisconfigured(QkvaultError, RuntimeError):
    """This server lacks something it needs for the request (e.g. a package its install should have
    brought): the operator must fix the installation; the request itself may be fine."""

    problem_type = "server-misconfigured"
    status = 503


class BundleNotReady(QkvaultError, RuntimeError):
    problem_type = "bundle-not-ready"
    status = 409


class StoreError(QkvaultError, OSError):
    problem_type = "store-error"
    status = 503


class JobCancelled(QkvaultError, RuntimeError):
    """Raised inside the worker at a chunk boundary when the job's cancel flag is set."""

    problem_type = "job-cancelled"
    status = 409


class LeaseLost(JobStateConflict):
    """A worker wrote to a job it no longer holds: the lease expired and moved to another worker,
    or the job ended (cancelled, failed by the reconciler). The worker must stop without touching
    the job again; the attempt that holds the lease (if any) owns it now."""

    problem_type = "lease-lost"


class StoreUnavailable(StoreError):
    """The object store kept failing (5xx, connection refused or reset) for longer than the retry
    budget. Transient: the job is queued again while attempts are left."""

    problem_type = "store-unavailable"


class StoreNotWritable(StoreError):
    """The store refuses writes for a reason an operator can fix: its disk is full or over quota,
    it is mounted read-only, or the worker may not write there (local permissions, an S3 bucket's
    policy). ``detail`` names the ``resource``, the ``errno`` and the ``fix``. Transient for the job:
    it is queued again while attempts are left, this problem in its ``error`` meanwhile."""

    problem_type = "store-not-writable"


class EncoderProcessDied(QkvaultError, RuntimeError):
    """A chunk encoder process (storage/bundle/encodeprocs.py) ended while it held chunks (killed,
    out of memory): they were not stored. ``detail``: its ``pid`` and exit ``status``. Transient
    for the job: it is queued again while attempts are left, and resumes by chunk."""

    problem_type = "encoder-process-died"


class IndexUnavailable(QkvaultError, RuntimeError):
    """The index database kept failing with transient errors (locked, busy, connection lost,
    read-only after a fault, a PostgreSQL restart or failover) for longer than the retry budget.
    The API answers 503 with ``Retry-After: retry_after_s``; the worker gives the job back."""

    problem_type = "index-unavailable"
    status = 503

    def __init__(self, message: str, *, detail: dict[str, Any] | None = None, retry_after_s: int = 5) -> None:
        super().__init__(message, detail=detail)
        self.retry_after_s = retry_after_s


class CertificationFailed(QkvaultError, ArithmeticError):
    """The worker's self-check of an exported layer failed: the data would be wrong, so the job
    fails instead of shipping it (``detail`` holds the measured errors and the tolerance)."""

    problem_type = "certification-failed"
    status = 500
