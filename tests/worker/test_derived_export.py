"""``capture.attention="derived"`` through the worker: the same job exported materialised and derived
gives the same attention (fp32 storage: to float rounding; fp16: within fp16 tolerance) on every
supported architecture, for a padded batch of two prompts, prompt and generated rows; the bundle
holds q and k (v only with qkv) and no T×T array; the worker computes no probability."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from storage.bundle import Bundle, open_bundle
from storage.bundle.attention import derived_source
from storage.jobs.spec import JobSpec

from .export_helpers import export, loaded
from .oracle import eager_attentions
from .tiny_models import build_tiny_model

PROMPTS = ["The quick brown fox jumps over the lazy dog, twice.", "Hi there"]
NEW_TOKENS = 5
ATOL_FP16 = 2e-3  # fp16 storage of the materialised probabilities (half-ulp at 1.0 is 4.9e-4)
ATOL_FP32 = 1e-5  # same q/k, same fp32 formula: only summation order differs


def _spec(folder: str, capture: dict[str, Any], **storage: Any) -> dict[str, Any]:
    return {
        "model": {"id": folder},
        "prompts": PROMPTS,
        "generation": {"max_new_tokens": NEW_TOKENS, "stop_at_eos": False},
        "capture": capture,
        "storage": {"chunk_rows": 16, **storage},
    }


def _pair(
    folder: str, tmp_path: Path, capture: dict[str, Any] | None = None, **storage: Any
) -> tuple[Any, Any]:
    """The same job exported materialised and derived."""
    extra = capture or {}
    materialised, _, _ = export(_spec(folder, {"attention": True, **extra}, **storage), tmp_path / "m.zarr")
    derived, _, _ = export(_spec(folder, {"attention": "derived", **extra}, **storage), tmp_path / "d.zarr")
    return materialised, derived


def _assert_same_attention(materialised: Any, derived: Any, atol: float) -> None:
    assert derived.attrs["capture"]["derived_attention"] is True
    assert derived["tokens"].values.tolist() == materialised["tokens"].values.tolist()
    lengths = derived["length"].values
    prompt_lengths = derived["prompt_length"].values
    assert (lengths == prompt_lengths + NEW_TOKENS).all() and lengths[0] > lengths[1]  # padded batch
    expected = materialised["attention"].values.astype(np.float32)
    got = derived["attention"].values
    assert got.shape == expected.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=atol, rtol=0)
    for b, length in enumerate(lengths):
        assert not got[:, b, :, length:].any() and not got[:, b, :, :, length:].any()
        np.testing.assert_allclose(got[:, b, :, :length].sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3", "gpt2"])
def test_derived_equals_materialised(kind: str, tiny_model_dir: Any, tmp_path: Path) -> None:
    folder = str(tiny_model_dir(kind))
    materialised, derived = _pair(folder, tmp_path, attention_dtype="float32")
    _assert_same_attention(materialised, derived, ATOL_FP32)
    stored = set(derived.data_vars) - {"attention"}
    assert {"q", "k", "attention_scaling", "attention_window"} <= stored and "v" not in stored
    assert not (tmp_path / "d.zarr" / "attention").exists()  # no T×T array on disk
    if kind == "mistral":  # sliding window 6, prompts far longer
        assert derived["attention_window"].values.tolist() == [6, 6]
        assert int(derived["length"][0]) > 20
    else:
        assert derived["attention_window"].values.tolist() == [0, 0]
    # fp16 materialised storage against the same derived bundle
    fp16, _, _ = export(_spec(folder, {"attention": True}), tmp_path / "m16.zarr")
    _assert_same_attention(fp16, derived, ATOL_FP16)


def test_derived_matches_eager_oracle(tiny_model_dir: Any, tmp_path: Path) -> None:
    """Independent of the materialised export: HF eager attention on each unpadded sequence."""
    folder = str(tiny_model_dir("mistral"))
    ds, _, _ = export(
        _spec(folder, {"attention": "derived", "layers": [1], "heads": [0, 3]}), tmp_path / "d.zarr"
    )
    for b in range(2):
        length = int(ds["length"][b])
        reference = eager_attentions(folder, ds["tokens"][b, :length].values.tolist())[1][[0, 3]]
        got = ds["attention"].isel(layer=0, batch=b, query=slice(0, length), key=slice(0, length)).values
        np.testing.assert_allclose(got, reference, atol=ATOL_FP32, rtol=0)


def test_mixed_windows_and_per_layer_scaling(tmp_path: Path) -> None:
    """qwen2 with sliding layers from max_window_layers on; GPT-2 scaling by inverse layer index."""
    qwen = build_tiny_model(
        "qwen2",
        tmp_path / "qwen2-mixed",
        overrides={"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 1},
    )
    materialised, derived = _pair(str(qwen), tmp_path / "qwen", attention_dtype="float32")
    assert derived["attention_window"].values.tolist() == [0, 5]
    _assert_same_attention(materialised, derived, ATOL_FP32)
    gpt2 = build_tiny_model(
        "gpt2", tmp_path / "gpt2-inv", overrides={"scale_attn_by_inverse_layer_idx": True}
    )
    materialised, derived = _pair(str(gpt2), tmp_path / "gpt2", attention_dtype="float32")
    scaling = derived["attention_scaling"].values
    np.testing.assert_allclose(scaling, [8**-0.5, 8**-0.5 / 2])
    _assert_same_attention(materialised, derived, ATOL_FP32)


def test_fp16_qk_storage_and_qkv(tiny_model_dir: Any, tmp_path: Path) -> None:
    folder = str(tiny_model_dir("llama"))
    materialised, derived = _pair(
        folder, tmp_path, {"qkv": True, "heads": [1, 2]}, attention_dtype="float32", qkv_dtype="float16"
    )
    assert derived["q"].dtype == np.float16 and "v" in derived.data_vars
    assert derived["head"].values.tolist() == [1, 2] and derived["kv_head"].values.tolist() == [0, 1]
    np.testing.assert_array_equal(derived["v"].values, materialised["v"].values)
    _assert_same_attention(materialised, derived, ATOL_FP16)


def test_selected_rows_read_back_from_derived(tiny_model_dir: Any, tmp_path: Path) -> None:
    """Row selection is refused with derived attention (every row can be read); a materialised
    bundle with selected rows reads the same values as the derived one at those positions."""
    folder = str(tiny_model_dir("qwen3"))
    with pytest.raises(ValueError, match=r"drop capture\.query_rows"):
        JobSpec.model_validate(_spec(folder, {"attention": "derived", "query_rows": [[0, 4]]}))
    selected = {"attention": True, "query_rows": [[3, 9]], "generation_steps": [1]}
    export(_spec(folder, selected, attention_dtype="float32"), tmp_path / "m.zarr")
    export(_spec(folder, {"attention": "derived"}), tmp_path / "d.zarr")
    m, d = Bundle(tmp_path / "m.zarr"), Bundle(tmp_path / "d.zarr")
    for b in range(2):
        step1 = int(m.dataset["prompt_length"][b]) + 1
        rows = [p for p in [3, 4, 8, step1] if p < int(m.dataset["length"][b])]
        for layer in (0, 1):
            np.testing.assert_allclose(
                d.attention(layer, 2, query=rows, batch=b),
                m.attention(layer, 2, query=rows, batch=b),
                atol=ATOL_FP32,
            )


def test_lazy_access_computes_only_the_selection(tiny_model_dir: Any, tmp_path: Path) -> None:
    folder = str(tiny_model_dir("llama"))
    export(_spec(folder, {"attention": "derived"}), tmp_path / "d.zarr")
    ds = open_bundle(tmp_path / "d.zarr")
    source = derived_source(ds)
    assert source is not None
    block = ds["attention"].isel(layer=1, batch=0, head=3, query=slice(20, 30)).values
    assert block.shape == (10, ds.sizes["position"])
    assert source.stats == {"rows": 10, "blocks": 1, "calls": 1}
    assert not block[:, 30:].any() and np.allclose(block.sum(-1), 1.0, atol=1e-5)


def test_worker_computes_no_probabilities_and_one_logit_row(
    tiny_model_dir: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Derived mode without summary: the session never computes attention probabilities, and the
    prefill asks the model for the last position's logits only (no full-vocabulary logits per row)."""
    from worker.capture.session import ExportSession

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("attention probabilities computed in derived mode")

    monkeypatch.setattr(ExportSession, "_capture_attention", refuse)
    spec = JobSpec.model_validate(_spec(str(tiny_model_dir("llama")), {"attention": "derived"}))
    head_rows: list[int] = []
    lm = loaded(spec)
    handle = lm.model.lm_head.register_forward_hook(lambda m, args, out: head_rows.append(args[0].shape[1]))
    try:
        export(spec, tmp_path / "d.zarr")
    finally:
        handle.remove()
    assert head_rows and set(head_rows) == {1}
    est_layout = {a for a in open_bundle(tmp_path / "d.zarr").variables}
    assert "attention" in est_layout  # computed lazily on read


