"""``python -m bench.bulk``: a bulk job's throughput, capture mode by capture mode, on the same
micro-batches in one process (issue 13; docs/benchmarks.md, "Bulk jobs").

Prompts: windows of real English text (``scripts/data/long-prompt.txt``, read cyclically, cut at
word boundaries) whose token counts are drawn log-uniformly between ``--min-tokens`` and
``--max-tokens`` with a fixed seed, tokenized once by the model's tokenizer. The micro-batches are
planned once (:func:`storage.jobs.microbatch.plan_microbatches`, the planner a bulk job uses), and
every mode runs them:

1. **plain**: batched inference without capture — each micro-batch left-padded, one
   ``model(input_ids, attention_mask, position_ids)`` forward under ``torch.inference_mode`` with
   the model's own attention implementation (the capture wrapper swapped out, as ``python -m bench``
   does for its plain SDPA pass), greedy decoding with the KV cache for ``--new-tokens``;
2. **summary**, **derived**, **hidden states**, **full attention** (``--attention-layers``): the
   worker's :class:`worker.bulk.BulkExporter` on a ``token_ids`` source of the same ids, with the
   planner's ``token_budget`` and ``max_sequences``, into a local store (the bundle is removed after
   each mode); it plans the same micro-batches, which is checked. ``--layers``: derived and hidden
   states of a layer subset;
3. **raw write**: files of the sizes the hidden-state bundle's files had, random bytes, ``write`` +
   ``fsync`` each (:func:`bench.modes.run_raw_write`) into the same store; **derived raw write**:
   the same for the derived bundle's files (whether derived is bound by the store).

Before any mode is timed, plain inference runs every micro-batch once (kernels, allocator) and
each qkvault mode runs its longest and shortest prompt together; ``os.sync`` runs between modes
(not timed). After the table, on a GPU, how busy it was during each timed run
(:class:`bench.gpubusy.GpuBusy`), then each qkvault mode's job phases (:data:`PHASES`): where its
time went without the profiler's own cost.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.cli import add_compression, add_writer_threads, parse_layers
from bench.gpubusy import GpuBusy
from bench.instrumented import NullHooks
from bench.memory import PeakMemory
from bench.models import MODELS, prepare
from bench.modes import run_raw_write, settle, tree_bytes
from bench.profiling import profiled
from bench.report import machine
from bench.timeline import Timeline
from storage.bundle.bulk import open_bulk
from storage.bundle.format import DEFAULT_COMPRESSION
from storage.bundle.labels import SummaryParams
from storage.bundle.pipeline import default_threads
from storage.jobs.microbatch import MicroBatch, PaddingTally, plan_microbatches
from storage.jobs.spec import JobSpec
from storage.sources.spec import DEFAULT_MAX_SEQUENCES, DEFAULT_TOKEN_BUDGET
from worker.generation import cache_argument, make_batch, returned_cache
from worker.models import LoadedModel

TEXT = Path(__file__).resolve().parents[1] / "scripts" / "data" / "long-prompt.txt"
PLAIN, RAW, RAW_DERIVED = "plain", "raw write", "derived raw write"
# the same-run raw write of each mode's bytes (the row follows the mode's)
RAW_OF = {"hidden states": RAW, "derived": RAW_DERIVED}
RAWS = frozenset(RAW_OF.values())
# the capture of each qkvault mode; "layers" is filled in by the run
CAPTURES: dict[str, dict[str, Any]] = {
    "summary": {"attention": False, "summary": True},
    "derived": {"attention": "derived"},
    "hidden states": {"attention": False, "hidden_states": True},
    "full attention": {"attention": True},
}


@dataclass
class BulkMode:
    """One mode's figures: ``tokens`` are real tokens (prompt + new, no padding)."""

    mode: str
    sequences: int
    micro_batches: int
    tokens: int
    padded_tokens: int
    seconds: float
    bytes_written: int = 0
    capture: dict[str, Any] | None = None
    memory: dict[str, int | bool | None] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Workload:
    """The prompts (token ids) and the micro-batches every mode runs."""

    ids: list[list[int]]
    new_tokens: int
    token_budget: int
    max_sequences: int
    batches: list[MicroBatch]

    @property
    def padding(self) -> PaddingTally:
        tally = PaddingTally()
        for batch in self.batches:
            tally.add(batch)
        return tally


