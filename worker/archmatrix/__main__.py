"""``python -m worker.archmatrix``: run the architecture matrix and write its verdicts.

    python -m worker.archmatrix                 # every causal-LM type; writes its verdicts to
                                                # storage/models/architectures.json and docs/architectures.md
    python -m worker.archmatrix llama gemma2    # only these types (printed, nothing written)
    python -m worker.archmatrix --jobs 2        # processes (default: the CPU count, at most 4)
    python -m worker.archmatrix --cuda-bf16 gemma2 gpt_oss   # the CUDA oracle: bf16 weights on the GPU

Run it after upgrading transformers: the admitted set is exactly the set that passes.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from worker.archmatrix.check import CPU_FP32, CUDA_BF16
from worker.archmatrix.report import write_outputs
from worker.archmatrix.run import causal_lm_types, run_matrix


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.archmatrix", description=__doc__.split("\n")[0])
    parser.add_argument("types", nargs="*", help="model types to check (default: every causal-LM type)")
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--docs", type=Path, default=Path("docs/architectures.md"))
    parser.add_argument(
        "--cuda-bf16",
        action="store_true",
        help="run on the GPU with bf16 weights (tolerance 2e-2, q/k/v not compared); writes nothing",
    )
    args = parser.parse_args(argv)
    types = args.types or causal_lm_types()
    precision = CUDA_BF16 if args.cuda_bf16 else CPU_FP32
    results = run_matrix(types, jobs=args.jobs, progress=sys.stderr, precision=precision)
    exact = sum(r.status == "exact" for r in results)
    print(f"{exact} of {len(results)} model types exact", file=sys.stderr)
    if not args.types and not args.cuda_bf16:
        write_outputs(results, docs=args.docs)
        print(f"wrote storage/models/architectures.json and {args.docs}", file=sys.stderr)
    else:
        for r in results:
            print(
                f"{r.model_type:20s} {r.status:8s} max error {r.max_error or 0:.1e} "
                f"derived={r.derived} ({r.derived_error or 0:.1e}) {r.seconds:5.1f}s "
                f"{r.reason}{r.derived_reason}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
