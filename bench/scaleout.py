"""One sharded job run by 1, 2, ... N real Celery worker processes on this machine
(issue 15; docs/benchmarks.md "Scale-out").

For each worker count: a fresh SQLite index and local store, a private Redis, N ``python -m worker``
processes (each its own model copy, concurrency 1) and one job, either (``--cut micro-batches``)
a bulk job of ``--sequences`` inline token-id sequences split into shards of
``--shard-micro-batches`` micro-batches, or (``--cut layers``) one prompt of ``--prompt-tokens``
tokens exporting attention, q/k/v and hidden states of every layer, split into shards of
``--shard-layers`` layers. Reported per count: seconds from enqueue to ``succeeded`` (workers
already started and the model loaded once each by a warm-up job), sequences/s and tokens/s, the
speed-up over the first row (the same job not cut, on one worker; ``--no-baseline``: the first
count's), and how many shards each worker ran.

    python -m bench.scaleout --workers 1,2                    # the CPU figures in docs/benchmarks.md
    python -m bench.scaleout --workers 1,2 --cut layers
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from qkvault.embedded import start_redis_server
from qkvault.processes import free_port, log_tail, spawn, stop_process
from storage.index import Index, JobState
from storage.index import shards as sh
from storage.stores.objectstore import ObjectStore
from worker.settings import WorkerSettings

MODEL = {  # a small random Llama: enough compute per token that the workers, not Redis, are the cost
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "vocab_size": 258,
    "max_position_embeddings": 8192,
    "bos_token_id": 256,
    "eos_token_id": 257,
    "pad_token_id": 257,
}


def build_model(folder: Path, layers: int = MODEL["num_hidden_layers"]) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from worker.archmatrix.tokenizer import byte_tokenizer

    if not (folder / "config.json").is_file():
        torch.manual_seed(0)
        config = AutoConfig.for_model("llama", **{**MODEL, "num_hidden_layers": layers})
        AutoModelForCausalLM.from_config(config).save_pretrained(folder)
        byte_tokenizer().save_pretrained(folder)
    return folder


def job_spec(model: Path, args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(0)
    if args.cut == "layers":
        prompt = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(args.prompt_tokens - 1))
        return {  # the byte tokenizer: a token per character, after the BOS token
            "model": {"id": str(model)},
            "prompts": [prompt],
            "generation": {"max_new_tokens": 0},
            "capture": {"attention": True, "qkv": True, "hidden_states": True},
        }
    ids = [
        [rng.randrange(256) for _ in range(rng.randint(args.min_tokens, args.max_tokens))]
        for _ in range(args.sequences)
    ]
    return {
        "model": {"id": str(model)},
        "source": {
            "kind": "token_ids",
            "token_ids": ids,
            "token_budget": args.token_budget,
            "max_sequences": 16,
        },
        "generation": {"max_new_tokens": args.new_tokens},
        "capture": {"attention": True},
    }


def run_count(
    workers: int, model: Path, args: argparse.Namespace, root: Path, *, sharded: bool = True
) -> dict[str, Any]:
    """One job on ``workers`` fresh workers; ``sharded=False``: the job is not cut (the baseline)."""
    root.mkdir(parents=True)
    redis_port = free_port()
    redis = start_redis_server(redis_port, root / "redis")
    settings = WorkerSettings(
        database_url=f"sqlite:///{root}/index.db",
        store_url=str(root / "store"),
        redis_url=f"redis://127.0.0.1:{redis_port}/0",
        queue_name="scaleout",
    )
    index, store = Index(settings.database_url), ObjectStore.from_settings(settings)
    index.migrate()
    env = {
        **os.environ,
        "QKVAULT_DATABASE_URL": settings.database_url,
        "QKVAULT_STORE_URL": settings.store_url,
        "QKVAULT_REDIS_URL": settings.redis_url,
        "QKVAULT_QUEUE_NAME": settings.queue_name,
        "QKVAULT_DEVICE": "cpu",
        "QKVAULT_MODEL_ROOTS": json.dumps([str(model.parent)]),
        "QKVAULT_SHARD_MICRO_BATCHES": str(args.shard_micro_batches if sharded else 0),
        "QKVAULT_SHARD_LAYERS": str(args.shard_layers if sharded else 0),
        # the same threads per worker at every count (a worker per core by default): with the
        # cores split between workers instead, one 2-thread worker on this 2-core machine ran 4x
        # slower than two 1-thread ones (its parallel regions wait for a descheduled thread)
        "OMP_NUM_THREADS": str(args.threads_per_worker),
    }
    from worker.app import create_celery_app, enqueue_export

    app = create_celery_app(settings)
    procs = [
        spawn([sys.executable, "-m", "worker"], root / f"worker{i}.log", env=env) for i in range(workers)
    ]
    try:
        spec = job_spec(model, args)
        warm = {**spec, "prompts": ["warm"]} if "prompts" in spec else {
            **spec, "source": {**spec["source"], "token_ids": spec["source"]["token_ids"][:1]}
        }  # fmt: skip
        warmups = [  # one tiny job per worker, sent at once: each loads the model before the clock
            index.create_job(spec=warm, owner="bench", store_url_for=store.bundle_url, max_attempts=1).id
            for _ in range(workers)
        ]
        for job_id in warmups:
            enqueue_export(app, job_id)
        for job_id in warmups:
            _wait(index, job_id, procs, root, args.timeout_s)
        job = index.create_job(spec=spec, owner="bench", store_url_for=store.bundle_url, max_attempts=2)
        started = time.perf_counter()
        enqueue_export(app, job.id)
        done = _wait(index, job.id, procs, root, args.timeout_s)
        seconds = time.perf_counter() - started
    finally:
        for proc in procs:
            stop_process(proc, grace_s=10)
        app.close()
        stop_process(redis, grace_s=5)
    if done.state is not JobState.SUCCEEDED:
        raise SystemExit(f"{workers} workers: job {done.state.value}: {done.error}")
    shards = sh.list_shards(index, done.id)
    index.dispose()
    sequences = args.sequences if args.cut == "micro-batches" else 1
    tokens = done.tokens_done if args.cut == "micro-batches" else args.prompt_tokens
    return {
        "workers": workers,
        "cut": args.cut if sharded else "none",
        "seconds": round(seconds, 2),
        "sequences_per_s": round(sequences / seconds, 2),
        "tokens_per_s": round(tokens / seconds, 1),
        "micro_batches": (done.result or {}).get("micro_batches"),
        "shards": len(shards),
        "shards_per_worker": sorted(Counter(s.last_worker for s in shards).values(), reverse=True),
    }


def _wait(index: Index, job_id: str, procs: list[Any], root: Path, timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = index.get_job(job_id)
        if job.terminal:
            return job
        if any(p.poll() is not None for p in procs):
            raise SystemExit(f"a worker exited:\n{log_tail(root / 'worker0.log')}")
        time.sleep(0.2)
    raise SystemExit(f"job {job_id} not done after {timeout_s} s")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.scaleout", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="1,2", help="worker counts, comma-separated (default 1,2)")
    parser.add_argument(
        "--cut", choices=("micro-batches", "layers"), default="micro-batches", help="what the shards split"
    )
    parser.add_argument("--prompt-tokens", type=int, default=768, help="--cut layers: the prompt's tokens")
    parser.add_argument("--shard-layers", type=int, default=1, help="--cut layers: layers per shard")
    parser.add_argument("--model-layers", type=int, default=4, help="decoder layers of the random Llama")
    parser.add_argument(
        "--no-baseline",
        dest="baseline",
        action="store_false",
        help="leave out the first row: the job not cut, on one worker (the speed-ups are against it)",
    )
    parser.add_argument("--sequences", type=int, default=256)
    parser.add_argument("--min-tokens", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--new-tokens", type=int, default=4)
    parser.add_argument("--token-budget", type=int, default=2048)
    parser.add_argument("--shard-micro-batches", type=int, default=4)
    parser.add_argument("--timeout-s", type=float, default=1200.0)
    parser.add_argument("--threads-per-worker", type=int, default=1, help="torch CPU threads of each worker")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    counts = [int(n) for n in args.workers.split(",")]
    with tempfile.TemporaryDirectory(prefix="qk-scaleout-") as tmp:
        model = build_model(Path(tmp) / "models" / "scaleout-llama", args.model_layers)
        rows = [run_count(1, model, args, Path(tmp) / "uncut", sharded=False)] if args.baseline else []
        rows += [run_count(n, model, args, Path(tmp) / f"run{n}") for n in counts]
    base = rows[0]["seconds"] * rows[0]["workers"]  # the baseline, or the first count's
    for row in rows:
        row["speedup"] = round(base / row["seconds"], 2)
    print(json.dumps(rows, indent=2))
    print(
        f"{'workers':>8} {'cut':>14} {'seconds':>8} {'seq/s':>8} {'tok/s':>9} {'speed-up':>9} shards/worker"
    )
    for r in rows:
        print(
            f"{r['workers']:>8} {r['cut']:>14} {r['seconds']:>8} {r['sequences_per_s']:>8} "
            f"{r['tokens_per_s']:>9} {r['speedup']:>9} {r['shards_per_worker']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