def text_prompts(tokenizer: Any, n: int, min_tokens: int, max_tokens: int, seed: int = 0) -> list[list[int]]:
    """``n`` token-id sequences of real text: windows of :data:`TEXT` starting at a random word,
    about ``L`` tokens each with ``log L`` uniform in ``[log min_tokens, log max_tokens]`` (never more
    than ``max_tokens``)."""
    words = re.findall(r"\s*\S+", TEXT.read_text(encoding="utf-8"))
    counts = [len(ids) for ids in tokenizer(words, add_special_tokens=False)["input_ids"]]
    rng = random.Random(seed)
    out: list[list[int]] = []
    for _ in range(n):
        target = round(math.exp(rng.uniform(math.log(min_tokens), math.log(max_tokens))))
        start = rng.randrange(len(words))
        end, tokens = start + 1, counts[start]  # the text is read cyclically
        while tokens < min_tokens or tokens + counts[end % len(words)] <= target:
            end, tokens = end + 1, tokens + counts[end % len(words)]
        text = "".join(words[i % len(words)] for i in range(start, end)).strip()
        ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
        out.append(ids[:max_tokens])
    return out


def workload(ids: list[list[int]], new_tokens: int, token_budget: int, max_sequences: int) -> Workload:
    """Plan the micro-batches once, as a bulk job plans them (lengths = prompt + new tokens)."""
    lengths = [len(s) + new_tokens for s in ids]
    batches = list(plan_microbatches(lengths, token_budget=token_budget, max_sequences=max_sequences))
    return Workload(ids, new_tokens, token_budget, max_sequences, batches)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _plain_batch(lm: LoadedModel, sequences: list[list[int]], pad_id: int, new_tokens: int) -> float:
    """One micro-batch of plain batched inference: left-padded prefill, greedy decode with the cache.
    Returns the decoding's seconds (every step after the prefill, the device synchronised)."""
    batch = make_batch(sequences, pad_id, lm.device)
    mask = batch.attention_mask
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    ids, cache = batch.input_ids, None
    decode_from = 0.0
    for step in range(new_tokens + 1):
        if step == 1:
            _sync(lm.device)
            decode_from = time.perf_counter()
        extra = {cache_argument(lm.model): cache} if step else {}
        out = lm.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=pos,
            use_cache=new_tokens > 0,
            logits_to_keep=1,
            **extra,
        )
        if step < new_tokens:
            ids, cache = out.logits[:, -1].argmax(-1, keepdim=True), returned_cache(out)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            pos = pos[:, -1:] + 1
    if not new_tokens:
        return 0.0
    _sync(lm.device)
    return time.perf_counter() - decode_from


def run_plain(lm: LoadedModel, work: Workload, memory: PeakMemory) -> BulkMode:
    """Plain batched inference over every micro-batch, the capture wrapper swapped out."""
    from worker.capture.hook import capture_name

    tok, model = lm.tokenizer, lm.model
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    inner = str(lm.info.get("attention_implementation") or "sdpa")
    model.set_attn_implementation(inner)
    try:
        memory.start()
        t0 = time.perf_counter()
        decode_s = 0.0
        with torch.inference_mode():
            for batch in work.batches:
                sequences = [work.ids[i] for i in batch.sequences]
                decode_s += _plain_batch(lm, sequences, int(pad or 0), work.new_tokens)
        _sync(lm.device)
        seconds = time.perf_counter() - t0
    finally:
        model.set_attn_implementation(capture_name(inner))
    tally, peaks = work.padding, memory.stop()
    counts = (len(work.ids), len(work.batches), tally.tokens, tally.padded_tokens)
    extra = {"decode_s": decode_s, "new_tokens": work.new_tokens}
    return BulkMode(PLAIN, *counts, seconds, memory=peaks, extra=extra)


