"""A derived-attention job through the real service: submit → poll → zip → attention computed from
q and k on read (xarray and ``Bundle.attention``), and ``qkvault show`` summarises it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from qkvault.show import describe_bundle
from storage.bundle import Bundle
from storage.bundle.format import FORMAT_VERSION

from .conftest import Stack

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_derived_job_round_trip(local_stack: Stack, tiny_llama: str, tmp_path: Path) -> None:
    spec = {
        "model": {"id": tiny_llama},
        "prompts": ["The quick brown fox", "Hi"],
        "generation": {"max_new_tokens": 4, "stop_at_eos": False},
        "capture": {"attention": "derived", "layers": [1]},
        "storage": {"chunk_rows": 16},
    }
    job = local_stack.client.submit(spec)
    done = local_stack.client.wait(job.id, poll_s=0.2, timeout_s=180, progress=False)
    assert done.state == "succeeded"
    zip_path = local_stack.client.download(job.id, tmp_path / "bundle.zip", progress=False)
    bundle = Bundle(zip_path)
    ds = bundle.dataset
    assert bundle.derived and ds.attrs["format_version"] == FORMAT_VERSION
    assert {"q", "k", "attention_scaling", "attention_window"} <= set(ds.variables)
    assert "v" not in ds.variables
    lengths = ds["length"].values.tolist()
    assert lengths == [len("The quick brown fox") + 1 + 4, 3 + 4]
    rows = ds["attention"].isel(layer=0, batch=1, query=slice(0, lengths[1])).values
    np.testing.assert_allclose(rows.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(bundle.attention(1, 2, batch=1, query=slice(0, lengths[1])), rows[2])
    text = describe_bundle(ds, layer=1, head=0)
    assert "attention of the last captured token, layer 1, head 0" in text and "row sums to 1.000" in text
