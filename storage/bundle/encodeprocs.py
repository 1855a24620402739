"""Chunk encoder processes: a worker's pool of ``python -m storage.bundle.encodeworker`` children.

The chunk pipeline (storage/bundle/pipeline.py) sends them the chunks whose data lie in a shared
arena (the device-to-host ring, storage/bundle/sharedarena.py) as tasks of a few hundred bytes
each; each child encodes, checksums and writes them and answers with their sizes and checksums
(storage/bundle/encodeworker.py). The forward thread's process then spends on a chunk only the
Python of sending and recording it; the Blosc calls, and the GIL they take back after their C
work, are in processes of their own.

Started with ``subprocess`` (not ``multiprocessing``): a child imports numpy, numcodecs and this
package only, never the parent's ``__main__`` (a worker's imports torch). One pool a process (the
pid: a forked child makes its own), started on first use and kept. A child that dies fails the
tasks it held (each with an error naming its exit status) and is started again for the next task.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import IO

from storage.bundle.encodeworker import ChunkJob, EncodeTask, TaskResult, read_frame, send_frame
from storage.bundle.pipeline import ChunkSpec
from storage.bundle.sharedarena import ArenaRef, ArenaSlice
from storage.errors import EncoderProcessDied

__all__ = ["EncoderProcessDied", "EncoderProcesses", "encoder_processes"]

TaskDone = Callable[[TaskResult | BaseException], None]
PROBE_TIMEOUT_S = 60.0  # a process's start (imports) and one task

log = logging.getLogger(__name__)


def _project_root() -> str:
    """The directory holding the ``storage`` package, for the child's import path."""
    return str(Path(__file__).resolve().parents[2])


def _answer(done: TaskDone, answer: TaskResult | BaseException) -> None:
    """``done(answer)``, on a reader thread that must go on reading whatever ``done`` raises."""
    try:
        done(answer)
    except Exception:
        log.exception("a chunk encoder task's answer could not be handed over")