def bulk_spec(
    model: dict[str, Any], work: Workload, capture: dict[str, Any], qkv_dtype: str, compression: str
) -> JobSpec:
    """The bulk job of one qkvault mode: a ``token_ids`` source of the workload's ids."""
    source = dict(kind="token_ids", token_ids=work.ids, token_budget=work.token_budget)
    spec = dict(
        model=model,
        source={**source, "max_sequences": work.max_sequences},
        generation={"max_new_tokens": work.new_tokens, "stop_at_eos": False},
        capture=capture,
        storage={"attention_dtype": "float16", "qkv_dtype": qkv_dtype, "compression": compression},
    )
    return JobSpec.model_validate(spec)


def run_bulk(
    lm: LoadedModel,
    spec: JobSpec,
    name: str,
    bundle: Path,
    memory: PeakMemory,
    *,
    overlap_drains: bool = True,
    writer: dict[str, Any] | None = None,
) -> BulkMode:
    """The worker's BulkExporter in-process (no database) writing ``bundle`` (measured here, removed
    by the caller); ``overlap_drains=False``: each micro-batch's writes end before the next starts;
    ``writer``: BundleWriter options (``write_threads``, ``io_threads``: the worker's settings)."""
    from worker.bulk import BulkExporter

    hooks = NullHooks()
    lm.load_s = 0.0
    options = {**(writer or {}), "on_chunk": hooks.chunk_stored}
    exporter = BulkExporter(
        spec, lm, hooks, bundle_url=str(bundle), writer_options=options, overlap_drains=overlap_drains
    )
    memory.start()
    t0 = time.perf_counter()
    result = exporter.run("bench-bulk")
    _sync(lm.device)
    seconds = time.perf_counter() - t0
    stored, sizes = tree_bytes(bundle)
    peaks = memory.stop()
    counts = (result["sequences"], result["micro_batches"], result["tokens"], result["padded_tokens"])
    capture = spec.capture.model_dump(mode="json", exclude_unset=True)
    timings = result["timings_s"]
    extra = {"files": len(sizes), "file_sizes": sizes, "chunks": hooks.chunks}
    extra["decode_s"] = timings.get("micro_batches_decode", 0.0)  # the generation loop's, every step
    extra["timings_s"] = timings  # the job's phases (the drains' own seconds, the waits for them)
    extra["writer"] = result["writer"]  # the chunk writers' thread-seconds and bytes
    extra["copy_waits"] = result["copy_waits"]  # device-to-host copies the forward thread waited for
    return BulkMode(name, *counts, seconds, stored, capture, memory=peaks, extra=extra)


def _longest_of_each_width(ids: list[list[int]], new_tokens: int) -> dict[int, list[int]]:
    """The longest prompt of each width class (the power of two at or above prompt + new tokens)."""
    out: dict[int, list[int]] = {}
    for prompt in ids:
        width = 1 << max(0, len(prompt) + new_tokens - 1).bit_length()
        if len(prompt) > len(out.get(width, [])):
            out[width] = prompt
    return out


def _warm_up(work: Workload, min_keys: int) -> list[Workload]:
    """The warm-up's micro-batches (:func:`run_benchmark`): the longest prompt and one of 8 eligible
    rows, each alone, then beside itself a token shorter (a padding mask); the shortest prompt and,
    with generated tokens, the longest of each width class."""
    longest = max(work.ids, key=len)
    few_rows = longest[: min_keys + 8]  # a prefill of 8 eligible rows: the small scores tiles
    lead = [p for p in (longest, few_rows) if len(p) > 1]
    rest = [min(work.ids, key=len)]
    if work.new_tokens:
        rest += list(_longest_of_each_width(work.ids, work.new_tokens).values())
    plan = [lead, *([p, p[:-1]] for p in lead), rest]
    return [workload(ids, work.new_tokens, work.token_budget, 1 if ids is lead else 2) for ids in plan]


