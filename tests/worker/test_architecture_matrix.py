"""The architecture matrix: the admitted set is exactly the set that passes, the checked-in file
and docs/architectures.md agree with a fresh run, and the hard cases are exact."""

from __future__ import annotations

from pathlib import Path

import pytest

from storage.models.architectures import MATRIX_FILE, admitted_types, matrix
from worker.archmatrix.check import EXACT_ATOL, TypeResult
from worker.archmatrix.report import COMMAND, markdown
from worker.archmatrix.run import causal_lm_types, run_matrix

REPO = Path(__file__).resolve().parents[2]
# the hard cases issue 10 names: soft-capping, sinks, ALiBi, partial/interleaved rotary, latent
# attention, mixture of experts, hybrids (attention in some layers only), chunked attention
HARD_CASES = [
    "gemma2",
    "gpt_oss",
    "falcon",
    "stablelm",
    "gptj",
    "deepseek_v2",
    "deepseek_v3",
    "mixtral",
    "qwen2_moe",
    "jamba",
    "bamba",
    "falcon_h1",
    "qwen3_next",
    "nemotron_h",
    "llama4_text",
    "gemma3_text",
    "gpt_neox",
    "codegen",
    "phi",
]


def _file_results() -> list[TypeResult]:
    return [TypeResult(model_type=t, **entry) for t, entry in matrix()["types"].items()]


def test_the_matrix_covers_every_causal_lm_type_of_the_installed_transformers() -> None:
    import transformers

    data = matrix()
    assert data["transformers"] == transformers.__version__, f"transformers was upgraded: run `{COMMAND}`"
    assert sorted(data["types"]) == causal_lm_types()
    assert len(admitted_types()) >= 100


def test_hard_cases_are_admitted_exact_and_derived() -> None:
    types = matrix()["types"]
    refused = {t: types[t]["reason"] for t in HARD_CASES if types[t]["status"] != "exact"}
    assert not refused
    assert all(types[t]["max_error"] <= EXACT_ATOL for t in HARD_CASES)
    not_derived = {t: types[t]["derived_reason"] for t in HARD_CASES if not types[t]["derived"]}
    assert not not_derived


def test_every_refusal_names_its_reason() -> None:
    for model_type, entry in matrix()["types"].items():
        if entry["status"] != "exact":
            assert len(entry["reason"]) > 30, model_type


def test_the_docs_table_is_generated_from_the_file() -> None:
    expected = markdown(_file_results(), matrix()["transformers"])
    assert (REPO / "docs" / "architectures.md").read_text(encoding="utf-8") == expected, f"run `{COMMAND}`"


@pytest.mark.slow
@pytest.mark.parametrize("shard", [0, 1, 2])
def test_a_fresh_run_agrees_with_the_checked_in_verdicts(shard: int) -> None:
    """Every causal-LM type through the real export, on 2 processes, in three thirds of 30-40 s
    on 2 cores (no test over a minute; a type that does not finish is cut at 30 s)."""
    results = run_matrix(causal_lm_types()[shard::3], jobs=2)
    stored = matrix()["types"]
    differ = {
        r.model_type: (stored[r.model_type]["status"], r.status, r.reason)
        for r in results
        if (r.status, r.derived) != (stored[r.model_type]["status"], stored[r.model_type]["derived"])
    }
    assert not differ, f"the matrix changed: run `{COMMAND}` and review {MATRIX_FILE.name}"
    for r in results:
        if r.status == "exact":
            assert r.logits_error is not None and r.logits_error <= EXACT_ATOL, r.model_type
            assert r.max_error is not None and r.max_error <= EXACT_ATOL, r.model_type
