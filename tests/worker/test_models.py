"""Model loading: GGUF dequantised once and cached, one model per process reused across jobs,
unsupported architectures refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from storage.errors import ModelLoadError, UnsupportedModel
from storage.models.facts import resolve_source
from storage.models.spec import ModelSpec
from worker.models import ModelCache, _dequantised_gguf

from .conftest import model_cache_dir


@pytest.mark.slow
def test_gguf_is_dequantised_once(smollm2_id: str) -> None:
    source = resolve_source(ModelSpec(id=smollm2_id))
    first = _dequantised_gguf(source, model_cache_dir())
    weights = first / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert _dequantised_gguf(source, model_cache_dir()) == first
    assert weights.stat().st_mtime_ns == stamp, "the cache was rewritten"


def test_model_cache_reuses_the_loaded_model(tiny_model_dir: Any, tmp_path: Path) -> None:
    cache = ModelCache(tmp_path, "cpu")
    spec = ModelSpec(id=str(tiny_model_dir("llama")))
    first = cache.get(spec)
    assert cache.get(spec) is first and first.load_s == 0.0
    other = cache.get(ModelSpec(id=str(tiny_model_dir("gpt2"))))
    assert other is not first and other.facts.model_type == "gpt2"


def test_refused_types_give_the_matrix_reason(tmp_path: Path) -> None:
    """A type the matrix refused is refused on load with the matrix's reason (not a generic one)."""
    from storage.models.architectures import architecture
    from worker.archmatrix.check import build_model_folder

    build_model_folder("mamba", tmp_path / "mamba")
    entry = architecture("mamba")
    assert entry is not None and not entry.admitted
    with pytest.raises(UnsupportedModel, match="no attention layers") as caught:
        ModelCache(tmp_path, "cpu").get(ModelSpec(id=str(tmp_path / "mamba")))
    assert entry.reason in str(caught.value)


def test_hybrid_model_facts_come_from_its_attention_calls(tmp_path: Path) -> None:
    """A hybrid model's attention layers, heads and sizes are what its attention calls showed."""
    from worker.archmatrix.check import build_model_folder

    config = build_model_folder("qwen3_next", tmp_path / "m")
    lm = ModelCache(tmp_path, "cpu").get(ModelSpec(id=str(tmp_path / "m")))
    kinds = list(config.layer_types)
    assert lm.facts.attention_layers == tuple(i for i, k in enumerate(kinds) if k == "full_attention")
    assert 0 < len(lm.facts.attention_layers) < lm.facts.num_layers
    assert lm.info["attention_implementation"] == "sdpa"


def test_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        ModelCache(tmp_path, "cpu").get(ModelSpec(id=str(tmp_path / "nope")))


def test_hub_model_missing_from_the_cache_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hub id the worker's Hugging Face cache lacks, downloads off: the error names the cache and
    how to add the model, not transformers' "check your internet connection"."""
    import torch
    from huggingface_hub import constants

    from worker.models import load_model

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # huggingface_hub read the env at import
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    with pytest.raises(ModelLoadError) as caught:
        load_model(ModelSpec(id="someorg/not-cached-model"), device=torch.device("cpu"), cache_dir=tmp_path)

    message = str(caught.value)
    assert "someorg/not-cached-model" in message and "not in this worker's Hugging Face cache" in message
    assert str(cache) in message and "hf download someorg/not-cached-model" in message
    assert "internet connection" not in message.lower()
