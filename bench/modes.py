"""The measured modes: plain SDPA forward (reference), the naive dump, qkvault's export, a raw write.

Every mode starts from the same state: memory peaks reset (:class:`bench.memory.PeakMemory`),
dirty pages of the previous mode flushed (``os.sync``, not timed), the GPU synchronised at every
boundary that is timed.
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.instrumented import NullHooks, TimedWriter
from bench.memory import PeakMemory
from bench.models import BenchModel
from storage.bundle.encodeprocs import encoder_processes
from storage.bundle.pipeline import DEFAULT_IO_THREADS, default_threads


@dataclass
class ModeResult:
    mode: str
    status: str = "ok"  # ok | OOM | skipped
    wall_s: float | None = None
    logical_bytes: int = 0
    stored_bytes: int | None = None
    parts_s: dict[str, float] = field(default_factory=dict)
    memory: dict[str, int | bool | None] = field(default_factory=dict)
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def logical_gbps(self) -> float | None:
        if self.status != "ok" or not self.wall_s:
            return None
        return self.logical_bytes / self.wall_s / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def settle(device: torch.device) -> None:
    """Between modes: flush the page cache's dirty pages and free cached GPU blocks (not timed)."""
    os.sync()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def tree_bytes(root: Path) -> tuple[int, list[int]]:
    """Total bytes and the size of every file under ``root``."""
    sizes = [p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()]
    return sum(sizes), sizes


def attention_logical_bytes(bm: BenchModel) -> int:
    """Dense attention ``[layers, heads, T, T]`` at 2 bytes an element (fp16-equivalent)."""
    return len(bm.layers) * bm.lm.facts.num_heads * bm.positions**2 * 2


def qkv_logical_bytes(bm: BenchModel) -> int:
    facts = bm.lm.facts
    return len(bm.layers) * bm.positions * facts.head_dim * (facts.num_heads + 2 * facts.num_kv_heads) * 2


def derived_logical_bytes(bm: BenchModel) -> int:
    """Derived attention exports q and k (and v with --qkv) at 2 bytes an element."""
    if bm.spec.capture.qkv:
        return qkv_logical_bytes(bm)
    facts = bm.lm.facts
    return len(bm.layers) * bm.positions * facts.head_dim * (facts.num_heads + facts.num_kv_heads) * 2


def full_attention_bytes(bm: BenchModel) -> int:
    """What materialised attention would need: the causal lower triangle (diagonal included) of
    every exported layer and head, fp16."""
    from storage.bundle.derived import materialised_bytes

    return materialised_bytes(len(bm.layers), bm.lm.facts.num_heads, [bm.positions])


def _input(bm: BenchModel) -> torch.Tensor:
    return torch.tensor([bm.prompt_ids], device=bm.lm.device)


def warm_up(bm: BenchModel) -> None:
    """A short forward pass with each attention implementation used (kernels, thread pools); on
    CUDA also one SDPA pass at full length (kernel selection and workspaces for the real shapes)
    and the page-locked copy ring (a worker allocates it once, when it loads its model)."""
    from worker.capture.hook import capture_name

    capture = capture_name("sdpa")  # the bench's models run SDPA, wrapped by the capture

    ids = _input(bm)
    model = bm.lm.model
    try:
        for impl in ("eager", "sdpa", capture):
            model.set_attn_implementation(impl)
            with torch.inference_mode():
                model(input_ids=ids[:, :16], use_cache=False, logits_to_keep=1)
        if bm.lm.device.type == "cuda":
            model.set_attn_implementation("sdpa")
            with torch.inference_mode():
                model(input_ids=ids, use_cache=False, logits_to_keep=1)
            from worker.capture.hostcopy import pinned_ring

            pinned_ring(bm.lm.device).allocate_now()  # as a worker does when it loads a model
            encoder_processes(default_threads()).start()
    finally:
        model.set_attn_implementation(capture)
    _sync(bm.lm.device)


def run_sdpa_forward(bm: BenchModel, memory: PeakMemory) -> ModeResult:
    """Plain SDPA inference on the prompt: the reference for 'memory over inference'."""
    from worker.capture.hook import capture_name

    capture = capture_name("sdpa")  # the bench's models run SDPA, wrapped by the capture

    model, result = bm.lm.model, ModeResult("sdpa forward")
    model.set_attn_implementation("sdpa")
    ids = _input(bm)
    try:
        memory.start()
        t0 = time.perf_counter()
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
        _sync(bm.lm.device)
        result.wall_s = time.perf_counter() - t0
    except Exception as exc:
        if not _is_oom(exc):
            raise
        result.status, result.note = "OOM", str(exc).splitlines()[0][:200]
    finally:
        result.memory = memory.stop()
        model.set_attn_implementation(capture)
    return result


