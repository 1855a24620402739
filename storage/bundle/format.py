"""Names, dimensions and version of the bundle arrays (see docs/bundle-format.md)."""

from __future__ import annotations

from typing import Literal

FORMAT_NAME = "qkvault.bundle"
FORMAT_VERSION = "1.4"
SUPPORTED_MAJOR = 1

DIMS: dict[str, tuple[str, ...]] = {
    "tokens": ("batch", "position"),
    "length": ("batch",),
    "prompt_length": ("batch",),
    "layer": ("layer",),
    "head": ("head",),
    "kv_head": ("kv_head",),
    "attention": ("layer", "batch", "head", "query", "key"),
    "query_position": ("batch", "query"),
    # models with learned attention sinks (1.4): each stored row's probability mass on the sink
    "attention_sink": ("layer", "batch", "head", "query"),
    "top_head_index": ("layer", "top_head"),
    "q": ("layer", "batch", "head", "position", "head_dim"),
    "k": ("layer", "batch", "kv_head", "position", "head_dim"),
    "v": ("layer", "batch", "kv_head", "position", "head_dim"),
    "hidden_states": ("layer", "batch", "position", "hidden"),
    "topk_ids": ("batch", "position", "rank"),
    "topk_logprobs": ("batch", "position", "rank"),
    "topk_tokens": ("batch", "position", "rank"),
    "logprob": ("batch", "position"),
    # attention="derived" (1.2): what reconstruction needs besides q and k
    "attention_scaling": ("layer",),
    "attention_window": ("layer",),
    # attention="derived" (1.4): chunked attention's chunk size per layer (0: none)
    "attention_chunk": ("layer",),
    # attention="derived" of a model with learned sinks (1.4): each exported head's sink logit
    "attention_sinks": ("layer", "head"),
}
TOP_HEAD_ATTENTION_DIMS = ("layer", "batch", "top_head", "query", "key")
TOP_HEAD_SINK_DIMS = ("layer", "batch", "top_head", "query")
# v of latent attention (1.4), whose head size differs from q/k's
V_HEAD_DIMS = ("layer", "batch", "kv_head", "position", "v_head_dim")
# Arrays streamed row block by row block (the rest are written whole at the end).
ROW_ARRAYS = ("attention", "attention_sink", "q", "k", "v", "hidden_states")
SUMMARY_GROUP = "summary"

# Chunk codecs of numeric arrays (Blosc, level 1), chosen per job by ``storage.compression``:
# name -> (Blosc compressor, shuffle). "lz4" (default since 1.3): 2.5-3x faster to encode and to
# decode than "zstd", 3% larger on trained attention, 5-10% on q/k/v, 1% smaller on near-uniform
# attention
# (docs/benchmarks.md, "Chunk codec"). "zstd" is the codec of formats 1.0-1.2.
Compression = Literal["lz4", "zstd"]
COMPRESSIONS: dict[str, tuple[Literal["lz4", "zstd"], Literal["bitshuffle", "shuffle"]]] = {
    "lz4": ("lz4", "bitshuffle"),
    "zstd": ("zstd", "shuffle"),
}
DEFAULT_COMPRESSION: Compression = "lz4"
DEFAULT_CHUNK_ROWS = 512