def test_estimate_counts_derived_bytes(tiny_model_dir: Any, tmp_path: Path) -> None:
    from storage.jobs.estimate import count_prompt_tokens, estimate
    from storage.models.facts import read_facts, tokenizer_file
    from tests.e2e.test_estimate_accuracy import on_disk

    folder = str(tiny_model_dir("llama"))
    spec = JobSpec.model_validate(
        {
            **_spec(folder, {"attention": "derived"}),
            "prompts": [PROMPTS[0] * 3, PROMPTS[1]],
            "generation": {"max_new_tokens": 32, "stop_at_eos": False},
            "storage": {"chunk_rows": 32},
        }
    )
    facts = read_facts(spec.model)
    assert facts is not None
    lengths, exact = count_prompt_tokens(spec, tokenizer_file(spec.model))
    est = estimate(spec, facts, lengths, exact)
    export(spec, tmp_path / "d.zarr")
    disk = on_disk(tmp_path / "d.zarr")
    arrays = {a.name: a for a in est.arrays}
    assert set(arrays) == set(disk) - {"*total*"}
    assert "attention" not in arrays and "v" not in arrays
    for name, entry in arrays.items():
        assert entry.chunks_written == disk[name][1], name
    assert est.expected_stored_bytes == pytest.approx(disk["*total*"][0], rel=0.25)
    assert any("attention derived" in a for a in est.assumptions)


def test_full_preset_with_derived_attention(tiny_model_dir: Any, tmp_path: Path) -> None:
    """``detail=full`` with derived attention: summary metrics (which do compute probabilities),
    q/k/v, hidden states, alternatives and compressed KV all still work."""
    from storage.bundle import open_summary

    spec = _spec(
        str(tiny_model_dir("llama")),
        {"detail": "full", "attention": "derived", "summary_params": {"local_window": 8, "sink_tokens": 2}},
    )
    spec["prompts"] = ["x" * 200, "hello"]
    spec["kv_compression"] = [{"method": "kivi", "bits": 2}]
    ds, _, _ = export(spec, tmp_path / "d.zarr")
    assert {"q", "k", "v", "hidden_states", "topk_ids", "attention_scaling"} <= set(ds.data_vars)
    assert open_summary(tmp_path / "d.zarr")["entropy"].shape == (2, 2, 4)
    row = ds["attention"].isel(layer=0, batch=0, head=0, query=int(ds["length"][0]) - 1).values
    assert abs(float(row.sum()) - 1.0) < 1e-5