@contextlib.contextmanager
def _watched(
    lm: LoadedModel, name: str, profile_dir: Path | None, profile_stacks: bool, timeline: bool
) -> Iterator[dict[str, Any]]:
    """One timed run under the profiler (``profile_dir``), the timeline (``timeline``) and the GPU
    busy sampler; the dict it yields gets the run's ``gpu_busy_percent`` and ``timeline`` figures
    once the block ended (for the run's ``extra``)."""
    marks = Timeline(lm.device)
    figures: dict[str, Any] = {}
    with (
        profiled(lm.device, profile_dir, name, stacks=profile_stacks),
        marks.recording(lm.model) if timeline else contextlib.nullcontext(),
        GpuBusy(lm.device) as busy,
    ):
        yield figures
    totals = marks.totals()
    figures["gpu_busy_percent"] = busy.percent
    figures["timeline"] = None if totals is None else {**asdict(totals), "model_s": totals.model_s}


def run_benchmark(
    lm: LoadedModel,
    model: dict[str, Any],
    work: Workload,
    store: Path,
    *,
    layers: list[int] | None = None,
    attention_layers: list[int],
    qkv_dtype: str = "float16",
    compression: str = DEFAULT_COMPRESSION,
    modes: list[str] | None = None,
    summary_params: dict[str, int] | None = None,
    profile_dir: Path | None = None,
    profile_stacks: bool = False,
    timeline: bool = False,
    overlap_drains: bool = True,
    writer: dict[str, Any] | None = None,
) -> dict[str, BulkMode]:
    """Every mode (or plain and ``modes``) on ``work``'s micro-batches (module docstring), after a
    warm-up of each; ``summary_params``: the summary mode's ``capture.summary_params``;
    ``profile_dir``: each timed run (plain and every mode) under the profiler, its operator table
    written there (:func:`bench.profiling.profiled`; ``profile_stacks``: Python calls traced too);
    ``timeline``: each timed run's GPU time in and between forward calls and in the fused metrics
    (:class:`bench.timeline.Timeline`, in each mode's ``extra["timeline"]``);
    ``overlap_drains=False``: every mode's micro-batch writes end before the next micro-batch
    starts (what the overlap is worth); ``writer``: every mode's BundleWriter options
    (:func:`run_bulk`)."""
    memory = PeakMemory(lm.device)
    chosen = [n for n in CAPTURES if modes is None or n in modes]
    captures = {n: {**CAPTURES[n], "layers": layers} for n in chosen}
    if "summary" in captures:
        captures["summary"]["layers"] = None  # small whatever the layers: always all of them
        if summary_params:
            captures["summary"]["summary_params"] = summary_params
    if "full attention" in captures:
        captures["full attention"]["layers"] = attention_layers
    run_plain(lm, work, memory)  # every shape once (kernels, allocator) before any mode is timed
    # every kernel the run takes, as a worker has them after its first jobs (a timed run that
    # compiles one pays 0.3-1.5 s for it on an H100): the fused summary kernels compile once per
    # width class, with and without a padding mask, and their scores tiles once more for a prefill
    # of fewer than 64 eligible rows — so the longest prompt goes alone (no mask, every width) and
    # beside itself a token shorter (masked), and so does a prompt of a few rows past the first
    # eligible one; decoding rows wait and are observed at their sequence's width, so with generated
    # tokens the longest prompt of each width class goes too
    for warm in _warm_up(work, SummaryParams(**(summary_params or {})).min_keys):
        for name, capture in captures.items():
            warm_spec = bulk_spec(model, warm, capture, qkv_dtype, compression)
            run_bulk(lm, warm_spec, name, store / "warm-up.zarr", memory, writer=writer)
            shutil.rmtree(store / "warm-up.zarr", ignore_errors=True)
    settle(lm.device)
    with _watched(lm, PLAIN, profile_dir, profile_stacks, timeline) as figures:
        results = {PLAIN: run_plain(lm, work, memory)}
    results[PLAIN].extra.update(figures)
    _timed(results[PLAIN])
    for name, capture in captures.items():
        settle(lm.device)
        bundle = store / f"{name.replace(' ', '-')}.zarr"
        with _watched(lm, name, profile_dir, profile_stacks, timeline) as figures:
            spec = bulk_spec(model, work, capture, qkv_dtype, compression)
            result = run_bulk(lm, spec, name, bundle, memory, overlap_drains=overlap_drains, writer=writer)
        result.extra.update(figures)
        table = open_bulk(bundle).sequences  # which micro-batch each sequence went to
        done = {int(i): int(b) for i, b in zip(table["sequence"].values, table["batch"].values, strict=True)}
        shutil.rmtree(bundle, ignore_errors=True)
        if done != {i: b.index for b in work.batches for i in b.sequences}:
            raise RuntimeError(f"{name}: the bulk job ran other micro-batches than the plan")
        results[name] = result
        _timed(result)
        if name in RAW_OF:  # the same bytes at the store's own speed
            settle(lm.device)
            raw = run_raw_write(result.extra["file_sizes"], store, memory)
            assert raw.wall_s is not None and raw.stored_bytes is not None
            counts = (result.sequences, result.micro_batches, result.tokens, result.padded_tokens)
            extra = {"parts_s": raw.parts_s, "files": len(result.extra["file_sizes"]), "of": name}
            results[RAW_OF[name]] = BulkMode(
                RAW_OF[name], *counts, raw.wall_s, raw.stored_bytes, memory=raw.memory, extra=extra
            )
    for result in results.values():
        result.extra.pop("file_sizes", None)
    return results


