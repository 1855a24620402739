"""The printed table and the JSON figures of one benchmark run."""

from __future__ import annotations

import os
import platform
from typing import Any

import torch

from bench.modes import ModeResult

GIB = 1024**3


def _gib(value: int | bool | None) -> str:
    return "-" if value is None or isinstance(value, bool) else f"{value / GIB:.2f} GiB"


def _peak(result: ModeResult, cuda: bool) -> str:
    memory = result.memory
    if not memory:
        return "-"
    if cuda:
        return f"{_gib(memory.get('gpu_peak_bytes'))} GPU"
    exact = "" if memory.get("host_peak_exact") else " (approx.)"
    return f"{_gib(memory.get('host_peak_bytes'))} RSS{exact}"


def ratios(results: dict[str, ModeResult]) -> dict[str, float | None]:
    naive, qkvault, raw = results.get("naive"), results.get("qkvault"), results.get("raw write")

    def ratio(a: ModeResult | None, b: ModeResult | None) -> float | None:
        if a is None or b is None or a.status != "ok" or b.status != "ok" or not a.wall_s or not b.wall_s:
            return None
        return a.wall_s / b.wall_s

    return {"speedup_vs_naive": ratio(naive, qkvault), "qkvault_over_raw_write": ratio(qkvault, raw)}


def table(results: dict[str, ModeResult], cuda: bool) -> str:
    header = ("mode", "status", "wall s", "logical GB/s", "stored bytes", "peak memory (Δ)")
    rows = [header]
    for name in ("naive", "qkvault", "raw write"):
        r = results.get(name)
        if r is None:
            continue
        gbps = r.logical_gbps
        rows.append(
            (
                name,
                r.status,
                "-" if r.wall_s is None else f"{r.wall_s:.2f}",
                "-" if gbps is None else f"{gbps:.3f}",
                "-" if r.stored_bytes is None else f"{r.stored_bytes:,}",
                _peak(r, cuda),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = []
    for i, row in enumerate(rows):
        cells = [
            cell.ljust(w) if j in (0, 1) else cell.rjust(w)
            for j, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    figures = ratios(results)
    speedup, over_raw = figures["speedup_vs_naive"], figures["qkvault_over_raw_write"]
    lines.append("")
    lines.append(f"qkvault speedup vs naive: {'-' if speedup is None else f'{speedup:.2f}x'}")
    lines.append(f"qkvault time / raw write time: {'-' if over_raw is None else f'{over_raw:.2f}x'}")
    qkvault = results.get("qkvault")
    if qkvault is not None and "full_attention_bytes" in qkvault.extra:
        full = int(qkvault.extra["full_attention_bytes"])
        stored_bytes = qkvault.stored_bytes
        stored = "not stored" if stored_bytes is None else f"{stored_bytes:,} bytes stored"
        smaller = f" ({full / stored_bytes:,.0f}x smaller)" if stored_bytes else ""
        lines.append(
            f"derived attention (q/k): {stored}{smaller}; full attention would need {full:,} bytes "
            "(lower triangle, fp16)"
        )
    for name in ("sdpa forward", "naive", "qkvault", "raw write"):
        r = results.get(name)
        if r is None:
            continue
        parts = ", ".join(f"{k} {v:.2f} s" for k, v in r.parts_s.items())
        if name == "sdpa forward":
            wall = "-" if r.wall_s is None else f"{r.wall_s:.2f} s"
            parts = f"{wall}, peak {_peak(r, cuda)} (plain inference, reference)"
        note = f" [{r.note}]" if r.note else ""
        if parts or note:
            lines.append(f"  {name}: {parts}{note}")
        if "writer_stats" in r.extra:
            lines.append("  " + writer_line(r))
    return "\n".join(lines)


def writer_line(r: ModeResult) -> str:
    """The chunk pipeline's work: thread-seconds per pool against the mode's wall time."""
    stats, threads = r.extra["writer_stats"], r.extra["writer_threads"]
    ratio = stats["input_bytes"] / stats["stored_bytes"] if stats["stored_bytes"] else 0.0
    return (
        f"qkvault writer: {stats['chunks']:,} chunks, {stats['input_bytes'] / 1e9:.2f} GB in, "
        f"{stats['stored_bytes'] / 1e9:.2f} GB out (ratio {ratio:.2f}); thread-seconds: encode "
        f"{stats['encode_s']:.2f} + checksum {stats['checksum_s']:.2f} on {threads['encode']} threads "
        f"(waiting for input {stats['ready_wait_s']:.2f}), store {stats['store_s']:.2f} on "
        f"{threads['store']} threads"
    )


def machine() -> dict[str, Any]:
    import transformers
    import zarr

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "zarr": zarr.__version__,
    }
    try:
        with open("/proc/cpuinfo") as fh:
            names = [line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")]
        info["cpu"] = names[0] if names else platform.processor()
        with open("/proc/meminfo") as fh:
            info["memory_total_bytes"] = int(fh.readline().split()[1]) * 1024
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def figures(results: dict[str, ModeResult], run: dict[str, Any]) -> dict[str, Any]:
    modes = {}
    for name, r in results.items():
        modes[name] = {
            "status": r.status,
            "wall_s": r.wall_s,
            "logical_bytes": r.logical_bytes,
            "logical_gbps": r.logical_gbps,
            "stored_bytes": r.stored_bytes,
            "parts_s": r.parts_s,
            **r.memory,
            "note": r.note,
            **{k: v for k, v in r.extra.items() if k != "profile_top"},
        }
    return {"run": run, "machine": machine(), "modes": modes, **ratios(results)}
