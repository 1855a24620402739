"""A KV method is one registry entry on each side: the numpy facts (``storage.kvquant.registry``) and
the torch codec (``worker.kvexport``), under the same name. Both registries list the same methods,
and a toy method registered in this test alone is validated, exported, scored, read back, checked
by greedy decoding and estimated without any other file knowing its name."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from storage.jobs.spec import JobSpec
from storage.kvquant.reader import KVBundle
from storage.kvquant.registry import KVMethodDef, StoredCell, method_names, register, unregister
from storage.kvquant.spec import KVMethodSpec
from worker.kvexport import codec_names, register_codec, unregister_codec

from .export_helpers import export

# head_dim 32, 2 query heads per kv head (as tests/worker/test_kv_export.py)
KV_MODEL = {
    "hidden_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
}


def test_numpy_and_torch_registries_list_the_same_methods() -> None:
    assert codec_names() == method_names() == ("turboquant_prod", "turboquant_mse", "kivi")


# --- a toy method: K and V kept as float16 --------------------------------------------------------


def _fp16_bits(method: KVMethodSpec, dim: int, lengths: Sequence[int]) -> float:
    return float(sum(lengths) * 2 * 16 * dim)


def _fp16_dequantize(method: KVMethodSpec, cell: StoredCell) -> tuple[np.ndarray, np.ndarray]:
    n = cell.length
    return cell.k["fp16"][:, :n].astype(np.float32), cell.v["fp16"][:, :n].astype(np.float32)


class _Fp16Stream:
    def __init__(self) -> None:
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k.append(k.half())
        self.v.append(v.half())
        return torch.cat(self.k, dim=1).float(), torch.cat(self.v, dim=1).float()

    def codes(self) -> dict[str, np.ndarray]:
        return {
            "k_fp16": torch.cat(self.k, dim=1).cpu().numpy(),
            "v_fp16": torch.cat(self.v, dim=1).cpu().numpy(),
        }


class _Fp16Codec:
    def __init__(self, method: KVMethodSpec, dim: int, device: torch.device) -> None:
        pass

    def stream(self) -> _Fp16Stream:
        return _Fp16Stream()

    def round_trip(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return k.half().float(), v.half().float()


@pytest.fixture
def fp16_method() -> Iterator[str]:
    register(
        KVMethodDef(
            name="fp16",
            label="fp16 passthrough",
            bits=(16,),
            job_bits=_fp16_bits,
            dequantize=_fp16_dequantize,
        )
    )
    register_codec("fp16", _Fp16Codec)
    try:
        yield "fp16"
    finally:
        unregister("fp16")
        unregister_codec("fp16")


def test_a_method_registered_here_is_validated_from_its_entry(fp16_method: str) -> None:
    from pydantic import ValidationError

    assert KVMethodSpec(method="fp16", bits=16).name == "fp16_16"
    assert "fp16" in KVMethodSpec.model_json_schema()["properties"]["method"]["enum"]
    with pytest.raises(ValidationError, match="Input should be 16"):
        KVMethodSpec.model_validate({"method": "fp16", "bits": 3})
    with pytest.raises(ValidationError, match="group and residual are KIVI parameters; fp16"):
        KVMethodSpec.model_validate({"method": "fp16", "bits": 16, "residual": 4})
    with pytest.raises(ValueError, match="already registered"):
        register_codec("fp16", _Fp16Codec)


def test_a_method_registered_here_exports_reads_and_estimates(fp16_method: str, tmp_path: Path) -> None:
    from storage.jobs.estimate import estimate

    from .tiny_models import build_tiny_model

    folder = build_tiny_model("llama", tmp_path / "m", overrides=KV_MODEL)
    spec = {
        "model": {"id": str(folder)},
        "prompts": ["abc def " * 20, "hello"],
        "generation": {"max_new_tokens": 4, "stop_at_eos": False},
        "capture": {"qkv": True, "attention": False},
        "kv_compression": [
            {"method": "fp16", "bits": 16, "check_generation": True},
            {"method": "kivi", "bits": 2},
        ],
    }
    ds, _, lm = export(spec, tmp_path / "b.zarr")
    entry = ds.attrs["kv_compression"]["fp16_16"]
    assert entry["theoretical_ratio"] == 1.0 and entry["stored_bytes"] > 0
    assert entry["fidelity"]["score_cosine"] > 0.999 and entry["fidelity"]["kl"] < 1e-4
    assert entry["generation_check"]["tokens_compared"] == 8

    reader = KVBundle(tmp_path / "b.zarr")
    assert reader.methods == ["fp16_16", "kivi_2"]
    for b in range(2):
        length = int(ds["length"][b])
        k, v = ds["k"][1, b, :, :length].values, ds["v"][1, b, :, :length].values
        k_hat, v_hat = reader.dequantize("fp16_16", 1, b)
        np.testing.assert_array_equal(k_hat, k.astype(np.float16).astype(np.float32))
        np.testing.assert_array_equal(v_hat, v.astype(np.float16).astype(np.float32))
        q = ds["q"][1, b, ::2, :length].values
        np.testing.assert_allclose(reader.scores("fp16_16", 1, b, q), q @ np.swapaxes(k_hat, -1, -2))

    prompt_lengths = [int(p) for p in ds["prompt_length"].values]
    groups = {
        a.name: a for a in estimate(JobSpec.model_validate(spec), lm.facts, prompt_lengths, True).arrays
    }
    fp16 = groups["kv/fp16_16"]
    cells = int(ds.sizes["layer"]) * int(ds.sizes["kv_head"])
    lengths = [p + 4 for p in prompt_lengths]
    assert fp16.raw_bytes == fp16.expected_stored_bytes == 2 * 2 * 32 * sum(lengths) * cells
    assert groups["kv/kivi_2"].expected_stored_bytes < fp16.expected_stored_bytes