def _timed(mode: BulkMode) -> None:
    """One line on stderr as each timed mode ends: a run cut short still shows what it measured."""
    print(f"timed {mode.mode}: {mode.seconds:.2f} s", file=sys.stderr, flush=True)


def ratios(results: dict[str, BulkMode]) -> dict[str, dict[str, float | None]]:
    """``× plain``: plain seconds / mode seconds (= the tokens/s ratio, the tokens being equal);
    ``× raw write``: hidden-state (derived) seconds / raw-write (derived raw write) seconds, the
    same bytes; with generated tokens, ``decode × plain``: the mode's decoding seconds / plain
    decoding's (issue 13's target: at most 1.2)."""
    plain = results[PLAIN].seconds
    plain_decode = results[PLAIN].extra.get("decode_s") or 0.0
    out: dict[str, dict[str, float | None]] = {}
    for name, r in results.items():
        raw = results[RAW_OF[name]].seconds if RAW_OF.get(name) in results else None
        decode = r.extra.get("decode_s") or 0.0
        out[name] = {
            "x_plain": plain / r.seconds if name not in RAWS and r.seconds else None,
            "x_raw": r.seconds / raw if raw else None,
            "decode_x_plain": decode / plain_decode if plain_decode and decode and name not in RAWS else None,
        }
    return out


def decode_ms_per_step(mode: BulkMode, new_tokens: int) -> float | None:
    """Milliseconds per decoding step of one micro-batch (one generated token per sequence)."""
    decode = mode.extra.get("decode_s") or 0.0
    steps = new_tokens * mode.micro_batches
    return 1000 * decode / steps if decode and steps else None


# a mode's job phases (BulkExporter's timings_s), as the table after the run shows them: the forward
# thread's passes (prefill, decoding), of them the capture's hooks, its work around them (a
# micro-batch's exporter and writer, its arrays, batch, session and hooks before the passes, its
# last partial blocks after them, its token arrays and strings), the drains' own time, the forward
# thread's waits for them, the drains' waits for their micro-batch's device work (still queued when
# it was handed over: worker/capture/sidestream.py) and the forward thread's waits for
# device-to-host copies
PHASES = (
    ("prefill", "micro_batches_prefill"),
    ("prefill capture host", "micro_batches_prefill_capture_host"),
    ("decode", "micro_batches_decode"),
    ("decode capture host", "micro_batches_decode_capture_host"),
    ("setup", "micro_batches_setup"),
    ("passes setup", "micro_batches_passes_setup"),
    ("passes end", "micro_batches_passes_end"),
    ("finish host", "micro_batches_finish_host"),
    ("drain", "micro_batches_drain"),
    ("drain wait", "micro_batches_drain_wait"),
    ("finish wait", "micro_batches_finish_wait"),
    ("pinned wait", "micro_batches_pinned_wait"),
    ("copy wait", "micro_batches_copy_wait"),
)
# a mode's chunk writers (PipelineStats, summed over its micro-batches): thread-seconds of the
# encoder and store pools, the encoders' waits for their input (device-to-host copies), the forward
# thread's waits for room in the writers' queue
WRITER = (
    ("encode thread-s", "encode_s"),
    ("store thread-s", "store_s"),
    ("input wait thread-s", "ready_wait_s"),
    ("queue wait s", "submit_wait_s"),
)


