"""Tokenization, batching and token choice for the export's own generation loop."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from storage.errors import InvalidJobSpec, UnsupportedModel
from storage.jobs.spec import GenerationSpec, JobSpec
from worker.capture.hostcopy import device_ints


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T0] left-padded
    attention_mask: torch.Tensor  # [B, T0]
    pads: list[int]
    pad_id: int


def tokenize_texts(spec: JobSpec, tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of ``texts`` with the job's chat-template and special-token options."""
    add_special = spec.add_special_tokens
    if spec.chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise InvalidJobSpec("chat_template=true but this model's tokenizer has no chat template")
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
            )
            for p in texts
        ]
        add_special = False
    return [list(tokenizer(p, add_special_tokens=add_special)["input_ids"]) for p in texts]


def tokenize(spec: JobSpec, tokenizer: Any, max_positions: int | None) -> list[list[int]]:
    """The job's prompts tokenized, each checked to fit the model with its new tokens."""
    ids = tokenize_texts(spec, tokenizer, list(spec.inline_prompts))
    new = spec.generation.max_new_tokens
    for i, prompt_ids in enumerate(ids):
        if not prompt_ids:
            raise InvalidJobSpec(f"prompt {i} tokenizes to no tokens")
        if max_positions is not None and len(prompt_ids) + new > max_positions:
            raise InvalidJobSpec(
                f"prompt {i} is too long for the model: {len(prompt_ids)} tokens + max_new_tokens {new} = "
                f"{len(prompt_ids) + new} positions, but the model supports {max_positions}; "
                "shorten the prompt or lower max_new_tokens"
            )
    return ids


def make_batch(sequences: list[list[int]], pad_id: int, device: torch.device) -> Batch:
    """Left-pad ``sequences`` into one batch, queued to ``device`` behind the work already there
    (a bulk job's next micro-batch does not wait for the previous one's passes)."""
    width = max(len(p) for p in sequences)
    pads = [width - len(p) for p in sequences]
    input_ids = device_ints([[pad_id] * pad + p for pad, p in zip(pads, sequences, strict=True)], device)
    mask = device_ints([[0] * pad + [1] * len(p) for pad, p in zip(pads, sequences, strict=True)], device)
    return Batch(input_ids, mask, pads, pad_id)


def choose_next(logits: torch.Tensor, gen: GenerationSpec, generator: torch.Generator | None) -> torch.Tensor:
    """``logits [B, V]`` → next token ids ``[B]`` (greedy, or sampled with temperature/top-k/top-p)."""
    logits = logits.float()
    if not gen.do_sample:
        return logits.argmax(dim=-1)
    logits = logits / gen.temperature
    if gen.top_k is not None and gen.top_k < logits.shape[-1]:
        kth = torch.topk(logits, gen.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if gen.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cumulative - torch.softmax(sorted_logits, dim=-1) > gen.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def eos_ids(tokenizer: Any, model: Any) -> set[int]:
    ids: set[int] = set()
    for value in (
        getattr(tokenizer, "eos_token_id", None),
        getattr(getattr(model, "generation_config", None), "eos_token_id", None),
    ):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def cache_argument(model: Any) -> str:
    """The forward argument that takes the KV cache: ``cache`` since transformers deprecated
    ``past_key_values`` (removed in 5.40), ``past_key_values`` before (5.17)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def returned_cache(output: Any) -> Any:
    """The KV cache a forward pass returned (``cache``, or ``past_key_values`` before 5.2x; ``None``
    without ``use_cache``), read by the field the output declares: asking a newer output for the
    old name logs transformers' deprecation warning."""
    fields = getattr(output, "__dataclass_fields__", None) or output
    return output.get("cache" if "cache" in fields else "past_key_values")


def decoder_layers(model: Any) -> list[torch.nn.Module]:
    """The model's decoder blocks in order, found by structure rather than by name
    (``model.layers``, ``transformer.h``, ``gpt_neox.layers``...): the outermost ``ModuleList``
    whose block ``i`` holds a module with ``layer_idx == i`` (the attention of that layer)."""
    found: list[tuple[str, torch.nn.ModuleList]] = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.ModuleList) or not len(module):
            continue
        indexed = [{getattr(m, "layer_idx", None) for m in block.modules()} - {None} for block in module]
        if all(i in ids for i, ids in enumerate(indexed)):
            found.append((name, module))
    if not found:
        raise UnsupportedModel(
            f"cannot find the decoder layers of {type(model).__name__} for hidden-state capture"
        )
    name, blocks = min(found, key=lambda item: item[0].count("."))
    return list(blocks)


@contextlib.contextmanager
def hidden_state_hooks(
    model: Any, layers: tuple[int, ...], sink: Callable[[int, torch.Tensor], None]
) -> Iterator[None]:
    """Call ``sink(layer, hidden [B, T, hidden])`` with each selected block's output (the residual stream)."""
    if not layers:
        yield
        return
    blocks = decoder_layers(model)
    handles = []
    for layer in layers:

        def hook(_module: Any, _args: Any, output: Any, layer: int = layer) -> None:
            sink(layer, output[0] if isinstance(output, tuple) else output)

        handles.append(blocks[layer].register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class LayersDone(Exception):
    """Raised by :func:`stop_after_layer` as the first layer past the last one wanted begins."""


@contextlib.contextmanager
def stop_after_layer(model: Any, last: int | None) -> Iterator[None]:
    """End forward passes once decoder layer ``last`` ran (every hook of it included): the next
    layer's pre-hook raises :class:`LayersDone`. A layer shard (worker/layershards.py) needs the
    layers up to its own only. ``last`` None, or the model's last layer: nothing stops."""
    blocks = decoder_layers(model) if last is not None else []
    if last is None or last + 1 >= len(blocks):
        yield
        return

    def stop(_module: Any, _args: Any) -> None:
        raise LayersDone(f"decoder layer {last} was the last one needed")

    handle = blocks[last + 1].register_forward_pre_hook(stop)
    try:
        yield
    finally:
        handle.remove()