class _Child:
    """One encoder process, a thread reading its answers and the tasks it holds."""

    def __init__(self, name: str) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_project_root(), env.get("PYTHONPATH")) if p)
        self.name = name
        self.process = subprocess.Popen(
            [sys.executable, "-m", "storage.bundle.encodeworker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        assert self.process.stdin is not None and self.process.stdout is not None
        self._input: IO[bytes] = self.process.stdin
        self._output: IO[bytes] = self.process.stdout
        self._lock = threading.Lock()  # the tasks held (not taken while sending: see send)
        self._send_lock = threading.Lock()
        self._tasks: dict[int, tuple[int, TaskDone]] = {}  # task id -> (chunks, done)
        self.chunks = 0  # the chunks of the tasks it holds
        self.alive = True
        self._reader = threading.Thread(target=self._read, name=f"qkvault-{name}", daemon=True)
        self._reader.start()

    def send(self, task: EncodeTask, done: TaskDone) -> bool:
        """Queue ``task``; False when the process has ended (``done`` is not called then).

        The frame is written without the tasks' lock: a full pipe blocks this thread until the
        child reads, and the child may be writing an answer the reader thread must take the lock
        to hand over."""
        with self._lock:
            if not self.alive:
                return False
            self._tasks[task.task_id] = (len(task.chunks), done)
            self.chunks += len(task.chunks)
        try:
            with self._send_lock:
                send_frame(self._input, task)
        except (OSError, ValueError):  # its input closed: the process ended or is closing
            with self._lock:
                taken = self._tasks.pop(task.task_id, None)
                if taken is not None:
                    self.chunks -= taken[0]
                self.alive = False
            return taken is None  # else the reader already failed it (and called done)
        return True

    def _read(self) -> None:
        why = "ended"
        while True:
            try:
                result = read_frame(self._output)
            except Exception as exc:  # an unreadable frame: the process is of no further use
                why = f"sent an unreadable answer ({type(exc).__name__}: {exc}) and was stopped"
                self.process.kill()
                result = None
            if result is None:
                break
            with self._lock:
                chunks, done = self._tasks.pop(result.task_id)
                self.chunks -= chunks
            _answer(done, result)
        with self._lock:
            self.alive = False
            held, self._tasks = list(self._tasks.values()), {}
            self.chunks = 0
        status = self.process.wait()
        if not held:
            return
        error = EncoderProcessDied(
            f"chunk encoder process {self.name} (pid {self.process.pid}) {why} (exit status {status}) "
            f"holding {len(held)} tasks; their chunks were not stored",
            detail={"pid": self.process.pid, "status": status},
        )
        for _, done in held:
            _answer(done, error)

    def close(self) -> None:
        """Close its input (it exits) and wait for it."""
        with self._lock:
            self.alive = False
        with self._send_lock, contextlib.suppress(OSError):
            self._input.close()
        self.process.wait()
        self._reader.join()


class EncoderProcesses:
    """``processes`` encoder processes; :meth:`submit` sends a task to the one holding the fewest
    chunks (starting it again if it ended)."""

    def __init__(self, processes: int) -> None:
        self.processes = processes
        self._lock = threading.Lock()
        self._children: list[_Child | None] = [None] * processes
        self._next_id = 0
        self._reads: dict[str, bool] = {}  # arena token -> whether a process read it
        self._probe_lock = threading.Lock()

    def start(self) -> None:
        """Start every process now (a worker does it when it loads a model, not in a job)."""
        with self._lock:
            for i in range(self.processes):
                self._child(i)

    def _child(self, i: int) -> _Child:
        child = self._children[i]
        if child is None or not child.alive:
            child = self._children[i] = _Child(f"encoder-{i}")
        return child

    def task_id(self) -> int:
        with self._lock:
            self._next_id += 1
            return self._next_id

    def submit(self, task: EncodeTask, done: TaskDone) -> None:
        """Send ``task``; ``done(result or error)`` is called from a reader thread once it is
        answered, or with :class:`EncoderProcessDied` if its process ends first."""
        for _ in range(2):  # a process found ended on sending is started again once
            with self._lock:
                children = [self._child(i) for i in range(self.processes)]
                child = min(children, key=lambda c: c.chunks)
            if child.send(task, done):
                return
        done(EncoderProcessDied(f"chunk encoder process {child.name} ended as soon as it started"))

    def reads(self, arena: ArenaRef) -> bool:
        """Whether an encoder process can read ``arena`` (asked once an arena: a process opens it
        through ``/proc/<pid>/fd``, which a hardened ``/proc`` or a sandbox may refuse; the chunk
        pipeline then keeps its threads for it, with a warning). Threads asking at once wait for
        the one that asks."""
        with self._probe_lock:
            known = self._reads.get(arena.token)
            if known is None:
                known = self._reads[arena.token] = self._probe(arena)
            return known

    def _probe(self, arena: ArenaRef) -> bool:
        place = ArenaSlice(arena, 0, (1,), (1,), "|u1")
        job = ChunkJob("probe/c/0", ChunkSpec((1,), "|u1", 0, None), place)
        answers: list[TaskResult | BaseException] = []
        answered = threading.Event()

        def done(answer: TaskResult | BaseException) -> None:
            answers.append(answer)
            answered.set()

        self.submit(EncodeTask(self.task_id(), None, "crc32c", [job]), done)
        why = f"no answer within {PROBE_TIMEOUT_S:.0f} s"
        if answered.wait(PROBE_TIMEOUT_S):
            answer = answers[0]
            error = answer if isinstance(answer, BaseException) else answer.chunks[0].error
            why = "" if error is None else f"{type(error).__name__}: {error}"
        if why:
            log.warning(
                "chunk encoder processes cannot read the shared host buffer (%s): encoding in threads", why
            )
        return not why

    def held_chunks(self) -> int:
        """The chunks of the tasks sent and not yet answered."""
        with self._lock:
            return sum(c.chunks for c in self._children if c is not None)

    def pids(self) -> list[int]:
        with self._lock:
            return [c.process.pid for c in self._children if c is not None and c.alive]

    def close(self) -> None:
        with self._lock:
            children, self._children = self._children, [None] * self.processes
        for child in children:
            if child is not None:
                child.close()


@cache
def _pool(pid: int, processes: int) -> EncoderProcesses:
    return EncoderProcesses(processes)


def encoder_processes(processes: int) -> EncoderProcesses:
    """This process's pool of ``processes`` encoder processes (created on first use, kept)."""
    return _pool(os.getpid(), processes)