def table(results: dict[str, BulkMode]) -> str:
    """The markdown table of the run, and its padding and micro-batch line."""
    head = (
        "| mode | sequences | tokens | padded tokens | s | tokens/s | × plain | bytes written | × raw write |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    factors = ratios(results)
    for name, r in results.items():
        x_plain, x_raw = factors[name]["x_plain"], factors[name]["x_raw"]
        speed = f"{r.tokens_per_s:,.0f}" if name not in RAWS else "—"
        cells = [name, f"{r.sequences:,}", f"{r.tokens:,}", f"{r.padded_tokens:,}", f"{r.seconds:.2f}", speed]
        cells += [f"{x_plain:.2f}×" if x_plain is not None else "—", f"{r.bytes_written:,}"]
        cells.append(f"{x_raw:.2f}×" if x_raw is not None else "—")
        lines.append("| " + " | ".join(cells) + " |")
    plain = results[PLAIN]
    padding = 1 - plain.tokens / plain.padded_tokens if plain.padded_tokens else 0.0
    lines.append(f"\n{plain.micro_batches} micro-batches; padding {padding:.1%} of the padded tokens")
    # nvidia-smi's utilization.gpu over each timed run (bench/gpubusy.py)
    busy = [
        f"{n} {r.extra['gpu_busy_percent']:.0f}%"
        for n, r in results.items()
        if r.extra.get("gpu_busy_percent") is not None
    ]
    if busy:
        lines.append("GPU busy: " + ", ".join(busy))
    new_tokens = int(plain.extra.get("new_tokens", 0))
    if new_tokens:
        lines += ["", "| mode | decode ms / step | decode × plain |", "|---|---|---|"]
        for name, r in results.items():
            per_step, x_decode = decode_ms_per_step(r, new_tokens), factors[name]["decode_x_plain"]
            if per_step is not None:
                shown = f"{x_decode:.2f}×" if x_decode is not None else "—"
                lines.append(f"| {name} | {per_step:.2f} | {shown} |")
    phased = {name: r.extra["timings_s"] for name, r in results.items() if "timings_s" in r.extra}
    if phased:
        lines += ["", "| mode | " + " | ".join(f"{label} s" for label, _ in PHASES) + " |"]
        lines.append("|---" * (len(PHASES) + 1) + "|")
        for name, timings in phased.items():
            cells = [f"{timings.get(key, 0.0):.3f}" for _, key in PHASES]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    timelines = {n: r.extra["timeline"] for n, r in results.items() if r.extra.get("timeline")}
    if timelines:  # bench/timeline.py: seconds on the GPU's clock
        lines += ["", "| mode | forwards | in forwards s | between forwards s | metrics s | model s |"]
        lines.append("|---|---|---|---|---|---|")
        for name, t in timelines.items():
            cells = [f"{t[k]:.3f}" for k in ("in_forwards_s", "between_forwards_s", "metrics_s", "model_s")]
            lines.append(f"| {name} | {t['forwards']:,} | " + " | ".join(cells) + " |")
    writers = {n: r.extra["writer"] for n, r in results.items() if r.extra.get("writer", {}).get("chunks")}
    if writers:
        lines += ["", "| mode | chunks | " + " | ".join(label for label, _ in WRITER) + " | GB in / stored |"]
        lines.append("|---" * (len(WRITER) + 3) + "|")
        for name, stats in writers.items():
            cells = [f"{stats['chunks']:,}", *(f"{stats.get(key, 0.0):.2f}" for _, key in WRITER)]
            cells.append(f"{stats['input_bytes'] / 1e9:.2f} / {stats['stored_bytes'] / 1e9:.2f}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _estimate_bytes(lm: LoadedModel, work: Workload, layers: int, attention_layers: int, item: int) -> int:
    """The largest bundle of one mode (before compression): q/k, hidden states or causal attention."""
    f = lm.facts
    tokens = work.padding.tokens
    derived = layers * tokens * f.head_dim * (f.num_heads + f.num_kv_heads) * item
    hidden = layers * tokens * f.hidden_size * item
    triangle = sum(n * (n + 1) // 2 for n in (len(s) + work.new_tokens for s in work.ids))
    return max(derived, hidden, attention_layers * f.num_heads * triangle * 2)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.bulk",
        description="A bulk job's tokens/s: plain batched inference vs qkvault's capture modes on the "
        "same micro-batches, and a raw write of the hidden states' and derived q/k's bytes "
        "(docs/benchmarks.md).",
    )
    p.add_argument(
        "--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    p.add_argument("--model", choices=MODELS, help="default: smollm2 on cpu, llama-8b on cuda")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    p.add_argument("--prompts", type=int, help="number of prompts (default 200 on cpu, 1000 on cuda)")
    p.add_argument("--min-tokens", type=int, default=16, help="shortest prompt, about (default 16)")
    p.add_argument("--max-tokens", type=int, help="longest prompt (default 256 on cpu, 2048 on cuda)")
    p.add_argument("--new-tokens", type=int, default=0, help="generated tokens (default 0: prefill only)")
    p.add_argument(
        "--token-budget", type=int, default=DEFAULT_TOKEN_BUDGET, help="padded tokens per micro-batch"
    )
    p.add_argument(
        "--max-sequences", type=int, default=DEFAULT_MAX_SEQUENCES, help="sequences per micro-batch"
    )
    p.add_argument("--layers", type=parse_layers, help="derived and hidden-state layers (default: all)")
    p.add_argument("--attention-layers", type=parse_layers, help="full attention layers (default: 4 spread)")
    p.add_argument(
        "--qkv-dtype", choices=("float16", "float32"), default="float16", help="q/k, hidden states"
    )
    p.add_argument("--seed", type=int, default=0, help="prompt lengths and windows")
    p.add_argument("--threads", type=int, help="torch CPU threads (default torch's; 1 on a busy machine)")
    p.add_argument("--store", type=Path, help="store directory (default: a temporary directory)")
    p.add_argument("--model-cache", type=Path, help="dequantised GGUF cache (default: the tests' cache)")
    p.add_argument(
        "--modes",
        type=lambda text: [m.strip().replace("-", " ") for m in text.split(",")],
        help=f"qkvault modes to run after plain, comma-separated, of {', '.join(CAPTURES)} (default: all; "
        "the raw writes run with hidden states and derived)",
    )
    p.add_argument(
        "--serial-drains",
        action="store_true",
        help="each micro-batch's writes end before the next starts (what overlapping them is worth)",
    )
    add_compression(p)
    add_writer_threads(p)
    p.add_argument("--sink-tokens", type=int, help="summary mode: capture.summary_params.sink_tokens")
    p.add_argument("--local-window", type=int, help="summary mode: capture.summary_params.local_window")
    p.add_argument("--json", type=Path, help="write the figures as JSON here")
    p.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="run each timed mode under torch.profiler and write its operator table to DIR/<mode>.txt, "
        "on a GPU also its idle gaps by what ended them to DIR/<mode>-idle.txt (the timings then "
        "include the profiler's cost)",
    )
    p.add_argument(
        "--timeline",
        action="store_true",
        help="on a GPU: each timed run's GPU seconds in and between forward calls and in the fused "
        "metrics, from CUDA events (bench/timeline.py; no profiler)",
    )
    p.add_argument(
        "--profile-stacks",
        action="store_true",
        help="with --profile: trace Python calls too, naming each idle gap's Python frames "
        "(a much slower host)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = " ".join(["python -m bench.bulk", *(sys.argv[1:] if argv is None else argv)])
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: CUDA is not available here", file=sys.stderr)
        return 2
    unknown = sorted(set(args.modes or ()) - set(CAPTURES))
    if unknown:
        print(f"--modes: unknown {unknown}; choose from {', '.join(CAPTURES)}", file=sys.stderr)
        return 2
    cpu = device.type == "cpu"
    name = args.model or ("smollm2" if cpu else "llama-8b")
    n, max_tokens = args.prompts or (200 if cpu else 1000), args.max_tokens or (256 if cpu else 2048)
    options = dict(layers=None, qkv=False, chunk_rows=512, model_cache=args.model_cache, new_tokens=0)
    # the model, with a prompt of the longest length (so the positions are checked)
    bm = prepare(name, device=device, dtype=args.dtype, tokens=max_tokens + args.new_tokens, **options)
    lm, count = bm.lm, bm.lm.facts.num_layers
    attention_layers = args.attention_layers or sorted({round(i * (count - 1) / 3) for i in range(4)})
    ids = text_prompts(lm.tokenizer, n, args.min_tokens, max_tokens, args.seed)
    work = workload(ids, args.new_tokens, args.token_budget, args.max_sequences)
    root = Path(tempfile.mkdtemp(prefix="qkvault-bench-bulk-")) if args.store is None else args.store
    store = root / f"bulk-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    store.mkdir(parents=True, exist_ok=True)
    info = machine()
    run = {**vars(args), "model": name, "dtype": str(lm.dtype).replace("torch.", ""), "prompts": n}
    run.update(max_tokens=max_tokens, attention_layers=attention_layers, store=store)
    run.update(encode_threads=args.encode_threads or default_threads())
    run.update(prompt_tokens=[min(map(len, ids)), max(map(len, ids))], padding=work.padding.fraction)
    print(f"command: {command}")
    print(
        f"machine: {info.get('gpu') or info.get('cpu')}; {info['cpus']} CPUs; torch {info['torch']} "
        f"({info['torch_threads']} threads); load average {info['load_average_1_5_15']}"
    )
    print(
        f"model {name} ({count} layers, {run['dtype']}) on {device}; {n} prompts of {run['prompt_tokens']} "
        f"tokens + {args.new_tokens} new; micro-batches of ≤ {args.token_budget:,} padded tokens and ≤ "
        f"{args.max_sequences} sequences; full attention layers {attention_layers}; store {store}",
        flush=True,
    )
    print(
        f"chunk writer: {run['encode_threads']} encoder threads (encoding in {args.encoder}), "
        f"{run['io_threads']} store threads, codec {args.compression}"
    )
    item = 2 if args.qkv_dtype == "float16" else 4
    need = _estimate_bytes(lm, work, len(args.layers or range(count)), len(attention_layers), item)
    try:
        if need > 0.9 * shutil.disk_usage(store).free:
            print(f"one mode would write ≈{need / 1e9:.1f} GB: too much for the disk; use --layers")
            return 2
        model = bm.spec.model.model_dump(mode="json")
        options = dict(layers=args.layers, attention_layers=attention_layers, qkv_dtype=args.qkv_dtype)
        options.update(compression=args.compression)
        window = {"sink_tokens": args.sink_tokens, "local_window": args.local_window}
        options.update(modes=args.modes, summary_params={k: v for k, v in window.items() if v is not None})
        options.update(overlap_drains=not args.serial_drains)
        writer = {"write_threads": args.encode_threads, "io_threads": args.io_threads}
        options.update(writer={**writer, "write_processes": args.encoder == "processes"})
        results = run_benchmark(
            lm,
            model,
            work,
            store,
            profile_dir=args.profile,
            profile_stacks=args.profile_stacks,
            timeline=args.timeline,
            **options,
        )
    finally:
        shutil.rmtree(root if args.store is None else store, ignore_errors=True)
    print("\n" + table(results))
    if args.profile is not None:
        print(f"\noperator tables in {args.profile} (timings above include the profiler's cost)")
    if args.json is not None:
        modes = {k: {**asdict(r), "tokens_per_s": r.tokens_per_s} for k, r in results.items()}
        figures = {"command": command, "machine": info, "run": run, "modes": modes, "ratios": ratios(results)}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
