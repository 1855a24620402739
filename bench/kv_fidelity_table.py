"""Fidelity of compressed KV for SmolLM2-135M-Instruct on a long prompt, every method at 2/3/4 bits.

    .venv/bin/python -m bench.kv_fidelity_table [--out docs/kv-fidelity-table.md]

One in-process export (the worker's own code path, CPU or CUDA) of the first 4,500 characters of
``scripts/data/long-prompt.txt`` (a frozen copy of this repository's README.md, about 1,500 tokens)
with all nine methods, then a markdown table of the aggregated fidelity report measured on the
model's real queries and the stored vs theoretical compression ratios. Each method's rows depend on
that method only, so :func:`measure` can regenerate some rows alone (tests/test_kv_fidelity_doc.py
regenerates every row and compares it with docs/kv-fidelity-table.md).
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PROMPT_FILE = REPO / "scripts" / "data" / "long-prompt.txt"
PROMPT_CHARS = 4500
METHODS: tuple[tuple[str, int], ...] = tuple(
    (method, bits) for method in ("turboquant_prod", "turboquant_mse", "kivi") for bits in (2, 3, 4)
)
COLUMNS = (
    "| method | bits | score cosine | top-1 % | top-5 % | KL (nats) | TV | output rel. L2 "
    "| stored ratio | same codec | theoretical |"
)
RULE = "|---" * 11 + "|"


@dataclass(frozen=True)
class KVTable:
    """The measured table: its header line (model, tokens, device, codec) and one row per method."""

    header: str
    rows: tuple[str, ...]

    def markdown(self) -> str:
        return "\n".join(
            [self.header, "", COLUMNS, "|---|---|---|---|---|---|---|---|---|---|---|", *self.rows]
        )


def measure(methods: Sequence[tuple[str, int]] = METHODS, device: str | None = None) -> KVTable:
    """Export the prompt once with ``methods`` ((name, bits) pairs) and tabulate their reports."""
    import torch

    from storage.bundle import open_bundle
    from storage.bundle.writer import BundleWriter
    from storage.jobs.spec import JobSpec
    from storage.models.spec import SMOLLM2_GGUF
    from worker.export import Exporter
    from worker.models import checkout_model_cache_dir, load_model

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    spec = JobSpec.model_validate(
        {
            "model": {"id": SMOLLM2_GGUF},
            "prompts": [PROMPT_FILE.read_text(encoding="utf-8")[:PROMPT_CHARS]],
            "generation": {"max_new_tokens": 4},
            # k and v kept too, in fp16 with the job's codec: the baseline of the "same codec" ratio
            "capture": {"attention": False, "alternatives": True, "qkv": True},
            "storage": {"qkv_dtype": "float16"},
            "kv_compression": [{"method": m, "bits": b} for m, b in methods],
        }
    )
    lm = load_model(spec.model, device=torch.device(device), cache_dir=checkout_model_cache_dir())
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "b.zarr"
        Exporter(spec, lm, BundleWriter(str(bundle)), _NoHooks()).run("kv-fidelity-table")
        ds = open_bundle(str(bundle))
        report: dict[str, Any] = ds.attrs["kv_compression"]
        tokens = int(ds["length"][0])
        codec = ds.attrs["capture"]["compression"]
        kv_fp16_stored = _stored_bytes(bundle / "k") + _stored_bytes(bundle / "v")
    header = (
        f"SmolLM2-135M-Instruct, {tokens} tokens, 30 layers × 3 kv heads, head_dim 64, {lm.device.type}, "
        f"chunk codec {codec}; means over every (query head, query row) of every layer. Stored ratio: "
        "raw fp16 K/V bytes over the method's stored bytes; same codec: the bytes of fp16 K/V stored "
        f"with the {codec} codec of this job over the method's stored bytes; theoretical: fp16 bits over "
        "the method's bits per vector"
    )
    rows = tuple(_row(method, bits, report[f"{method}_{bits}"], kv_fp16_stored) for method, bits in methods)
    return KVTable(header, rows)


def _row(method: str, bits: int, entry: dict[str, Any], kv_fp16_stored: int) -> str:
    f = entry["fidelity"]
    return (
        f"| {method} | {bits} | {f['score_cosine']:.4f} | {f['top1']:.1f} | {f['top5']:.1f} "
        f"| {f['kl']:.4f} | {f['tv']:.4f} | {f['output_rel_l2']:.4f} | {entry['stored_ratio']:.2f}× "
        f"| {kv_fp16_stored / entry['stored_bytes']:.2f}× | {entry['theoretical_ratio']:.2f}× |"
    )


class _NoHooks:
    """ExportHooks of a run outside the job queue."""

    def phase(self, name: str, units_total: int | None = None) -> None: ...
    def unit_done(self) -> None: ...
    def check_cancelled(self) -> None: ...


def _stored_bytes(array: Path) -> int:
    """Bytes of an array's chunk files in a local bundle (its metadata excluded)."""
    return sum(p.stat().st_size for p in array.rglob("*") if p.is_file() and p.name != "zarr.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", default=None, help="also write the table to this file")
    args = parser.parse_args()
    table = measure().markdown()
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
