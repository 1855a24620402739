"""Fidelity of compressed KV for SmolLM2-135M-Instruct on a long prompt, every method at 2/3/4 bits.

    .venv/bin/python scripts/kv_fidelity_table.py [--out docs/kv-fidelity-table.md]

One in-process export (the worker's own code path, CPU or CUDA) of the first 4,500 characters of
``scripts/data/long-prompt.txt`` (a frozen copy of this repository's README.md, about 1,400 tokens)
with all nine methods, then prints a markdown table of the aggregated fidelity report measured on
the model's real queries and the stored vs theoretical compression ratios.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from storage.jobs.spec import SMOLLM2_GGUF  # noqa: E402
from tests.worker.export_helpers import export  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="also write the table to this file")
    args = parser.parse_args()
    methods = [
        {"method": m, "bits": b} for m in ("turboquant_prod", "turboquant_mse", "kivi") for b in (2, 3, 4)
    ]
    prompt = (REPO / "scripts" / "data" / "long-prompt.txt").read_text(encoding="utf-8")[:4500]
    spec = {
        "model": {"id": SMOLLM2_GGUF},
        "prompts": [prompt],
        "generation": {"max_new_tokens": 4},
        # k and v kept too, in fp16 with the job's codec: the baseline of the "same codec" ratio
        "capture": {"attention": False, "alternatives": True, "qkv": True},
        "storage": {"qkv_dtype": "float16"},
        "kv_compression": methods,
    }
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "b.zarr"
        ds, _, lm = export(spec, bundle, device="cuda" if _cuda() else "cpu")
        report = ds.attrs["kv_compression"]
        tokens = int(ds["length"][0])
        codec = ds.attrs["capture"]["compression"]
        kv_fp16_stored = _stored_bytes(bundle / "k") + _stored_bytes(bundle / "v")
    lines = [
        f"SmolLM2-135M-Instruct, {tokens} tokens, 30 layers × 3 kv heads, head_dim 64, {lm.device.type}, "
        f"chunk codec {codec}; means over every (query head, query row) of every layer. Stored ratio: "
        "raw fp16 K/V bytes over the method's stored bytes; same codec: the bytes of fp16 K/V stored "
        f"with the {codec} codec of this job over the method's stored bytes; theoretical: fp16 bits over "
        "the method's bits per vector",
        "",
        "| method | bits | score cosine | top-1 % | top-5 % | KL (nats) | TV | output rel. L2 "
        "| stored ratio | same codec | theoretical |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method in methods:
        entry = report[f"{method['method']}_{method['bits']}"]
        f = entry["fidelity"]
        lines.append(
            f"| {method['method']} | {method['bits']} | {f['score_cosine']:.4f} | {f['top1']:.1f} "
            f"| {f['top5']:.1f} "
            f"| {f['kl']:.4f} | {f['tv']:.4f} | {f['output_rel_l2']:.4f} | {entry['stored_ratio']:.2f}× "
            f"| {kv_fp16_stored / entry['stored_bytes']:.2f}× | {entry['theoretical_ratio']:.2f}× |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")


def _stored_bytes(array: Path) -> int:
    """Bytes of an array's chunk files in a local bundle (its metadata excluded)."""
    return sum(p.stat().st_size for p in array.rglob("*") if p.is_file() and p.name != "zarr.json")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
