"""``python -m bench``: naive ``output_attentions`` dump vs qkvault's export vs a raw write of the
same bytes — one process, one model, one prompt (docs/benchmarks.md has the commands and results).

Order: warm-up, plain SDPA forward (memory reference), qkvault, raw write of the bundle's file
sizes, naive last (it is the mode that runs out of memory; an OOM is reported, not raised).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.memory import PeakMemory
from bench.models import MODELS, BenchModel, prepare
from bench.modes import (
    ModeResult,
    attention_logical_bytes,
    run_naive,
    run_qkvault,
    run_raw_write,
    run_sdpa_forward,
    settle,
    tree_bytes,
    warm_up,
)
from bench.report import GIB, figures, table
from storage.bundle.format import COMPRESSIONS, DEFAULT_CHUNK_ROWS, DEFAULT_COMPRESSION
from storage.bundle.pipeline import DEFAULT_IO_THREADS


def parse_layers(text: str) -> list[int]:
    """``"0,5,10-12"`` → ``[0, 5, 10, 11, 12]``."""
    out: set[int] = set()
    for part in text.split(","):
        start, sep, end = part.strip().partition("-")
        out.update(range(int(start), int(end) + 1) if sep else [int(start)])
    return sorted(out)


def add_writer_threads(p: argparse.ArgumentParser) -> None:
    """``--encode-threads``, ``--encoder`` and ``--io-threads``: the chunk writer's threads and
    where it encodes (BundleWriter's ``write_threads``, ``write_processes`` and ``io_threads``)."""
    p.add_argument("--encode-threads", type=int, help="chunk encoder threads (default: one per core, ≤ 16)")
    p.add_argument(
        "--encoder",
        choices=("processes", "threads"),
        default="processes",
        help="encode chunks copied from a GPU in as many processes (default, a worker's) or in the "
        "encoder threads",
    )
    p.add_argument(
        "--io-threads",
        type=int,
        default=DEFAULT_IO_THREADS,
        help=f"threads storing encoded chunks (default {DEFAULT_IO_THREADS})",
    )


def add_compression(p: argparse.ArgumentParser) -> None:
    """``--compression``: the job's ``storage.compression``."""
    p.add_argument(
        "--compression",
        choices=tuple(COMPRESSIONS),
        default=DEFAULT_COMPRESSION,
        help=f"qkvault chunk codec (default {DEFAULT_COMPRESSION}, a job's default)",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Naive output_attentions dump vs qkvault's export vs a raw write of the same bytes: "
        "one process, one model, one prompt (docs/benchmarks.md).",
    )
    p.add_argument(
        "--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    p.add_argument("--model", choices=MODELS, help="default: smollm2 on cpu, llama-8b on cuda")
    p.add_argument("--tokens", type=int, default=2048, help="prompt tokens (exact), default 2048")
    p.add_argument("--new-tokens", type=int, default=0, help="generated tokens (default 0: prompt only)")
    p.add_argument("--layers", type=parse_layers, help="layer subset, e.g. 0,15 or 0-3 (default: all)")
    p.add_argument("--qkv", action="store_true", help="qkvault also exports q/k/v (fp16)")
    p.add_argument(
        "--attention",
        choices=("materialised", "derived"),
        default="materialised",
        help="qkvault stores the attention probabilities (default), or q/k to derive them on read "
        "(no T×T array; the naive T×T dump is skipped)",
    )
    p.add_argument("--skip-naive", action="store_true", help="do not run the naive baseline")
    dtypes = ("auto", "float32", "bfloat16", "float16")
    p.add_argument("--dtype", default="auto", choices=dtypes, help="weights (auto: SmolLM2 fp32 on cpu)")
    p.add_argument(
        "--chunk-rows",
        type=int,
        default=DEFAULT_CHUNK_ROWS,
        help=f"qkvault chunk rows (default {DEFAULT_CHUNK_ROWS}, a job's default)",
    )
    add_compression(p)
    add_writer_threads(p)
    p.add_argument("--store", type=Path, help="store directory (default: a temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep the qkvault bundle (else removed)")
    p.add_argument("--model-cache", type=Path, help="dequantised GGUF cache (default: the tests' cache)")
    p.add_argument("--json", type=Path, help="write the figures as JSON here")
    p.add_argument("--profile", type=Path, help="cProfile the qkvault mode into this file")
    return p


def _naive_fits(bm: BenchModel, store: Path) -> str | None:
    """The kernel's OOM killer ends the process instead of raising, and a full disk breaks the rest
    of the run: refuse a naive run whose host copies (every selected layer's attention in the
    model's dtype, then an fp32 copy of each for ``np.savez``) cannot fit in the available memory,
    or whose ``.npz`` cannot fit on the store's disk. On CPU every layer's attention is held."""
    try:
        with open("/proc/meminfo") as fh:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in fh}
    except OSError:
        return None
    facts = bm.lm.facts
    itemsize = torch.finfo(bm.lm.dtype).bits // 8
    dense = facts.num_heads * bm.positions**2
    upcast = 4 if itemsize != 4 else 0  # np.savez gets fp32 copies unless the attention is fp32
    held = facts.num_layers if bm.lm.device.type == "cpu" else len(bm.layers)
    need = held * dense * itemsize + len(bm.layers) * dense * upcast
    available = info.get("MemAvailable", 0)
    if need > 0.9 * available:
        return f"would need ≈{need / GIB:.1f} GiB of host memory, {available / GIB:.1f} GiB available"
    disk = len(bm.layers) * dense * 4
    free = shutil.disk_usage(store).free
    if disk > 0.9 * free:
        return f"its fp32 .npz would need ≈{disk / GIB:.1f} GiB of disk, {free / GIB:.1f} GiB free"
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: CUDA is not available here", file=sys.stderr)
        return 2
    name = args.model or ("smollm2" if device.type == "cpu" else "llama-8b")
    temp_root = args.store is None
    root = Path(tempfile.mkdtemp(prefix="qkvault-bench-")) if temp_root else args.store
    store = root / f"bench-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    store.mkdir(parents=True, exist_ok=True)
    try:
        bm = prepare(
            name,
            device=device,
            dtype=args.dtype,
            tokens=args.tokens,
            new_tokens=args.new_tokens,
            layers=args.layers,
            qkv=args.qkv,
            chunk_rows=args.chunk_rows,
            compression=args.compression,
            model_cache=args.model_cache,
            attention=args.attention,
        )
        facts = bm.lm.facts
        print(
            f"model {name} ({facts.num_layers} layers, {facts.num_heads}/{facts.num_kv_heads} heads, "
            f"head_dim {facts.head_dim}, {str(bm.lm.dtype).replace('torch.', '')}) on {device}; "
            f"{len(bm.prompt_ids)} prompt tokens + {args.new_tokens} new; layers exported "
            f"{len(bm.layers)}; q/k/v {'on' if args.qkv else 'off'}; chunks of {args.chunk_rows} rows, "
            f"{args.compression}; " + ("attention derived (q/k); " if bm.derived else "") + f"store {store}",
            flush=True,
        )
        warm_up(bm)
        memory = PeakMemory(device)
        results: dict[str, ModeResult] = {}
        results["sdpa forward"] = run_sdpa_forward(bm, memory)
        settle(device)
        results["qkvault"] = qkvault = run_qkvault(
            bm,
            store,
            memory,
            args.profile,
            encode_threads=args.encode_threads,
            write_processes=args.encoder == "processes",
            io_threads=args.io_threads,
        )
        settle(device)
        if qkvault.status == "ok":
            sizes = tree_bytes(store / "bundle.zarr")[1]
            if not args.keep:  # free the disk before writing the same bytes again (32K contexts)
                shutil.rmtree(store / "bundle.zarr", ignore_errors=True)
            raw = run_raw_write(sizes, store, memory)
            raw.logical_bytes = qkvault.logical_bytes  # the same content, at storage speed
        else:
            raw = ModeResult("raw write", status="skipped", note="no qkvault bundle to size it")
        results["raw write"] = raw
        settle(device)
        reason = "--skip-naive" if args.skip_naive else _naive_fits(bm, store)
        if bm.derived and not reason:
            reason = "--attention derived: the naive dump materialises T×T attention"
        if reason:
            naive = ModeResult(
                "naive", status="skipped", logical_bytes=attention_logical_bytes(bm), note=reason
            )
        else:
            naive = run_naive(bm, store, memory)
        results["naive"] = naive
        print()
        print(table(results, cuda=device.type == "cuda"))
        if "profile_top" in qkvault.extra:
            print("\nqkvault profile (top 15 by own time):", file=sys.stderr)
            print(qkvault.extra["profile_top"], file=sys.stderr)
        if args.json is not None:
            run = {
                "command": " ".join(["python -m bench", *(argv if argv is not None else sys.argv[1:])]),
                "model": name,
                "model_facts": facts.to_dict(),
                "dtype": str(bm.lm.dtype).replace("torch.", ""),
                "device": str(device),
                "prompt_tokens": len(bm.prompt_ids),
                "new_tokens": args.new_tokens,
                "layers": bm.layers,
                "qkv": args.qkv,
                "attention": args.attention,
                "chunk_rows": args.chunk_rows,
                "compression": args.compression,
                "encode_threads": args.encode_threads,
                "encoder": args.encoder,
                "io_threads": args.io_threads,
                "store": str(store),
                "kept": args.keep,
                "load_average_at_start": load_at_start,
            }
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(figures(results, run), indent=2) + "\n")
        if args.keep:
            print(f"\nkept: {store / 'bundle.zarr'}")
    finally:
        if not args.keep:
            shutil.rmtree(root if temp_root else store, ignore_errors=True)
    return 0
