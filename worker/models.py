"""Model loading: hub ids, local folders and GGUF files; one loaded model per worker process.

GGUF weights are dequantised once and cached as safetensors under ``model_cache_dir``; later loads
read the cache. The capture attention is set as the model's attention implementation. A job's
placement (:mod:`storage.models.placement`: ``device_map`` over the worker's GPUs with accelerate,
bitsandbytes ``quantization``) is checked against this process first
(:func:`worker.capabilities.check_placement_here`), then passed to ``from_pretrained``; the model's
inputs go to the device of its input embeddings (``LoadedModel.device``), and every layer's tensors
stay on that layer's device. A job's
absolute path outside the worker's model roots (``QKVAULT_MODEL_ROOTS``) fails before anything is
read, with the API's message (:mod:`storage.models.roots`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from storage.errors import ModelLoadError, UnsupportedModel
from storage.models.facts import (
    ModelFacts,
    ModelSource,
    check_supported_type,
    gguf_cache_folder,
    hub_cache_path,
    hub_model_cached,
    hub_not_cached_message,
    resolve_source,
)
from storage.models.placement import is_placed, placement_dict
from storage.models.roots import check_model_roots
from storage.models.spec import ModelSpec
from worker.capabilities import check_placement_here
from worker.capture.hook import install_capture
from worker.capture.probe import facts_with_probe, probe_attention
from worker.generation import decoder_layers

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: Any  # transformers PreTrainedModel
    tokenizer: Any
    facts: ModelFacts
    source: ModelSource
    device: torch.device  # where the inputs go: the input embeddings' device (the one device, unplaced)
    dtype: torch.dtype  # compute dtype (the dtype of the weights, unless quantised)
    source_dtype: str
    folder: str = ""  # where the weights were read from (the safetensors cache for GGUF)
    load_s: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)
    # how the weights were placed and stored (bundle attrs "model.placement"; :func:`placement_facts`)
    placement: dict[str, Any] = field(default_factory=dict)


def pick_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def pick_dtype(spec_dtype: str, device: torch.device) -> torch.dtype:
    if spec_dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[spec_dtype]


def _dequantised_gguf(source: ModelSource, cache_root: Path) -> Path:
    """Folder with the GGUF's weights as safetensors (+ tokenizer), made once and reused."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(source.path) / (source.file or "")
    if not gguf_path.is_file():
        raise ModelLoadError(f"GGUF file {gguf_path} does not exist on this worker")
    target = gguf_cache_folder(cache_root, gguf_path)
    if (target / "config.json").is_file():
        return target
    log.info("dequantising %s once into %s", gguf_path, target)
    tmp = target.with_name(target.name + f".partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(source.path, gguf_file=source.file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source.path, gguf_file=source.file)
    # The weights are now plain fp32 tensors; drop the GGUF "quantizer" so they save as safetensors.
    model.hf_quantizer = None  # type: ignore[assignment]
    model.is_quantized = False  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(target)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def checkout_model_cache_dir() -> Path:
    """The dequantised-GGUF cache that the test suite, the worker processes it starts and ``bench``
    share in a source checkout: ``$QKVAULT_TEST_MODEL_CACHE``, else ``<checkout>/.qkvault/test-models``
    (created if missing). A deployed worker uses ``WorkerSettings.model_cache_dir`` instead."""
    from storage.settings import DEFAULT_HOME
    from worker.settings import WorkerSettings

    default = Path(__file__).resolve().parents[1] / DEFAULT_HOME / "test-models"
    path = WorkerSettings().test_model_cache or default
    path.mkdir(parents=True, exist_ok=True)
    return path


def _hub_offline() -> bool:
    """Hugging Face's own switch (HF_HUB_OFFLINE=1, or TRANSFORMERS_OFFLINE=1): hub models come
    from the cache only. Without it a hub id missing from the cache is downloaded."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _config_error(spec: ModelSpec, source: ModelSource, exc: Exception) -> ModelLoadError:
    """The model's config could not be read. A hub id missing from the cache says so, with the
    cache and how to add the model (not transformers' "check your internet connection")."""
    if source.kind == "hub" and not hub_model_cached(source):
        cache = hub_cache_path()
        if _hub_offline():
            why = "downloads are off on this worker (HF_HUB_OFFLINE=1)"
        else:
            first_line = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            why = f"downloading it failed ({type(exc).__name__}: {first_line})"
        where = f"this worker's Hugging Face cache ({cache}) and {why}"
        return ModelLoadError(
            hub_not_cached_message(spec.id, source, cache, where), detail={"hub_cache": cache}
        )
    return ModelLoadError(
        f"cannot load model {spec.id!r}: {exc}. Hub models must be in the worker's Hugging Face cache "
        "(or downloads allowed); local paths must exist on the worker."
    )


def load_model(
    spec: ModelSpec,
    *,
    device: torch.device,
    cache_dir: Path,
    admitted_only: bool = True,
    roots: Sequence[Path] | None = None,
) -> LoadedModel:
    """Load ``spec`` with the capture wrapped around its own attention implementation; its facts
    are read off one tiny forward pass (:mod:`worker.capture.probe`). Raises ModelLoadError /
    UnsupportedModel (a model type the architecture matrix did not admit, unless
    ``admitted_only=False``: the matrix itself) / InvalidJobSpec (a path outside ``roots``, the
    model roots, before anything is read; ``None``: not checked, for models the caller made)."""
    import time

    started = time.perf_counter()
    source = resolve_source(spec, roots)

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {}
    if source.kind == "gguf":
        folder: str = str(_dequantised_gguf(source, cache_dir))
    elif source.kind == "folder":
        folder = source.path
        if not Path(folder, "config.json").is_file():
            raise ModelLoadError(f"model folder {folder} has no config.json on this worker")
        kwargs["local_files_only"] = True
    else:
        folder = source.path
        kwargs["revision"] = source.revision
        if source.file:
            kwargs["gguf_file"] = source.file
        if _hub_offline():
            kwargs["local_files_only"] = True  # HF_HUB_OFFLINE=1: the cache only, no Hub round trips
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False, **kwargs)
    except (OSError, ValueError) as exc:
        raise _config_error(spec, source, exc) from exc
    if admitted_only:
        check_supported_type(config.model_type)
    dtype = pick_dtype(spec.dtype, device)
    source_dtype = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32")
    placed = placement_kwargs(spec, device, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, trust_remote_code=False, **placed, **kwargs
        )
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False, **kwargs)
    except (OSError, ValueError, ImportError, RuntimeError) as exc:
        raise ModelLoadError(f"cannot load model {spec.id!r}{_placed_as(spec)}: {exc}") from exc
    if placed:  # already where accelerate / bitsandbytes put it
        model.eval()
        device = input_device(model)
    else:
        model.eval().to(device)
    attention = install_capture(model)
    probe = probe_attention(model, device)
    facts = facts_with_probe(config_facts(config, model), probe)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        facts=facts,
        source=source,
        device=device,
        dtype=dtype,
        source_dtype=source_dtype.replace("torch.", ""),
        folder=folder,
        load_s=time.perf_counter() - started,
        info={
            "architecture": type(model).__name__,
            "attention_implementation": attention,
            "attention_kwargs_unmodelled": sorted({k for a in probe.layers.values() for k in a.unknown}),
            "config": _config_facts(config),
        },
        placement=placement_facts(spec, model, dtype),
    )


