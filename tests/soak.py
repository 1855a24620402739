"""SIGKILL soak: kill the real worker (``python -m worker``, Celery parent and pool child) mid-job,
again and again, restart it, and check that nothing is lost (docs/reliability.md).

    python -m tests.soak --kills 20          # the documented soak (prints its figures)
    python -m tests.soak --kills 5 --jobs 3  # what tests/worker/test_kill_worker.py runs

Each kill waits until some job runs under the current worker and has reached the next point of
:data:`KILL_POINTS` (a phase, or a fraction of its forward-pass units), then SIGKILLs the worker's
process group and starts a new worker. The reconciler (``python -m worker.reconciler``, short
lease timeout) finds the expired lease, drops the dead delivery and re-enqueues the job; the next
attempt resumes by chunk. At the end every job must have succeeded, with a bundle identical to
an uninterrupted in-process run of the same job (same job id; only ``timings_s`` differs) and
exactly one chunk row per stored chunk. Needs Redis (``tests.services.redis_service``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from storage.index import Index, JobRecord, JobState
from storage.stores.objectstore import ObjectStore
from tests.faults import audit_chunks, bundle_differences, bundle_files, kill_group, wait_until
from tests.services import REPO_ROOT, qkvault_env, start_worker, subprocess_env
from worker.settings import WorkerSettings

# (phase, fraction of the attempt's forward-pass units) at which the running job is killed, in turn
KILL_POINTS: tuple[tuple[str | None, float], ...] = (
    ("loading_model", 0.0),  # claimed, model not loaded yet (no chunk of this attempt written)
    (None, 0.1),
    (None, 0.5),
    (None, 0.3),
    (None, 0.9),  # near the end of decoding
    (None, 0.7),
    ("prefill", 0.0),
    (None, 0.2),
)
# decoding steps of a kill scenario's job: long enough that the poll (every 20 ms, progress written
# every 100 ms) sees each kill point on a fast machine too; with 32 steps a job's whole decode fit
# between two progress writes there, and every job ended before the kills were done. The tiny
# models hold 256 positions and the longer prompt is 103 tokens.
KILL_JOB_NEW_TOKENS = 128
LEASE_TIMEOUT_S = 3.0  # the reconciler requeues a killed job about this long after its last beat


def job_spec(model_dir: Path, n: int, new_tokens: int = 32) -> dict[str, Any]:
    """Job ``n`` of the soak: greedy or seeded sampling, attention, q/k/v, token alternatives;
    ``new_tokens`` decoding steps (the job's length: one forward-pass unit per sequence and step)."""
    return {
        "model": {"id": str(model_dir)},
        "prompts": [f"job {n}: the quick brown fox jumps over the lazy dog " * 2, f"prompt two of job {n}"],
        "generation": {
            "max_new_tokens": new_tokens,
            "do_sample": n % 2 == 1,
            "seed": n,
            "stop_at_eos": False,
        },
        "capture": {"qkv": True, "alternatives": True},
        "storage": {"chunk_rows": 16},
    }


def fast_env(settings: WorkerSettings, model_cache: Path, model_dir: Path | None = None) -> dict[str, str]:
    """``QKVAULT_*`` of the worker and reconciler processes: ``settings``' services, a short lease;
    the model root is the folder holding ``model_dir`` (``None``: the system's temporary folder,
    which holds pytest's ``tmp_path`` folders)."""
    return qkvault_env(
        model_roots=[model_dir.parent if model_dir is not None else Path(tempfile.gettempdir())],
        redis_url=settings.redis_url,
        database_url=settings.database_url,
        store_url=settings.store_url,
        queue_name=settings.queue_name,
        device="cpu",
        model_cache_dir=str(model_cache),
        heartbeat_interval_s=0.3,
        progress_interval_s=0.1,
        lease_timeout_s=LEASE_TIMEOUT_S,
        requeue_after_s=LEASE_TIMEOUT_S,
        reconcile_interval_s=0.5,
        record_interval_s=0.0,  # chunk rows recorded per row block: "N chunks in" is early in a job
    )


@dataclass
class KillReport:
    kills: list[dict[str, Any]] = field(default_factory=list)  # where each kill landed
    jobs: int = 0
    states: dict[str, str] = field(default_factory=dict)
    attempts: dict[str, int] = field(default_factory=dict)
    chunks: int = 0  # chunk rows of all jobs at the end
    chunks_skipped: int = 0  # by resumed attempts (the final, successful ones)
    chunks_rewritten: int = 0
    chunks_changed: int = 0
    differences: dict[str, list[str]] = field(default_factory=dict)  # bundle vs uninterrupted run
    chunk_audit: dict[str, dict[str, Any]] = field(default_factory=dict)
    wall_s: float = 0.0

    @property
    def ok(self) -> bool:
        return (
            all(s == JobState.SUCCEEDED.value for s in self.states.values())
            and len(self.states) == self.jobs
            and not any(self.differences.values())
            and all(a["clean"] for a in self.chunk_audit.values())
        )

    def summary(self) -> str:
        phases = sorted({k["where"] for k in self.kills})
        return (
            f"kills={len(self.kills)} jobs={self.jobs} succeeded="
            f"{sum(s == 'succeeded' for s in self.states.values())} attempts={sum(self.attempts.values())} "
            f"chunks={self.chunks} skipped_on_resume={self.chunks_skipped} rewritten={self.chunks_rewritten} "
            f"changed={self.chunks_changed} bundle_differences={sum(map(len, self.differences.values()))} "
            f"dirty_chunk_audits={sum(not a['clean'] for a in self.chunk_audit.values())} "
            f"wall={self.wall_s:.0f}s kill_points={phases}"
        )


def _reference(
    root: Path, specs: dict[str, dict[str, Any]], model_cache: Path
) -> dict[str, dict[str, bytes]]:
    """Each job run once, uninterrupted, in this process, under the same job id."""
    from worker.jobs import run_job
    from worker.models import ModelCache

    settings = WorkerSettings(
        database_url=f"sqlite:///{root}/index.db",
        store_url=str(root / "store"),
        model_cache_dir=model_cache,
        progress_interval_s=1.0,
    )
    index, store = Index(settings.database_url), ObjectStore.from_settings(settings)
    index.migrate()
    models = ModelCache(model_cache, "cpu")
    out = {}
    for job_id, spec in specs.items():
        index.create_job(
            spec=spec, owner="soak", store_url_for=store.bundle_url, max_attempts=1, job_id=job_id
        )
        state = run_job(
            job_id, index=index, store=store, models=models, settings=settings, worker_id="reference"
        )
        if state is not JobState.SUCCEEDED:
            raise RuntimeError(f"reference run of {job_id} ended {state}: {index.get_job(job_id).error}")
        out[job_id] = bundle_files(store, index.get_job(job_id).store_url)
    index.dispose()
    return out


@contextlib.contextmanager
def reconciler(env: dict[str, str], log_path: Path) -> Iterator[None]:
    from qkvault.processes import spawn, stop_process

    proc = spawn(
        [sys.executable, "-m", "worker.reconciler"], log_path, env=subprocess_env(env), cwd=REPO_ROOT
    )
    try:
        yield
    finally:
        stop_process(proc, grace_s=10)


def _due(job: JobRecord, dead: set[str], point: tuple[str | None, float]) -> bool:
    if job.state is not JobState.RUNNING or job.lease_worker is None or job.lease_worker in dead:
        return False
    phase, fraction = point
    if phase is not None:
        return job.phase == phase
    return job.units_total > 0 and job.units_done >= fraction * job.units_total and job.phase != "done"


def kill_scenario(
    workdir: Path,
    redis_url: str,
    model_dir: Path,
    model_cache: Path,
    *,
    kills: int,
    jobs: int,
    log: Callable[[str], None] = print,
    timeout_s: float = 600.0,
) -> KillReport:
    started = time.monotonic()
    report = KillReport(jobs=jobs)
    specs = {str(uuid.uuid4()): job_spec(model_dir, n, KILL_JOB_NEW_TOKENS) for n in range(jobs)}
    reference = _reference(workdir / "reference", specs, model_cache)
    log(f"reference: {jobs} jobs run uninterrupted in {time.monotonic() - started:.0f} s")
    settings = WorkerSettings(
        database_url=f"sqlite:///{workdir}/index.db",
        store_url=str(workdir / "store"),
        redis_url=redis_url,
        queue_name=f"qk-soak-{uuid.uuid4().hex[:8]}",
    )
    index, store = Index(settings.database_url), ObjectStore.from_settings(settings)
    index.migrate()
    env = fast_env(settings, model_cache, model_dir)
    from worker.app import create_celery_app, enqueue_export

    app = create_celery_app(settings)
    for job_id, spec in specs.items():
        index.create_job(
            spec=spec, owner="soak", store_url_for=store.bundle_url, max_attempts=kills + 2, job_id=job_id
        )
        enqueue_export(app, job_id)
    app.close()
    dead: set[str] = set()
    deadline = started + timeout_s
    with reconciler(env, workdir / "reconciler.log"):
        for n in range(kills):
            point = KILL_POINTS[n % len(KILL_POINTS)]
            with start_worker(env, workdir / "worker.log") as proc:
                due: list[JobRecord] = []

                def find(point: tuple[str | None, float] = point, due: list[JobRecord] = due) -> bool:
                    due[:] = [j for j in map(index.get_job, specs) if _due(j, dead, point)]
                    return bool(due) or all(index.get_job(j).terminal for j in specs)

                wait_until(find, deadline - time.monotonic(), poll_s=0.02)
                kill_group(proc)
            if not due:
                ended = [index.get_job(j) for j in specs]
                seen = ", ".join(f"{j.id[:8]} {j.state.value} after {j.attempts} attempts" for j in ended)
                why = f"{seen}; leases of killed workers: {sorted(dead)}"
                log(f"kill {n + 1}: no job left to kill at {point}; every job ended ({why})")
                break
            job = due[0]
            dead.add(str(job.lease_worker))
            where = point[0] or f"{point[1]:.0%} of units"
            kill = {
                "job": job.id,
                "attempt": job.attempts,
                "where": where,
                "phase": job.phase,
                "units": f"{job.units_done}/{job.units_total}",
                "chunks": job.chunks_written,
            }
            report.kills.append(kill)
            log(
                f"kill {n + 1}/{kills}: job {job.id[:8]} attempt {job.attempts} at {where} (phase "
                f"{job.phase}, units {kill['units']}, chunks {job.chunks_written})"
            )
        with start_worker(env, workdir / "worker.log"):
            wait_until(
                lambda: all(index.get_job(j).terminal for j in specs), deadline - time.monotonic(), 0.2
            )
    for job_id in specs:
        job = index.get_job(job_id)
        report.states[job_id], report.attempts[job_id] = job.state.value, job.attempts
        resume = (job.result or {}).get("resume", {})
        report.chunks_skipped += resume.get("chunks_skipped", 0)
        report.chunks_rewritten += resume.get("chunks_rewritten", 0)
        report.chunks_changed += resume.get("chunks_changed", 0)
        files = bundle_files(store, job.store_url)
        report.differences[job_id] = bundle_differences(files, reference[job_id])
        audit = audit_chunks(index, job, files)
        report.chunk_audit[job_id] = {**asdict(audit), "clean": audit.clean}
        report.chunks += audit.rows
    index.dispose()
    report.wall_s = time.monotonic() - started
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=6)
    parser.add_argument("--workdir", type=Path, default=None, help="kept afterwards (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    args = parser.parse_args(argv)
    from tests.services import redis_service
    from tests.worker.conftest import model_cache_dir
    from tests.worker.tiny_models import build_tiny_model

    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="qk-soak-")))
        workdir.mkdir(parents=True, exist_ok=True)
        redis_url = stack.enter_context(redis_service())
        model = build_tiny_model("llama", workdir / "tiny-llama")
        report = kill_scenario(workdir, redis_url, model, model_cache_dir(), kills=args.kills, jobs=args.jobs)
    print(report.summary())
    if args.json:
        args.json.write_text(json.dumps(asdict(report), indent=2))
    return 0 if report.ok and len(report.kills) == args.kills else 1


if __name__ == "__main__":
    raise SystemExit(main())
