"""``python -m bench.metrics``: the per-head summary metrics alone
(:func:`worker.capture.metrics.row_metrics`), on blocks of attention rows shaped as the capture
hands them over (docs/benchmarks.md, "Bulk jobs").

The capture calls ``row_metrics`` with ``probs [H, n, K]``: ``n`` ≤ 128 rows of one (layer, sequence)
(``worker.capture.session.SUB_BLOCK_ROWS``) at positions ``K - n .. K - 1``, causal (zero past each
row's position). This bench builds such blocks (softmax of random logits whose sharpness varies by
head, so concentrated and diffuse heads are both there), warms up, then times ``--repeat`` calls of
each shape, the device synchronised after each, and prints milliseconds per call, microseconds per
(head, row) and the fp32 probabilities' bytes read per second. ``--profile`` adds a torch.profiler
table of the operators (the last shape).

``--sequences T1,T2,...`` times instead one layer's metrics for one whole sequence of T tokens from
q and k (the 8B shape: 32 query heads, 8 kv heads, head_dim 128, bf16 on CUDA), both ways the
capture can take: probabilities (``causal_block_probs`` per 128-row block, then
``HeadMetricsAccumulator.observe``) and fused (``HeadMetricsAccumulator.observe_qk``: Triton kernels
from q and k, :mod:`worker.capture.fused_metrics`), each up to ``result()``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from storage.bundle.labels import SummaryParams
from worker.capture.metrics import row_metrics

SUB_BLOCK_ROWS = 128  # worker.capture.session.SUB_BLOCK_ROWS (not imported: session imports the writer)


def causal_block(heads: int, rows: int, keys: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """``[heads, rows, keys]`` fp32 softmax rows at positions ``keys - rows .. keys - 1`` (zero past
    each row's position); head h's logits are scaled by one of 0.3, 2, 6, 12 (diffuse to sharp)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    logits = torch.randn(heads, rows, keys, generator=gen)
    scale = torch.tensor([(0.3, 2.0, 6.0, 12.0)[h % 4] for h in range(heads)])[:, None, None]
    positions = torch.arange(keys - rows, keys)
    visible = torch.arange(keys)[None, :] <= positions[:, None]
    logits = (logits * scale).masked_fill(~visible, float("-inf"))
    return torch.softmax(logits, dim=-1).to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_shape(
    heads: int, rows: int, keys: int, device: torch.device, params: SummaryParams, repeat: int
) -> dict[str, float]:
    """Seconds per ``row_metrics`` call on one ``[heads, rows, keys]`` block (median of ``repeat``)."""
    probs = causal_block(heads, rows, keys, device)
    positions = torch.arange(keys - rows, keys)  # on the host, as the capture passes them
    kwargs = dict(sink_tokens=params.sink_tokens, local_window=params.local_window)
    for _ in range(2):
        row_metrics(probs, positions, **kwargs)
    _sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        row_metrics(probs, positions, **kwargs)
        _sync(device)
        times.append(time.perf_counter() - t0)
    seconds = sorted(times)[len(times) // 2]
    return {
        "heads": heads,
        "rows": rows,
        "keys": keys,
        "ms_per_call": 1000 * seconds,
        "us_per_head_row": 1e6 * seconds / (heads * rows),
        "probs_gb_per_s": heads * rows * keys * 4 / seconds / 1e9,
    }


def time_sequence(tokens: int, device: torch.device, params: SummaryParams, repeat: int) -> dict[str, float]:
    """Seconds for one layer's metrics of one ``tokens``-long sequence, probabilities vs fused."""
    from worker.capture.attention_math import causal_block_probs
    from worker.capture.metrics import HeadMetricsAccumulator

    heads, kv_heads, dim = 32, 8, 128
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device="cpu").manual_seed(tokens)
    q = (torch.randn(1, heads, tokens, dim, generator=gen) * 1.5).to(device, dtype)
    k = torch.randn(1, kv_heads, tokens, dim, generator=gen).to(device, dtype)
    scaling = dim**-0.5

    def probabilities() -> None:
        acc = HeadMetricsAccumulator(1, 1, heads, params)
        for r0 in range(0, tokens, SUB_BLOCK_ROWS):
            r1 = min(tokens, r0 + SUB_BLOCK_ROWS)
            probs = causal_block_probs(q[0, :, r0:r1], k[0, :, :r1], scaling=scaling, q_start=r0, k_start=0)
            acc.observe(0, 0, probs, torch.arange(r0, r1))
        acc.result()

    def fused() -> None:
        acc = HeadMetricsAccumulator(1, 1, heads, params)
        acc.observe_qk(0, q, k, [0], [0], query_offset=0, key_offset=0, scaling=scaling)
        acc.result()

    out: dict[str, float] = {"tokens": tokens}
    for name, run in (("probabilities", probabilities), ("fused", fused)):
        for _ in range(2):
            run()
        _sync(device)
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            run()
            _sync(device)
            times.append(time.perf_counter() - t0)
        out[f"{name}_ms"] = 1000 * sorted(times)[len(times) // 2]
    return out


def parse_shape(text: str) -> tuple[int, int, int]:
    """``H×n×K`` (or ``HxnxK``) → ``(H, n, K)``."""
    parts = text.lower().replace("×", "x").split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"a shape is HxNxK, e.g. 32x128x2048; got {text!r}")
    heads, rows, keys = (int(p) for p in parts)
    if rows > keys:
        raise argparse.ArgumentTypeError(f"rows ({rows}) cannot exceed keys ({keys}): causal rows")
    return heads, rows, keys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.metrics",
        description="row_metrics (the per-head summary metrics) alone, on capture-shaped blocks.",
    )
    p.add_argument(
        "--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    p.add_argument(
        "--shapes",
        type=lambda s: [parse_shape(x) for x in s.split(",")],
        default=[(9, SUB_BLOCK_ROWS, 256), (9, SUB_BLOCK_ROWS, 1024), (32, SUB_BLOCK_ROWS, 2048)],
        help="HxNxK blocks, comma-separated (default: SmolLM2's 9 heads at 256 and 1,024 keys, "
        "the 8B shape's 32 heads at 2,048 keys; 128 rows each)",
    )
    p.add_argument(
        "--sequences",
        type=lambda s: [int(x) for x in s.split(",")],
        help="instead: whole sequences of these lengths from q/k (8B shape), probabilities vs fused kernels",
    )
    p.add_argument("--repeat", type=int, default=10, help="timed calls per shape (median reported)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default torch's)")
    p.add_argument("--profile", action="store_true", help="torch.profiler operator table of the last shape")
    p.add_argument("--json", type=Path, help="write the figures as JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: CUDA is not available here", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    params = SummaryParams()
    if args.sequences:
        print(
            f"one layer, one sequence, 32 heads / 8 kv heads / D 128 on {device}, torch {torch.__version__}"
        )
        print("| tokens | probabilities ms | fused ms | speed-up |")
        print("|---|---|---|---|")
        rows = []
        for tokens in args.sequences:
            f = time_sequence(tokens, device, params, args.repeat)
            rows.append(f)
            ratio = f["probabilities_ms"] / f["fused_ms"]
            print(
                f"| {tokens} | {f['probabilities_ms']:.2f} | {f['fused_ms']:.2f} | {ratio:.1f}× |", flush=True
            )
        if args.json is not None:
            args.json.write_text(json.dumps({"device": str(device), "sequences": rows}, indent=2) + "\n")
        return 0
    print(f"row_metrics on {device}, torch {torch.__version__} ({torch.get_num_threads()} threads)")
    print("| H × n × K | ms / call | µs / (head, row) | probs GB/s |")
    print("|---|---|---|---|")
    figures = []
    for heads, rows, keys in args.shapes:
        f = time_shape(heads, rows, keys, device, params, args.repeat)
        figures.append(f)
        cells = (f"{heads} × {rows} × {keys}", f"{f['ms_per_call']:.2f}", f"{f['us_per_head_row']:.2f}")
        print(f"| {' | '.join(cells)} | {f['probs_gb_per_s']:.2f} |", flush=True)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        heads, rows, keys = args.shapes[-1]
        probs = causal_block(heads, rows, keys, device)
        positions = torch.arange(keys - rows, keys)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(args.repeat):
                row_metrics(
                    probs, positions, sink_tokens=params.sink_tokens, local_window=params.local_window
                )
            _sync(device)
        sort_by = "cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort_by, row_limit=20))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": str(device), "shapes": figures}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