def placement_kwargs(spec: ModelSpec, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """``from_pretrained`` arguments of the spec's placement: ``device_map`` (+ ``max_memory``) and
    ``quantization_config``; none for an unplaced model (loaded, then moved to ``device``)."""
    if not is_placed(spec):
        return {}
    out: dict[str, Any] = {}
    quant = spec.quantization
    if quant is not None:
        from transformers import BitsAndBytesConfig

        if quant.bits == 4:
            compute = _DTYPES[quant.compute_dtype] if quant.compute_dtype else dtype
            out["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_compute_dtype=compute,
                bnb_4bit_quant_type=quant.resolved_quant_type,
                bnb_4bit_use_double_quant=quant.double_quant,
            )
        else:
            out["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    if spec.device_map is None:  # quantised on the worker's one device
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        out["device_map"] = {"": str(device)}
        return out
    out["device_map"] = spec.device_map
    max_memory = _max_memory(spec, device)
    if max_memory is not None:
        out["max_memory"] = max_memory
    return out


def _max_memory(spec: ModelSpec, device: torch.device) -> dict[int | str, int | str] | None:
    """accelerate's ``max_memory``: the spec's caps, or the first ``num_gpus`` GPUs (+ host memory)
    at accelerate's own defaults; ``None``: every device the process sees, at the defaults."""
    if spec.max_memory_gib:
        return {(k if k == "cpu" else int(k)): f"{gib}GiB" for k, gib in spec.max_memory_gib.items()}
    if spec.num_gpus is None or device.type != "cuda":
        return None
    from accelerate.utils import get_max_memory

    return {k: v for k, v in get_max_memory().items() if not isinstance(k, int) or k < spec.num_gpus}


def input_device(model: Any) -> torch.device:
    """Where a placed model's token ids go: the device of its input embeddings."""
    return torch.device(model.get_input_embeddings().weight.device)


def _placed_as(spec: ModelSpec) -> str:
    if not is_placed(spec):
        return ""
    parts = [f"device_map={spec.device_map!r}"] if spec.device_map else []
    if spec.quantization is not None:
        parts.append(f"{spec.quantization.bits}-bit {spec.quantization.method}")
    return f" ({', '.join(parts)})"


def placement_facts(spec: ModelSpec, model: Any, dtype: torch.dtype) -> dict[str, Any]:
    """How the loaded weights sit: the spec's placement, the device of each decoder layer, the
    devices used, and the weights' storage (dtype, or the quantisation with its library version)."""
    try:
        layers = decoder_layers(model)
        layer_devices = [_module_device(layer) for layer in layers]
    except UnsupportedModel:
        layer_devices = []
    devices = sorted({str(p.device) for p in model.parameters()})
    quant = spec.quantization
    weights: dict[str, Any] = {"dtype": str(dtype).replace("torch.", ""), "quantization": None}
    if quant is not None:
        from importlib.metadata import version

        weights = {
            "dtype": f"int{quant.bits}" if quant.bits == 8 else str(quant.resolved_quant_type),
            "compute_dtype": (quant.compute_dtype or str(dtype).replace("torch.", ""))
            if quant.bits == 4
            else str(dtype).replace("torch.", ""),
            "quantization": {
                **quant.model_dump(mode="json"),
                "quant_type": quant.resolved_quant_type,
                "bitsandbytes": version("bitsandbytes"),
            },
        }
    return {
        **placement_dict(spec),
        "devices": devices,
        "layer_devices": layer_devices,
        "weights": weights,
    }


def _module_device(module: Any) -> str:
    for param in module.parameters():
        return str(param.device)
    return "none"


def config_facts(config: Any, model: Any) -> ModelFacts:
    """Sizes from the loaded config (its text part for a composite model; attribute access follows
    the class's ``attribute_map``: ``n_layer`` is ``num_hidden_layers``), before the attention
    calls correct the attention facts (:func:`worker.capture.probe.facts_with_probe`)."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config

    def size(*names: str) -> int | None:
        for name in names:
            try:
                value = getattr(text, name, None)
            except Exception:
                value = None
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
        return None

    num_layers = size("num_hidden_layers", "decoder_layers", "num_layers")
    if num_layers is None:
        try:
            num_layers = len(decoder_layers(model))
        except UnsupportedModel:
            num_layers = 0
    heads = size("num_attention_heads", "decoder_attention_heads") or 1
    window = size("sliding_window") if getattr(text, "use_sliding_window", True) else None
    softcap = getattr(text, "attn_logit_softcapping", None)
    return ModelFacts(
        model_type=str(config.model_type),
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=size("num_key_value_heads") or heads,
        head_dim=size("head_dim") or (size("hidden_size", "d_model") or heads) // heads,
        hidden_size=size("hidden_size", "d_model") or 0,
        max_positions=size("max_position_embeddings"),
        sliding_window=window,
        attn_logit_softcapping=float(softcap) if softcap else None,
    )


def _config_facts(config: Any) -> dict[str, Any]:
    keys = (
        "rope_theta",
        "rope_scaling",
        "rope_parameters",
        "sliding_window",
        "layer_types",
        "max_position_embeddings",
        "n_positions",
        "vocab_size",
        "attn_logit_softcapping",
    )
    out = {}
    for key in keys:
        value = getattr(config, key, None)
        if value is not None:
            out[key] = value if isinstance(value, (int, float, str, bool, list, dict)) else str(value)
    return out


class ModelCache:
    """One loaded model per worker process (GPU memory holds one); reused across jobs.

    ``roots``: the model roots a job's absolute path must lie under (the worker's task passes
    ``WorkerSettings.model_root_dirs()``); ``None``: not checked (tests that load models they made)."""

    def __init__(
        self, cache_dir: Path, device_setting: str = "auto", roots: Sequence[Path] | None = None
    ) -> None:
        self.cache_dir = cache_dir
        self.device_setting = device_setting
        self.roots = None if roots is None else tuple(roots)
        self._lock = threading.Lock()
        self._key: tuple[str, ...] | None = None
        self._loaded: LoadedModel | None = None

    def get(self, spec: ModelSpec) -> LoadedModel:
        if self.roots is not None:  # also for the model already loaded: a symlink may have moved
            check_model_roots(spec, self.roots)
        check_placement_here(spec, self.device_setting)  # before anything is freed or read
        device = pick_device(self.device_setting)
        key = (
            spec.id,
            spec.revision or "",
            spec.gguf_file or "",
            str(pick_dtype(spec.dtype, device)),
            str(device),
            json.dumps(placement_dict(spec), sort_keys=True),
        )
        with self._lock:
            if self._key != key or self._loaded is None:
                self._loaded = None  # free the previous model before loading the next
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                self._loaded = load_model(spec, device=device, cache_dir=self.cache_dir, roots=self.roots)
                self._key = key
                if device.type == "cuda":  # the device-to-host ring, page-locked once per process
                    from worker.capture.hostcopy import pinned_ring

                    pinned_ring(self._loaded.device).allocate_now()
            else:
                self._loaded.load_s = 0.0
            return self._loaded
