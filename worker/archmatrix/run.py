"""Running the matrix over many types in a few processes, with progress."""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import TextIO

from worker.archmatrix.check import CPU_FP32, Precision, TypeResult, check_type


def causal_lm_types() -> list[str]:
    """Every model type in transformers' causal-LM registry."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _init_worker() -> None:
    import logging

    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(1)  # one type per process: processes, not threads, use the cores
    logging.disable(logging.WARNING)
    hf_logging.disable_progress_bar()


def run_matrix(
    types: Sequence[str],
    *,
    jobs: int = 1,
    progress: TextIO | None = None,
    precision: Precision = CPU_FP32,
) -> list[TypeResult]:
    """Check every type of ``types`` (in ``jobs`` processes, at ``precision``); results in the
    order of ``types``."""
    started = time.perf_counter()
    results: dict[str, TypeResult] = {}
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=max(1, jobs), mp_context=context, initializer=_init_worker) as pool:
        futures = {pool.submit(check_type, t, None, precision): t for t in types}
        for future in as_completed(futures):
            result = future.result()
            results[result.model_type] = result
            if progress is not None:
                elapsed = time.perf_counter() - started
                print(
                    f"[{len(results)}/{len(types)} {elapsed:5.0f}s] {result.model_type:28s} "
                    f"{result.status:8s} {result.seconds:5.1f}s {result.reason[:90]}",
                    file=progress,
                    flush=True,
                )
    return [results[t] for t in types]
