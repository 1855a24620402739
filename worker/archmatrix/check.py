"""One model type through the worker's real export path, compared with independent references.

For a type: derive a tiny seeded config (:mod:`.tiny`), save the model with a byte tokenizer,
load it the way a job does (:func:`worker.models.load_model`), export a padded batch of two prompts
of different lengths with generated rows (attention in float32, q/k/v), then compare with
- eager attention, ``output_attentions=True``, of the same model on each unpadded sequence;
- the q/k/v an independently registered recording function saw (eager model, per sequence);
- the model's logits without the capture (its default attention implementation), which must be
  equal with the capture installed;
and, where that passes, a derived-attention export reconstructed by the bundle reader.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from storage.errors import QkvaultError
from worker.archmatrix.rules import config_rules
from worker.archmatrix.tiny import tiny_config
from worker.archmatrix.tokenizer import byte_tokenizer

PROMPTS = ["The quick brown fox jumps over the lazy dog.", "Hi there"]
NEW_TOKENS = 3
EXACT_ATOL = 1e-5  # fp32 attention: summation order differs from eager by ~1e-7
RECORD_IMPL = "qkvault_matrix_record"
TYPE_TIME_LIMIT_S = 30  # a tiny model takes ~1-2 s; one that does not finish is not verified


@dataclass(frozen=True)
class Precision:
    """Where and in which dtype the check runs, and what counts as equal. On CPU in fp32 every
    difference is summation order (``EXACT_ATOL``); on CUDA in bf16 eager rounds Q·Kᵀ and the
    probabilities to bf16 (tests/worker/test_oracle.py explains 2e-2), and q/k/v are not compared
    (the eager and SDPA residual streams round differently in bf16)."""

    device: str = "cpu"
    dtype: str = "float32"
    atol: float = EXACT_ATOL
    compare_qkv: bool = True

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[self.dtype]


CPU_FP32 = Precision()
CUDA_BF16 = Precision(device="cuda", dtype="bfloat16", atol=2e-2, compare_qkv=False)


@dataclass
class TypeResult:
    """The matrix's verdict on one model type (one row of docs/architectures.md)."""

    model_type: str
    status: str = "refused"  # "exact" or "refused"
    reason: str = ""
    max_error: float | None = None
    qkv_error: float | None = None
    logits_error: float | None = None
    derived: bool = False
    derived_reason: str = ""
    derived_error: float | None = None
    notes: str = ""
    attribute_map: dict[str, str] = field(default_factory=dict)
    rules: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def entry(self) -> dict[str, Any]:
        """The ``storage/models/architectures.json`` entry (what the API and the worker read)."""
        data = asdict(self)
        for key in ("model_type", "qkv_error", "logits_error", "derived_error", "seconds"):
            data.pop(key)
        return data


class _Hooks:
    """ExportHooks without a database: the matrix only needs the bundle."""

    def phase(self, name: str, units_total: int | None = None) -> None: ...
    def unit_done(self) -> None: ...
    def check_cancelled(self) -> None: ...


