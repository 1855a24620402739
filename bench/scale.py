"""One bulk job at scale: N sequences from an uploaded JSONL file through the worker's
:class:`~worker.bulk.BulkExporter`, then the reads a researcher makes (docs/benchmarks.md).

The file (token ids, lengths uniform in ``--min-tokens .. --max-tokens``, written row by row) is an
upload in a local store, read by the worker as it streams; the job runs in this process without a
database (the chunk records are counted). Reported: the job's seconds and sequences/s, its
micro-batches and padding, the process's peak resident memory before and after the job (the
source is never held whole), the bundle's files and bytes, and the time to open the bundle, read
``--reads`` random sequences and aggregate the summary over the dataset.

    python -m bench.scale --sequences 100000 --capture summary      # the figures in docs/benchmarks.md
    python -m bench.scale --sequences 300 --capture hidden_states   # smoke (tests/test_bench_scale.py)
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.instrumented import NullHooks
from bench.models import prepare
from bench.modes import tree_bytes
from storage.bundle.bulk import open_bulk
from storage.jobs.spec import JobSpec
from storage.sources.rows import SourceContext
from storage.stores.objectstore import ObjectStore
from storage.stores.uploads import UploadSink

OWNER = "bench"
CAPTURES: dict[str, dict[str, Any]] = {
    "summary": {"attention": False, "summary": True},
    "hidden_states": {"attention": False, "hidden_states": True},
}


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (Linux: ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def write_source(
    store: ObjectStore, sequences: int, min_tokens: int, max_tokens: int, vocab: int
) -> tuple[str, int]:
    """An upload of ``sequences`` JSONL rows ``{"ids": [...]}``, streamed: (upload id, tokens)."""
    rng = random.Random(0)
    sink = UploadSink(store, OWNER, "scale", max_bytes=1 << 40)
    tokens = 0
    lines: list[str] = []
    for _ in range(sequences):
        n = rng.randint(min_tokens, max_tokens)
        tokens += n
        lines.append(json.dumps({"ids": [rng.randrange(vocab) for _ in range(n)]}))
        if len(lines) == 4096:
            sink.write(("\n".join(lines) + "\n").encode())
            lines = []
    if lines:
        sink.write(("\n".join(lines) + "\n").encode())
    return sink.commit().id, tokens


def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    bm = prepare(
        args.model,
        device=torch.device("cpu"),
        dtype="float32",
        tokens=args.max_tokens,
        new_tokens=0,
        layers=None,
        qkv=False,
        chunk_rows=512,
        model_cache=None,
    )
    lm = bm.lm
    store = ObjectStore(str(root / "store"))
    t0 = time.perf_counter()
    upload, tokens = write_source(store, args.sequences, args.min_tokens, args.max_tokens, 256)
    write_s = time.perf_counter() - t0
    spec = JobSpec.model_validate(
        {
            "model": bm.spec.model.model_dump(mode="json"),
            "source": {
                "kind": "file",
                "upload": upload,
                "format": "jsonl",
                "field": "ids",
                "token_budget": args.token_budget,
                "max_sequences": args.max_sequences,
            },
            "generation": {"max_new_tokens": 0},
            "capture": CAPTURES[args.capture],
            "storage": {"qkv_dtype": "float16"},
        }
    )
    from worker.bulk import BulkExporter

    hooks = NullHooks()
    bundle = root / "scale.zarr"
    exporter = BulkExporter(
        spec,
        lm,
        hooks,
        bundle_url=str(bundle),
        writer_options={"on_chunk": hooks.chunk_stored},
        context=SourceContext(store=store, owner=OWNER),
    )
    rss_before = peak_rss_bytes()
    t0 = time.perf_counter()
    result = exporter.run("bench-scale")
    job_s = time.perf_counter() - t0
    rss_after = peak_rss_bytes()
    stored, sizes = tree_bytes(bundle)
    t0 = time.perf_counter()
    opened = open_bulk(bundle)
    table = opened.sequences
    open_s = time.perf_counter() - t0
    rng = random.Random(1)
    picks = [rng.randrange(args.sequences) for _ in range(args.reads)]
    t0 = time.perf_counter()
    for i in picks:
        one = opened.sequence(i)
        one.load()
        if int(one.attrs["sequence"]) != i:
            raise RuntimeError(f"sequence({i}) read sequence {one.attrs['sequence']}")
    read_s = (time.perf_counter() - t0) / max(1, len(picks))
    summary_s = None
    if args.capture == "summary":
        t0 = time.perf_counter()
        opened.summary()
        summary_s = time.perf_counter() - t0
    if table.sizes["sequence"] != args.sequences:
        raise RuntimeError(f"the table holds {table.sizes['sequence']} sequences, not {args.sequences}")
    return {
        "sequences": result["sequences"],
        "tokens": tokens,
        "micro_batches": result["micro_batches"],
        "padding_fraction": result["padding_fraction"],
        "source_write_s": round(write_s, 2),
        "job_s": round(job_s, 2),
        "sequences_per_s": round(result["sequences"] / job_s, 1),
        "tokens_per_s": round(tokens / job_s, 1),
        "peak_rss_before_job_bytes": rss_before,
        "peak_rss_after_job_bytes": rss_after,
        "bundle_files": len(sizes),
        "bundle_bytes": stored,
        "chunks_recorded": hooks.chunks,
        "open_s": round(open_s, 3),
        "read_one_sequence_s": round(read_s, 4),
        "summary_over_dataset_s": None if summary_s is None else round(summary_s, 2),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sequences", type=int, default=100_000)
    parser.add_argument("--capture", choices=sorted(CAPTURES), default="summary")
    parser.add_argument("--model", default="tiny", help="a bench model (bench/models.py; default tiny)")
    parser.add_argument("--min-tokens", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--token-budget", type=int, default=16_384)
    parser.add_argument("--max-sequences", type=int, default=1024, help="sequences per micro-batch")
    parser.add_argument("--reads", type=int, default=20, help="random sequences read back")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--store", type=Path, default=None, help="a folder (default: a temporary one)")
    parser.add_argument("--json", type=Path, default=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads:  # restored after the run: a caller in the same process (a test) keeps its own
        torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="qkvault-bench-scale-", dir=args.store))
    command = " ".join(["python -m bench.scale", *(sys.argv[1:] if argv is None else argv)])
    print(f"command: {command}", flush=True)
    try:
        figures = run(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        torch.set_num_threads(threads)
    for key, value in figures.items():
        print(f"{key}: {value:,}" if isinstance(value, int) else f"{key}: {value}")
    if args.json is not None:
        args.json.write_text(json.dumps({"command": command, **figures}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
