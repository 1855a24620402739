"""What slows the forward pass beside the chunk writer: plain batched inference timed alone and
beside one kind of host load at a time, on the same micro-batches.

    python -m bench.interference --device cuda --model llama-8b --prompts 300 --max-tokens 2048 \\
        [--loads none,blosc,blosc-procs,memcpy,gil,pipeline] [--threads 16] [--store /dev/shm/qk]

A bulk job's derived mode keeps the GPU as busy as plain inference once its writes are left out
(docs/benchmarks.md, session 22), so its slowdown is the host's: the forward thread launches the
model's kernels more slowly while the chunk writer works beside it. Each load isolates one thing
the writer does, so the table says which of them costs the forward pass its speed:

- ``none``: plain inference alone (the baseline of the ratios);
- ``blosc``: ``--threads`` threads compressing fp16 chunks with the bundle's codec (Blosc lz4,
  bit shuffle, level 1): CPU work in C with the GIL released, as the writer's encoders do;
- ``blosc-procs``: the same in ``--threads`` processes of their own (:mod:`bench.procload`): as
  many busy cores, no GIL shared with the forward thread;
- ``memcpy``: ``--threads`` threads copying 64 MiB arrays (GIL released): memory traffic alone;
- ``gil``: ``--threads`` threads each running ≈ 20 µs of Python, then sleeping 1 ms: the GIL
  handed over thousands of times a second, little CPU;
- ``pipeline``: the chunk writer itself (:class:`~storage.bundle.pipeline.ChunkPipeline`,
  ``--threads`` encoders and its store threads) fed synthetic row blocks as fast as it takes them,
  stored under ``--store``.

Each load starts before the timed run and stops after it; its rate over the run (GB/s of input,
or hand-overs a second) is in the table beside plain's seconds and, on a GPU, how busy it was.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from bench.bulk import run_plain, text_prompts, workload
from bench.gpubusy import GpuBusy
from bench.memory import PeakMemory
from bench.models import MODELS, prepare
from bench.modes import settle
from bench.procload import CHUNK_SHAPE, BloscProcesses, bundle_codec, chunk_data
from bench.report import machine
from storage.bundle.chunkstore import ChunkStore
from storage.bundle.pipeline import BlockWrite, ChunkEncoder, ChunkPipeline, blosc_encoder, default_threads
from storage.sources.spec import DEFAULT_MAX_SEQUENCES, DEFAULT_TOKEN_BUDGET

MEMCPY_BYTES = 64 << 20
GIL_HOLD_ITERATIONS = 1000  # ≈ 20 µs of Python (a loop of additions, this machine: 18 µs)
GIL_SLEEP_S = 0.001
PIPELINE_SLOTS = 64  # chunk keys the pipeline load cycles through (bounds its files)
SETTLE_S = 0.5  # a load runs this long before the timed run starts


class Load:
    """A host load on ``threads`` threads, each repeating :meth:`work`'s step: :meth:`start`, then
    :meth:`stop` returns its rate over the run in :attr:`unit` (bytes for the C loads and the
    pipeline, hand-overs for ``gil``)."""

    unit = "GB/s"

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self._stop = threading.Event()
        self._workers: list[threading.Thread] = []
        self._done = 0
        self._lock = threading.Lock()
        self._started = 0.0

    def work(self) -> Callable[[], int]:
        """One step of a thread's loop, returning the units it did."""
        raise NotImplementedError

    def _loop(self) -> None:
        step = self.work()
        while not self._stop.is_set():
            done = step()
            with self._lock:
                self._done += done

    def start(self) -> None:
        self._started = time.perf_counter()
        for i in range(self.threads):
            worker = threading.Thread(target=self._loop, name=f"load-{i}", daemon=True)
            worker.start()
            self._workers.append(worker)

    def stop(self) -> float:
        """Stop every thread; the load's rate over its whole run, in :attr:`unit`."""
        self._stop.set()
        for worker in self._workers:
            worker.join()
        seconds = time.perf_counter() - self._started
        return self._done / seconds / (1e9 if self.unit == "GB/s" else 1.0)


class BloscLoad(Load):
    def work(self) -> Callable[[], int]:
        data = chunk_data()
        codec = blosc_encoder(bundle_codec())

        def step() -> int:
            codec.encode(data)
            return data.nbytes

        return step


class MemcpyLoad(Load):
    def work(self) -> Callable[[], int]:
        source = np.ones(MEMCPY_BYTES, dtype=np.uint8)
        target = np.empty_like(source)

        def step() -> int:
            np.copyto(target, source)
            return MEMCPY_BYTES

        return step


class GilLoad(Load):
    unit = "hand-overs/s"

    def work(self) -> Callable[[], int]:
        def step() -> int:
            total = 0
            for i in range(GIL_HOLD_ITERATIONS):
                total += i
            time.sleep(GIL_SLEEP_S)
            return 1

        return step


class PipelineLoad(Load):
    """The chunk writer on synthetic row blocks: one feeder thread submits 16 chunks at a time
    (the pipeline's own budget holds it back), the pipeline's encoder and store threads do the rest."""

    def __init__(self, threads: int, store: Path) -> None:
        super().__init__(1)
        self.root = store / "interference.zarr"
        array = zarr.create_array(
            str(self.root),
            shape=(PIPELINE_SLOTS, *CHUNK_SHAPE),
            chunks=(1, *CHUNK_SHAPE),
            dtype="float16",
            compressors=bundle_codec(),
            zarr_format=3,
            overwrite=True,
        )
        self.encoder = ChunkEncoder.for_array(array)
        self.pipeline = ChunkPipeline(ChunkStore(str(self.root)).put, threads=threads)

    def work(self) -> Callable[[], int]:
        data = chunk_data()
        slot = itertools.count()

        def step() -> int:
            regions: list[tuple[tuple[int, ...], Callable[[], np.ndarray]]] = [
                ((next(slot) % PIPELINE_SLOTS, 0, 0, 0), lambda: data) for _ in range(16)
            ]
            self.pipeline.submit_blocks([BlockWrite(self.encoder, regions, 16 * data.nbytes)])
            return 16 * data.nbytes

        return step

    def stop(self) -> float:
        rate = super().stop()
        self.pipeline.wait()
        shutil.rmtree(self.root, ignore_errors=True)
        return rate