def build_model_folder(
    model_type: str, folder: Path, seed: int = 0, overrides: dict[str, Any] | None = None
) -> Any:
    """Save a tiny seeded ``model_type`` model (``overrides``: config values on top of the tiny
    sizes) and the byte tokenizer into ``folder``; returns the config."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type, overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return config


def _export(folder: Path, out: Path, lm: Any, precision: Precision, **capture: Any) -> Any:
    from storage.bundle import open_bundle
    from storage.bundle.writer import BundleWriter
    from storage.jobs.spec import JobSpec
    from worker.export import Exporter

    spec = JobSpec.model_validate(
        {
            "model": {"id": str(folder), "dtype": precision.dtype},
            "prompts": PROMPTS,
            "generation": {"max_new_tokens": NEW_TOKENS, "stop_at_eos": False},
            "capture": {"attention": True, "qkv": True, **capture},
            "storage": {"chunk_rows": 16, "attention_dtype": "float32"},
        }
    )
    Exporter(spec, lm, BundleWriter(str(out)), _Hooks(), verified_only=False).run("matrix")
    return open_bundle(str(out))


def _recording(seen: list[tuple[torch.Tensor, ...]]) -> Any:
    def record(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, **kwargs: Any) -> Any:
        seen.append((query[0], key[0], value[0]))
        eager = sys.modules[type(module).__module__].eager_attention_forward
        return eager(module, query, key, value, attention_mask, **kwargs)

    return record


def eager_reference(
    folder: Path, tokens: list[int], precision: Precision = CPU_FP32
) -> tuple[list[np.ndarray], list[tuple[np.ndarray, ...]]]:
    """In the order the layers call attention: eager probabilities ``[H, T, T]``
    (``output_attentions=True``) and the ``(q, k, v)`` an independent recording function saw, on
    the unpadded sequence ``tokens``."""
    from transformers import AttentionInterface, AutoModelForCausalLM
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    model = AutoModelForCausalLM.from_pretrained(
        folder, attn_implementation="eager", dtype=precision.torch_dtype
    )
    model = model.to(precision.device).eval()  # type: ignore[arg-type]
    ids = torch.tensor([tokens], device=precision.device)
    with torch.no_grad():
        out = model(ids, output_attentions=True)
    seen: list[tuple[torch.Tensor, ...]] = []
    AttentionInterface.register(RECORD_IMPL, _recording(seen))
    AttentionMaskInterface.register(RECORD_IMPL, eager_mask)
    model.set_attn_implementation(RECORD_IMPL)
    with torch.no_grad():
        model(ids)
    probs = [a[0].float().cpu().numpy() for a in (out.attentions or ()) if a is not None]
    return probs, [tuple(t.float().cpu().numpy() for t in qkv) for qkv in seen]


@dataclass
class Comparison:
    """Largest differences from the references: per sequence (attention, q/k/v) and for sink mass.
    ``pre_sink``: eager reported weights before the sink's scaling (rows summing to 1); they were
    compared with the export renormalised over the keys."""

    attention: list[float] = field(default_factory=list)
    qkv: list[float] = field(default_factory=list)
    sink: float | None = None
    pre_sink: bool = False

    @property
    def worst(self) -> float:
        return max([*self.attention, *self.qkv, self.sink or 0.0])


def _compare(ds: Any, folder: Path, precision: Precision, with_qkv: bool) -> Comparison:
    """Every exported layer, sequence, head, prompt and generated row against eager; q/k/v against
    what the recording function saw; sink mass against 1 − the eager row sum."""
    layers, heads, kv_heads = (ds[n].values.tolist() for n in ("layer", "head", "kv_head"))
    result = Comparison()
    for b in range(ds.sizes["batch"]):
        length = int(ds["length"][b])
        tokens = ds["tokens"][b, :length].values.tolist()
        reference, qkv = eager_reference(folder, tokens, precision)
        if len(reference) == int(ds.attrs["model"]["num_layers"]) > len(layers):
            reference = [reference[layer] for layer in layers]  # maps of non-attention layers too
        if not len(reference) == len(qkv) == len(layers):
            raise RuntimeError(
                f"eager gave {len(reference)} attention maps and {len(qkv)} calls for the "
                f"{len(layers)} exported attention layers"
            )
        worst = worst_qkv = 0.0
        for lp in range(len(layers)):
            full = np.asarray(ds["attention"][lp, b].values, dtype=np.float32)
            leaked = float(
                np.abs(full[:, length:]).max(initial=0.0) + np.abs(full[:, :, length:]).max(initial=0.0)
            )
            got, ref = full[:, :length, :length], reference[lp][heads]
            if "attention_sink" in ds or "attention_sinks" in ds:  # derived bundles: 1 − row sum
                stored = "attention_sink" in ds
                sink = (
                    np.asarray(ds["attention_sink"][lp, b, :, :length].values) if stored else 1 - got.sum(-1)
                )
                if np.abs(ref.sum(-1) - 1.0).max() < precision.atol < sink.max():  # eager: before the sink
                    result.pre_sink = True
                    got = got / np.maximum(got.sum(-1, keepdims=True), 1e-30)
                else:
                    err = float(np.abs(sink - (1.0 - ref.sum(-1))).max())
                    result.sink = max(result.sink or 0.0, err)
            worst = max(worst, float(np.abs(got - ref).max()), leaked)
            if with_qkv and precision.compare_qkv:
                q, k, v = qkv[lp]
                for name, want in (("q", q[heads]), ("k", k[kv_heads]), ("v", v[kv_heads])):
                    have = np.asarray(ds[name][lp, b, :, :length].values)
                    worst_qkv = max(worst_qkv, float(np.abs(have - want).max()))
        result.attention.append(worst)
        result.qkv.append(worst_qkv)
    return result


def _logits_error(folder: Path, lm: Any, precision: Precision) -> float:
    """|logits with the capture − logits of the model as transformers loads it|, padded batch."""
    from transformers import AutoModelForCausalLM

    from worker.generation import make_batch

    plain = AutoModelForCausalLM.from_pretrained(folder, dtype=precision.torch_dtype)
    plain = plain.to(precision.device).eval()  # type: ignore[arg-type]
    ids = [list(lm.tokenizer(p)["input_ids"]) for p in PROMPTS]
    batch = make_batch(ids, int(lm.tokenizer.pad_token_id), torch.device(precision.device))
    with torch.no_grad():
        want = plain(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        have = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    real = batch.attention_mask.bool()
    return float((have - want)[real].abs().max())


def _mechanisms(facts: Any, config: Any) -> str:
    notes = []
    if facts.attention_layers is not None:
        notes.append(f"attention in layers {list(facts.attention_layers)} of {facts.num_layers}")
    text = config.get_text_config(decoder=True)
    if facts.sliding_window or getattr(text, "sliding_window", None):
        notes.append("sliding window")
    if getattr(text, "attention_chunk_size", None):
        notes.append("chunked attention")
    if facts.attn_logit_softcapping:
        notes.append("logit soft-capping")
    if facts.sinks:
        notes.append("attention sinks")
    if facts.v_head_dim:
        notes.append(f"q/k head size {facts.head_dim}, v {facts.v_head_dim}")
    if facts.num_kv_heads < facts.num_heads:
        notes.append("grouped-query" if facts.num_kv_heads > 1 else "multi-query")
    if any(getattr(text, k, None) for k in ("num_experts", "num_local_experts", "n_routed_experts")):
        notes.append("mixture of experts")
    return ", ".join(notes)


def check_type(
    model_type: str,
    workdir: Path | None = None,
    precision: Precision = CPU_FP32,
    overrides: dict[str, Any] | None = None,
) -> TypeResult:
    """The matrix's verdict on ``model_type`` (never raises for a model's failure: it is a reason)."""
    from worker.models import load_model

    started = time.perf_counter()
    result = TypeResult(model_type)
    root = Path(tempfile.mkdtemp(prefix=f"matrix-{model_type}-", dir=workdir))
    try:
        with warnings.catch_warnings(), _time_limit(TYPE_TIME_LIMIT_S):
            warnings.simplefilter("ignore")
            _check(model_type, root, result, load_model, precision, overrides)
    except _TimeLimit:
        result.status, result.derived = "refused", False
        result.reason = (
            f"not verified: the matrix's tiny model of this type did not finish within {TYPE_TIME_LIMIT_S} s"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
        # the verdicts are data: no temporary paths in them
        result.reason = result.reason.replace(str(root), "<model folder>")
        result.derived_reason = result.derived_reason.replace(str(root), "<model folder>")
        result.seconds = round(time.perf_counter() - started, 2)
    return result


class _TimeLimit(BaseException):
    """Raised by the alarm (a BaseException: the checks' ``except Exception`` must not swallow it)."""


@contextlib.contextmanager
def _time_limit(seconds: int) -> Iterator[None]:
    """SIGALRM after ``seconds`` in the main thread of this process (the matrix's worker processes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise _TimeLimit()

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _check(
    model_type: str,
    root: Path,
    result: TypeResult,
    load_model: Any,
    precision: Precision,
    overrides: dict[str, Any] | None = None,
) -> None:
    from storage.models.spec import ModelSpec
    from worker.archmatrix.reasons import refusal_reason, unknown_mechanism_reason

    folder = root / "model"
    try:
        config = build_model_folder(model_type, folder, overrides=overrides)
    except Exception as exc:
        result.reason = refusal_reason(model_type, exc, stage="config")
        return
    try:
        lm = load_model(
            ModelSpec(id=str(folder), dtype=precision.dtype),
            device=torch.device(precision.device),
            cache_dir=root,
            admitted_only=False,
        )
        result.attribute_map, result.rules = config_rules(config, lm.facts)
        ds = _export(folder, root / "full.zarr", lm, precision)
        compared = _compare(ds, folder, precision, with_qkv=True)
        result.logits_error = _logits_error(folder, lm, precision)
    except (QkvaultError, Exception) as exc:
        result.reason = refusal_reason(model_type, exc, stage="export")
        return
    result.max_error, result.qkv_error = max(compared.attention), max(compared.qkv)
    result.notes = _mechanisms(lm.facts, config)
    if compared.pre_sink:
        result.notes += "; eager reports weights before the sink scaling (compared renormalised)"
    unpadded = int(np.argmax([int(n) for n in ds["length"].values]))  # the longest: no left padding
    if result.logits_error > EXACT_ATOL:  # the same function runs with and without the capture
        result.reason = f"the model's logits change under capture (by {result.logits_error:.2g})"
    elif compared.worst > precision.atol and lm.info["attention_kwargs_unmodelled"]:
        unknown = tuple(lm.info["attention_kwargs_unmodelled"])
        result.reason = unknown_mechanism_reason(unknown, f"{compared.worst:.2g}")
    elif (
        compared.worst > precision.atol
        and max(compared.attention[unpadded], compared.qkv[unpadded]) <= precision.atol
    ):
        result.reason = (
            "left padding changes the model's own numbers (its positions do not follow position_ids and "
            "the attention mask): a padded sequence differs from the same sequence alone by "
            f"{compared.worst:.2g}, so batched exports would not be the model's unbatched attention"
        )
    elif compared.worst > precision.atol:
        result.reason = (
            f"exported attention differs from eager by {result.max_error:.2g} "
            f"(q/k/v {result.qkv_error:.2g}): a mechanism the capture does not reproduce"
        )
    else:
        result.status = "exact"
        _check_derived(folder, root, lm, result, precision)


def _check_derived(folder: Path, root: Path, lm: Any, result: TypeResult, precision: Precision) -> None:
    try:
        ds = _export(folder, root / "derived.zarr", lm, precision, attention="derived", qkv=False)
        error = _compare(ds, folder, precision, with_qkv=False).worst
    except Exception as exc:
        result.derived_reason = f"derived export failed: {type(exc).__name__}: {exc}"[:600]
        return
    result.derived_error = error
    if error <= precision.atol:
        result.derived = True
    else:
        result.derived_reason = f"reconstruction from q/k differs from eager by {error:.2g}"
