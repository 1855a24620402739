"""The benchmark's model and prompt: SmolLM2 (the GGUF, dequantised once) or a random-weight
Llama-shaped model built directly on the device, and a prompt of an exact token count.

Both become a :class:`worker.models.LoadedModel` with the capture attention set, and a
:class:`storage.jobs.spec.JobSpec` whose prompt the worker's own ``tokenize`` turns into exactly
``tokens`` ids — the naive baseline runs on those same ids.
"""

from __future__ import annotations

import random
import string
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from storage.jobs.spec import JobSpec
from storage.models.spec import SMOLLM2_GGUF
from worker.models import LoadedModel

# Random-weight Llama shapes (bf16). Token ids come from the byte-level test tokenizer
# (256 bytes + <bos> 256 + <eos> 257), so any vocabulary of at least 258 works.
RANDOM_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=258,
    ),
    # ≈ Llama-3.2-1B
    "llama-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        tie_word_embeddings=True,
    ),
    # ≈ Llama-3-8B
    "llama-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=128256,
    ),
}
MODELS = ("smollm2", *RANDOM_CONFIGS)
BOS, EOS = 256, 257

# Common English words; those that are one token (with and without a leading space) build the
# SmolLM2 prompt, so the token count is exact.
_WORD_TEXT = (
    "the of and to in is was for that on with as by at from his her they this which have had not but "
    "were are be or an their one all would there been has when who will more no if out so said what "
    "up its about into than them can only other new some could time these two may then do first any "
    "my now such like our over man me even most made after also did many before must through back "
    "years where much your way well down should because each just those people how too little state "
    "good very make world still own see men work long get here between both life being under never "
    "day same another know while last might us great old year off come since against go came right "
    "used take three small house water light music river city night story table window garden"
)


@dataclass
class BenchModel:
    name: str
    lm: LoadedModel
    spec: JobSpec
    prompt_ids: list[int]  # exactly what the Exporter tokenizes the prompt into

    @property
    def layers(self) -> list[int]:
        return list(self.spec.capture.layers or range(self.lm.facts.num_layers))

    @property
    def derived(self) -> bool:
        return self.spec.capture.attention == "derived"

    @property
    def positions(self) -> int:
        return len(self.prompt_ids) + self.spec.generation.max_new_tokens


def _random_model(name: str, device: torch.device, dtype: torch.dtype, positions: int) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM

    from storage.models.facts import ModelSource, check_supported, facts_from_config
    from worker.archmatrix.tokenizer import byte_tokenizer
    from worker.capture.hook import install_capture

    started = time.perf_counter()
    config = AutoConfig.for_model(
        "llama",
        **RANDOM_CONFIGS[name],
        max_position_embeddings=max(positions, 256),
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=EOS,
    )
    facts = facts_from_config(config.to_dict())
    check_supported(facts)
    torch.manual_seed(0)
    with device:  # weights are created on the device: nothing is saved or copied
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.eval()
    attention = install_capture(model)
    return LoadedModel(
        model=model,
        tokenizer=byte_tokenizer(),
        facts=facts,
        source=ModelSource("random", f"bench:{name}"),
        device=device,
        dtype=dtype,
        source_dtype=str(dtype).replace("torch.", ""),
        load_s=time.perf_counter() - started,
        info={
            "architecture": type(model).__name__,
            "attention_implementation": attention,
            "config": {"max_position_embeddings": positions},
        },
    )


def _count(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=True)["input_ids"])


def word_prompt(tokenizer: Any, tokens: int, seed: int = 0) -> str:
    """Random common words that tokenize (with the tokenizer's special tokens) to exactly ``tokens``."""
    single = [
        w
        for w in _WORD_TEXT.split()
        if len(tokenizer(w, add_special_tokens=False)["input_ids"]) == 1
        and len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) == 1
    ]
    words_needed = tokens - _count(tokenizer, "")
    if len(single) < 20 or words_needed < 1:
        raise ValueError(f"cannot build a {tokens}-token word prompt for this tokenizer")
    rng = random.Random(seed)
    text = " ".join(rng.choice(single) for _ in range(words_needed))
    if _count(tokenizer, text) != tokens:
        raise ValueError(f"word prompt tokenizes to {_count(tokenizer, text)} tokens, not {tokens}")
    return text


def byte_prompt(tokens: int, seed: int = 0) -> str:
    """Random printable ASCII: with the byte tokenizer, <bos> + one token per character."""
    rng = random.Random(seed)
    alphabet = string.ascii_letters + string.digits + string.punctuation + " "
    return "".join(rng.choice(alphabet) for _ in range(tokens - 1))


def prepare(
    name: str,
    *,
    device: torch.device,
    dtype: str,
    tokens: int,
    new_tokens: int,
    layers: list[int] | None,
    qkv: bool,
    chunk_rows: int,
    model_cache: Path | None,
    compression: str = "lz4",
    attention: str = "materialised",
) -> BenchModel:
    """Load or build the model and the job spec of the qkvault run (attention fp16, q/k/v fp16).
    ``attention="derived"``: the bundle stores q and k instead of the T×T probabilities."""
    from storage.models.spec import ModelSpec
    from worker.generation import tokenize
    from worker.models import load_model

    if name == "smollm2":
        if model_cache is None:
            from worker.models import checkout_model_cache_dir

            model_cache = checkout_model_cache_dir()
        model = {"id": SMOLLM2_GGUF, "dtype": dtype}
        lm = load_model(ModelSpec.model_validate(model), device=device, cache_dir=model_cache)
        prompt = word_prompt(lm.tokenizer, tokens)
    elif name in RANDOM_CONFIGS:
        torch_dtype = torch.bfloat16 if dtype == "auto" else getattr(torch, dtype)
        lm = _random_model(name, device, torch_dtype, tokens + new_tokens)
        model = {"id": f"bench:{name}", "dtype": str(torch_dtype).replace("torch.", "")}
        prompt = byte_prompt(tokens)
    else:
        raise ValueError(f"unknown model {name!r}: one of {', '.join(MODELS)}")
    spec = JobSpec.model_validate(
        {
            "model": model,
            "prompts": [prompt],
            "generation": {"max_new_tokens": new_tokens, "stop_at_eos": False},
            "capture": {
                "attention": "derived" if attention == "derived" else True,
                "qkv": qkv,
                "layers": layers,
            },
            "storage": {
                "attention_dtype": "float16",
                "qkv_dtype": "float16",
                "chunk_rows": chunk_rows,
                "compression": compression,
            },
        }
    )
    prompt_ids = tokenize(spec, lm.tokenizer, lm.facts.max_positions)[0]
    if len(prompt_ids) != tokens:
        raise ValueError(f"the prompt tokenizes to {len(prompt_ids)} tokens, not {tokens}")
    return BenchModel(name, lm, spec, prompt_ids)
