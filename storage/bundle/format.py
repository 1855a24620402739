"""Names, dimensions and version of the bundle arrays (see docs/bundle-format.md)."""

from __future__ import annotations

FORMAT_NAME = "qkvault.bundle"
FORMAT_VERSION = "1.2"
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
}
TOP_HEAD_ATTENTION_DIMS = ("layer", "batch", "top_head", "query", "key")
# Arrays streamed row block by row block (the rest are written whole at the end).
ROW_ARRAYS = ("attention", "q", "k", "v", "hidden_states")
SUMMARY_GROUP = "summary"