class BloscProcessLoad(Load):
    """``blosc`` in ``threads`` processes of their own (:mod:`bench.procload`): the same C work and
    busy cores, no GIL shared with the forward thread."""

    def __init__(self, threads: int) -> None:
        super().__init__(threads)
        self._processes = BloscProcesses(threads)

    def start(self) -> None:
        self._processes.start()

    def stop(self) -> float:
        return self._processes.stop()


THREAD_LOADS: dict[str, type[Load]] = {
    "blosc": BloscLoad,
    "blosc-procs": BloscProcessLoad,
    "memcpy": MemcpyLoad,
    "gil": GilLoad,
}
LOADS = ("none", *THREAD_LOADS, "pipeline")


def make_load(kind: str, threads: int, store: Path) -> Load | None:
    if kind == "none":
        return None
    if kind == "pipeline":
        return PipelineLoad(threads, store)
    return THREAD_LOADS[kind](threads)


@dataclass
class LoadRun:
    """Plain inference beside one load: its seconds, the GPU's busy share, the load's rate."""

    load: str
    threads: int
    seconds: float
    gpu_busy_percent: float | None
    rate: float | None
    unit: str | None


def run_loads(lm: Any, work: Any, loads: list[str], threads: int, store: Path) -> list[LoadRun]:
    """Plain inference on ``work`` once untimed (every shape), then once beside each load."""
    memory = PeakMemory(lm.device)
    run_plain(lm, work, memory)
    runs = []
    for kind in loads:
        settle(lm.device)
        load = make_load(kind, threads, store)
        if load is not None:
            load.start()
            time.sleep(SETTLE_S)
        try:
            with GpuBusy(lm.device) as busy:
                seconds = run_plain(lm, work, memory).seconds
        finally:
            rate = load.stop() if load is not None else None
        unit = load.unit if load is not None else None
        runs.append(LoadRun(kind, 0 if load is None else threads, seconds, busy.percent, rate, unit))
    return runs


def table(runs: list[LoadRun]) -> str:
    base = next((r.seconds for r in runs if r.load == "none"), None)
    lines = ["| load | threads | plain s | × alone | GPU busy | load rate |", "|---|---|---|---|---|---|"]
    for r in runs:
        ratio = f"{r.seconds / base:.2f}×" if base else "—"
        busy = f"{r.gpu_busy_percent:.0f}%" if r.gpu_busy_percent is not None else "—"
        rate = "—" if r.rate is None else f"{r.rate:,.2f} {r.unit}"
        lines.append(f"| {r.load} | {r.threads} | {r.seconds:.2f} | {ratio} | {busy} | {rate} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.interference", description=__doc__.split("\n")[0])
    p.add_argument(
        "--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    p.add_argument("--model", choices=MODELS, help="default: smollm2 on cpu, llama-8b on cuda")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    p.add_argument("--prompts", type=int, default=300, help="number of prompts (default 300)")
    p.add_argument("--max-tokens", type=int, help="longest prompt (default 256 on cpu, 2048 on cuda)")
    p.add_argument("--loads", default=",".join(LOADS), help=f"comma-separated, of {', '.join(LOADS)}")
    p.add_argument("--threads", type=int, help="threads of each load (default: one per core, ≤ 16)")
    p.add_argument("--store", type=Path, help="the pipeline load's directory (default: a temporary one)")
    p.add_argument("--model-cache", type=Path, help="dequantised GGUF cache (default: the tests' cache)")
    p.add_argument("--json", type=Path, help="write the figures as JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    loads = [name.strip() for name in args.loads.split(",") if name.strip()]
    unknown = sorted(set(loads) - set(LOADS))
    if unknown:
        print(f"--loads: unknown {unknown}; choose from {', '.join(LOADS)}", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: CUDA is not available here", file=sys.stderr)
        return 2
    cpu = device.type == "cpu"
    name = args.model or ("smollm2" if cpu else "llama-8b")
    max_tokens = args.max_tokens or (256 if cpu else 2048)
    options = dict(layers=None, qkv=False, chunk_rows=512, model_cache=args.model_cache, new_tokens=0)
    bm = prepare(name, device=device, dtype=args.dtype, tokens=max_tokens, **options)
    work = workload(
        text_prompts(bm.lm.tokenizer, args.prompts, 16, max_tokens),
        0,
        DEFAULT_TOKEN_BUDGET,
        DEFAULT_MAX_SEQUENCES,
    )
    threads = args.threads or default_threads()
    store = Path(tempfile.mkdtemp(prefix="qkvault-interference-", dir=args.store))
    info = machine()
    print(f"command: python -m bench.interference {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(f"machine: {info.get('gpu') or info.get('cpu')}; {info['cpus']} CPUs; torch {info['torch']}")
    batches = len(work.batches)
    print(f"model {name} on {device}; {args.prompts} prompts of ≤ {max_tokens} tokens; {batches} batches")
    try:
        runs = run_loads(bm.lm, work, loads, threads, store)
    finally:
        shutil.rmtree(store, ignore_errors=True)
    print("\n" + table(runs))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        figures = {"machine": info, "model": name, "runs": [asdict(r) for r in runs]}
        args.json.write_text(json.dumps(figures, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