def run_naive(bm: BenchModel, store: Path, memory: PeakMemory) -> ModeResult:
    """HF eager ``output_attentions=True``, ``.cpu()`` of every selected layer, upcast, ``np.savez``."""
    from worker.capture.hook import capture_name

    capture = capture_name("sdpa")  # the bench's models run SDPA, wrapped by the capture

    device, model = bm.lm.device, bm.lm.model
    new = bm.spec.generation.max_new_tokens
    result = ModeResult("naive", logical_bytes=attention_logical_bytes(bm))
    path = store / "naive" / "attentions.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    ids = _input(bm)
    stage = "forward"
    model.set_attn_implementation("eager")
    try:
        memory.start()
        t0 = time.perf_counter()
        with torch.inference_mode():
            if new:
                out = model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=new,
                    min_new_tokens=new,
                    do_sample=False,
                    output_attentions=True,
                    return_dict_in_generate=True,
                )
                steps = out.attentions  # per step: per layer [B, H, q, k]
            else:
                out = model(input_ids=ids, output_attentions=True, use_cache=False, logits_to_keep=1)
                steps = (out.attentions,)
        _sync(device)
        t1 = time.perf_counter()
        stage = "to CPU"
        host = {
            f"step{s}_layer{layer}": step[layer].cpu() for s, step in enumerate(steps) for layer in bm.layers
        }
        _sync(device)
        t2 = time.perf_counter()
        del out, steps
        stage = "save"
        np.savez(path, **{name: t.float().numpy() for name, t in host.items()})
        t3 = time.perf_counter()
        result.wall_s = t3 - t0
        result.parts_s = {"forward": t1 - t0, "to_cpu": t2 - t1, "save": t3 - t2}
        result.stored_bytes = path.stat().st_size
        result.extra["attention_dtype"] = str(next(iter(host.values())).dtype).replace("torch.", "")
        del host
    except Exception as exc:
        if not _is_oom(exc):
            raise
        result.status, result.note = "OOM", f"during {stage}: {str(exc).splitlines()[0][:200]}"
    finally:
        result.memory = memory.stop()
        model.set_attn_implementation(capture)
        path.unlink(missing_ok=True)
    return result


def run_qkvault(
    bm: BenchModel,
    store: Path,
    memory: PeakMemory,
    profile: Path | None = None,
    *,
    encode_threads: int | None = None,
    write_processes: bool = True,
    io_threads: int = DEFAULT_IO_THREADS,
) -> ModeResult:
    """The worker's Exporter in-process, writing a bundle under ``store`` (no database)."""
    from worker.export import Exporter

    if bm.derived:
        logical = derived_logical_bytes(bm)
    else:
        logical = attention_logical_bytes(bm) + (qkv_logical_bytes(bm) if bm.spec.capture.qkv else 0)
    result = ModeResult("qkvault", logical_bytes=logical)
    bundle = store / "bundle.zarr"
    hooks = NullHooks()
    bm.lm.load_s = 0.0  # the Exporter adds it to its "total"
    profiler = cProfile.Profile() if profile is not None else None
    try:
        memory.start()
        t0 = time.perf_counter()
        if profiler is not None:
            profiler.enable()
        writer = TimedWriter(
            str(bundle),
            on_chunk=hooks.chunk_stored,
            write_threads=encode_threads,
            write_processes=write_processes,
            io_threads=io_threads,
        )
        summary = Exporter(bm.spec, bm.lm, writer, hooks).run("bench")
        _sync(bm.lm.device)
        result.wall_s = time.perf_counter() - t0
    except Exception as exc:
        if not _is_oom(exc):
            raise
        result.status, result.note = "OOM", str(exc).splitlines()[0][:200]
        return result
    finally:
        if profiler is not None:
            profiler.disable()
        result.memory = memory.stop()
    result.parts_s = {
        "forward+capture": result.wall_s - writer.write_s - writer.drain_s - writer.metadata_s,
        "write_row_block": writer.write_s,
        "drain": writer.drain_s,
        "metadata": writer.metadata_s,
    }
    result.stored_bytes, sizes = tree_bytes(bundle)
    result.extra = {
        "bundle": str(bundle),
        "files": len(sizes),
        "chunks": hooks.chunks,
        "chunk_bytes": hooks.chunk_bytes,
        "exporter_timings_s": summary["timings_s"],
        "writer_threads": {"encode": writer.pipeline_threads[0], "store": writer.pipeline_threads[1]},
        "writer_stats": writer.pipeline_stats.to_dict(),
    }
    if bm.derived:
        result.extra["attention"] = "derived"
        result.extra["full_attention_bytes"] = full_attention_bytes(bm)
    if profiler is not None and profile is not None:
        profiler.dump_stats(profile)
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(15)
        result.extra["profile_top"] = text.getvalue()
    return result


def run_raw_write(sizes: Sequence[int], store: Path, memory: PeakMemory) -> ModeResult:
    """Write files of the given sizes (random bytes) with an fsync each: the store's own limit."""
    result = ModeResult("raw write")
    folder = store / "raw-write"
    folder.mkdir(parents=True, exist_ok=True)
    payload = np.random.default_rng(0).bytes(max(sizes, default=0))
    write_s = fsync_s = 0.0
    memory.start()
    t0 = time.perf_counter()
    for i, size in enumerate(sizes):
        ta = time.perf_counter()
        fd = os.open(folder / f"{i}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(payload)[:size]
            while view:
                view = view[os.write(fd, view) :]
            tb = time.perf_counter()
            os.fsync(fd)
        finally:
            os.close(fd)
        tc = time.perf_counter()
        write_s += tb - ta
        fsync_s += tc - tb
    result.wall_s = time.perf_counter() - t0
    result.memory = memory.stop()
    result.parts_s = {"write": write_s, "fsync": fsync_s}
    result.stored_bytes, _ = tree_bytes(folder)
    result.extra = {"files": len(sizes), "fsync": "per file"}
    shutil.rmtree(folder, ignore_errors=True)
    return result
