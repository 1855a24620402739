"""The hard cases through the worker's real export: learned sinks (gpt-oss), hybrid models
(attention in some layers only), latent attention (v's head size differs), and the bundle's own
certificate — including a job that fails it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from storage.errors import CertificationFailed
from worker.archmatrix.check import build_model_folder

from .export_helpers import export

PROMPTS = ["The quick brown fox jumps over the lazy dog.", "Hi there"]


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("hard-models")

    def build(model_type: str) -> str:
        folder = root / model_type
        if not folder.exists():
            build_model_folder(model_type, folder)
        return str(folder)

    return build


def _spec(folder: str, **capture: Any) -> dict[str, Any]:
    return {
        "model": {"id": folder},
        "prompts": PROMPTS,
        "generation": {"max_new_tokens": 3, "stop_at_eos": False},
        "capture": {"attention": True, **capture},
        "storage": {"chunk_rows": 16, "attention_dtype": "float32"},
    }


def test_sink_mass_explains_rows_that_sum_below_one(model_folder: Any, tmp_path: Path) -> None:
    ds, _, lm = export(_spec(model_folder("gpt_oss")), tmp_path / "b.zarr")
    assert lm.facts.sinks and lm.info["attention_implementation"] == "eager"
    sink = ds["attention_sink"]
    assert sink.dims == ("layer", "batch", "head", "query")
    for b in range(2):
        length = int(ds["length"][b])
        rows = ds["attention"][:, b, :, :length, :length].values.sum(-1)
        mass = sink[:, b, :, :length].values
        assert mass.min() > 0.01  # the sinks take real mass: rows sum well below 1
        np.testing.assert_allclose(rows + mass, 1.0, atol=1e-5)
        assert not sink[:, b, :, length:].values.any()


def test_derived_attention_with_sinks_equals_the_export(model_folder: Any, tmp_path: Path) -> None:
    folder = model_folder("gpt_oss")
    full, _, _ = export(_spec(folder), tmp_path / "full.zarr")
    derived, _, _ = export(_spec(folder, attention="derived"), tmp_path / "derived.zarr")
    assert derived["attention_sinks"].dims == ("layer", "head")
    for b in range(2):
        length = int(full["length"][b])
        np.testing.assert_allclose(
            derived["attention"][:, b, :, :length, :length].values,
            full["attention"][:, b, :, :length, :length].values,
            atol=1e-6,
        )


def test_every_bundle_carries_its_certificate(model_folder: Any, tmp_path: Path) -> None:
    ds, _, lm = export(_spec(model_folder("gpt_oss")), tmp_path / "b.zarr")
    certificate = ds.attrs["certificate"]
    assert sorted(int(k) for k in certificate["layers"]) == list(lm.facts.exported_layers)
    for layer in certificate["layers"].values():
        assert layer["calls"] >= 2 * 2  # prefill and first decode call, both sequences
    assert certificate["max"]["output_error"] <= certificate["tolerance"]["output_relative"]
    assert certificate["max"]["row_sum_error"] <= certificate["tolerance"]["row_sum"]
    assert certificate["max"]["masked_mass"] == 0
    provenance = certificate["provenance"]
    assert provenance["attention_implementation"] == "eager" and provenance["weights_dtype"] == "float32"
    assert provenance["transformers"] and provenance["torch"]


def test_a_capture_that_drops_the_sinks_fails_its_certificate(
    model_folder: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the exported probabilities ignored the sinks, the job fails instead of shipping them."""
    import worker.capture.session as session

    real = session.attention_probs
    monkeypatch.setattr(session, "attention_probs", lambda *a, **k: real(*a, **{**k, "sinks": None}))
    with pytest.raises(CertificationFailed, match=r"layer 0: .*rows sum to 1") as caught:
        export(_spec(model_folder("gpt_oss")), tmp_path / "b.zarr")
    assert caught.value.detail["layer"] == 0


def test_hybrid_model_exports_its_attention_layers_under_their_real_indices(
    model_folder: Any, tmp_path: Path
) -> None:
    ds, _, lm = export(_spec(model_folder("jamba"), qkv=True), tmp_path / "b.zarr")
    attention_layers = lm.facts.attention_layers
    assert attention_layers is not None and len(attention_layers) < lm.facts.num_layers
    assert ds["layer"].values.tolist() == list(attention_layers)
    assert ds.attrs["model"]["attention_layers"] == list(attention_layers)


def test_latent_attention_v_has_its_own_head_size(model_folder: Any, tmp_path: Path) -> None:
    ds, _, lm = export(_spec(model_folder("deepseek_v3"), qkv=True), tmp_path / "b.zarr")
    assert lm.facts.v_head_dim is not None and lm.facts.v_head_dim != lm.facts.head_dim
    assert ds["q"].dims[-1] == "head_dim" and ds.sizes["head_dim"] == lm.facts.head_dim
    assert ds["v"].dims[-1] == "v_head_dim" and ds.sizes["v_head_dim"] == lm.facts.v_head_dim


def test_alibi_falcon_is_exact_and_its_derived_export_fails_its_certificate(tmp_path: Path) -> None:
    """ALiBi reaches the attention as a bias in the model's additive mask: the export (which uses
    the mask) is exact; derived attention stores no bias, so its job fails its certificate rather
    than ship q/k that would reconstruct attention without ALiBi."""
    from worker.archmatrix.check import check_type

    result = check_type("falcon", overrides={"alibi": True})
    assert result.status == "exact", result.reason
    assert result.max_error is not None and result.max_error < 1e-5
    assert not result.derived
    assert "CertificationFailed" in result.derived_reason and "attention=true" in result.derived_reason
