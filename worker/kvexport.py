"""Compressed KV export (KV_COMPRESSION.md), streamed as the cache is produced.

Every layer call's new key/value rows (prefill and generated tokens alike) are quantised on the
worker's device at once with each requested method; the codes go to the host, and a dequantised
copy stays on the device: the cache a serving system would hold at that moment (TurboQuant: every
token; KIVI: key groups and value tokens older than the full-precision window, the rest in fp16).
The same call's real post-RoPE queries are scored against that cache (over their causal /
sliding-window keys) for the fidelity report. At the end each method's ``kv/<method>_<bits>/``
group is written with its codes, matrices, codebooks and report.

Each method's torch side is a :class:`KVCodec` registered here with :func:`register_codec` under
the name its numpy side (:mod:`storage.kvquant.registry`) is registered with; nothing here or in
``worker.kvcheck`` branches on a method's name.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch

from storage.bundle.layout import BundleLayout
from storage.kvquant.registry import kv_method
from storage.kvquant.spec import KVMethodSpec
from worker.capture.attention_math import causal_allowed
from worker.capture.hostcopy import read_to_host
from worker.kvfidelity import METRICS, FidelityAccumulator, fidelity_block
from worker.kvquant import KIVI, TurboQuantMSE, TurboQuantProd, to_numpy

Arrays = dict[str, tuple[tuple[str, ...], np.ndarray]]
Tensors = tuple[torch.Tensor, torch.Tensor]


class KVStream(Protocol):
    """One method's state for one (layer, sequence)."""

    def append(self, k: torch.Tensor, v: torch.Tensor) -> Tensors:
        """Encode new rows ``k``/``v [KVH, n, D]`` (float32); return the cache a serving system holds
        now, ``(k̂, v̂) [KVH, T, D]`` — what the fidelity report scores the real queries against."""
        ...

    def codes(self) -> dict[str, np.ndarray]:
        """The arrays to store for this cell, ``k_``/``v_``-prefixed, ``[KVH, ...]`` (numpy)."""
        ...


class KVCodec(Protocol):
    """One method's torch side for one (method spec, head size, device)."""

    def stream(self) -> KVStream:
        """A fresh per-(layer, sequence) stream."""
        ...

    def round_trip(self, k: torch.Tensor, v: torch.Tensor) -> Tensors:
        """Dequantised ``k``/``v [KVH, T, D]`` of a whole prompt at once (the generation check)."""
        ...


CodecFactory = Callable[[KVMethodSpec, int, torch.device], KVCodec]
_CODECS: dict[str, CodecFactory] = {}


def register_codec(name: str, factory: CodecFactory) -> CodecFactory:
    """Add the torch codec of the method registered as ``name`` in ``storage.kvquant.registry``."""
    if name in _CODECS:
        raise ValueError(f"a torch codec for KV method {name!r} is already registered")
    _CODECS[name] = factory
    return factory


def unregister_codec(name: str) -> None:
    del _CODECS[name]


def codec_names() -> tuple[str, ...]:
    return tuple(_CODECS)


def codec_for(method: KVMethodSpec, dim: int, device: torch.device) -> KVCodec:
    """The torch codec of ``method`` for heads of ``dim`` on ``device``."""
    if method.method not in _CODECS:
        raise ValueError(f"KV method {method.method!r} has no torch codec; known: {', '.join(_CODECS)}")
    return _CODECS[method.method](method, dim, device)


def _cat(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    return b if a is None else torch.cat([a, b], dim=1)


def _joined(pieces: dict[str, list[np.ndarray]]) -> dict[str, np.ndarray]:
    return {name: np.concatenate(parts, axis=1) for name, parts in pieces.items()}


class TurboQuantCodec:
    """``turboquant_prod`` (``prod=True``: prod keys, their cache the unbiased key estimate) and
    ``turboquant_mse``; every token is encoded as it comes."""

    def __init__(self, method: KVMethodSpec, dim: int, device: torch.device, *, prod: bool) -> None:
        self.values = TurboQuantMSE(dim, method.bits, method.seed, device)
        self.prod = TurboQuantProd(dim, method.bits, method.seed, method.seed + 1, device) if prod else None

    def keys(self, k: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Encoded keys and their dequantised form."""
        if self.prod is not None:
            ek = self.prod.encode(k)
            return ek, self.prod.dequantize(ek)
        ek = self.values.encode(k)
        return ek, self.values.decode(ek)

    def stream(self) -> KVStream:
        return _TurboQuantStream(self)

    def round_trip(self, k: torch.Tensor, v: torch.Tensor) -> Tensors:
        v_hat = self.values.decode(self.values.encode(v))
        return self.keys(k)[1], v_hat


class _TurboQuantStream:
    def __init__(self, codec: TurboQuantCodec) -> None:
        self.codec = codec
        self.pieces: dict[str, list[np.ndarray]] = defaultdict(list)
        self.k_hat: torch.Tensor | None = None
        self.v_hat: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> Tensors:
        (ek, k_hat), ev = self.codec.keys(k), self.codec.values.encode(v)
        for prefix, encoded in (("k_", ek), ("v_", ev)):
            for name, array in to_numpy(encoded).items():
                self.pieces[prefix + name].append(array)
        self.k_hat, self.v_hat = _cat(self.k_hat, k_hat), _cat(self.v_hat, self.codec.values.decode(ev))
        return self.k_hat, self.v_hat

    def codes(self) -> dict[str, np.ndarray]:
        return _joined(self.pieces)


class KIVICodec:
    """``kivi``: key groups and value tokens are encoded once older than the full-precision window
    (groups are cut by the stream, so its encoder keeps no window); the rest is held in fp16."""

    def __init__(self, method: KVMethodSpec, dim: int, device: torch.device) -> None:
        self.method, self.dim = method, dim
        self.encoder = KIVI(method.bits, method.group, residual=0)

    def stream(self) -> KVStream:
        return _KIVIStream(self)

    def round_trip(self, k: torch.Tensor, v: torch.Tensor) -> Tensors:
        kivi, dim = KIVI(self.method.bits, self.method.group, self.method.residual), k.shape[-1]
        return kivi.decode_keys(kivi.encode_keys(k), dim), kivi.decode_values(kivi.encode_values(v), dim)


class _KIVIStream:
    def __init__(self, codec: KIVICodec) -> None:
        self.codec = codec
        self.pieces: dict[str, list[np.ndarray]] = defaultdict(list)
        self.k_hat: torch.Tensor | None = None  # the quantised part only
        self.v_hat: torch.Tensor | None = None
        self.k_tail: torch.Tensor | None = None  # exact rows not yet quantised
        self.v_tail: torch.Tensor | None = None
        self.k_done = 0  # tokens quantised so far
        self.v_done = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> Tensors:
        kivi, method, dim = self.codec.encoder, self.codec.method, k.shape[-1]
        self.k_tail, self.v_tail = _cat(self.k_tail, k), _cat(self.v_tail, v)
        total = self.k_done + self.k_tail.shape[1]
        ready_k = max(0, (total - method.residual) // method.group * method.group - self.k_done)
        if ready_k:  # whole key groups now older than the full-precision window
            ek = kivi.encode_keys(self.k_tail[:, :ready_k])
            for name in ("codes_packed", "scale", "zero"):
                self.pieces["k_" + name].append(ek[name].cpu().numpy())
            self.k_hat = _cat(self.k_hat, kivi.decode_keys(ek, dim))
            self.k_tail, self.k_done = self.k_tail[:, ready_k:], self.k_done + ready_k
        ready_v = max(0, total - method.residual - self.v_done)
        if ready_v:  # value tokens now older than the window
            ev = kivi.encode_values(self.v_tail[:, :ready_v])
            for name in ("codes_packed", "scale", "zero"):
                self.pieces["v_" + name].append(ev[name].cpu().numpy())
            self.v_hat = _cat(self.v_hat, kivi.decode_values(ev, dim))
            self.v_tail, self.v_done = self.v_tail[:, ready_v:], self.v_done + ready_v
        tail_k, tail_v = self.k_tail.half().float(), self.v_tail.half().float()  # held in fp16
        return _cat(self.k_hat, tail_k), _cat(self.v_hat, tail_v)

    def codes(self) -> dict[str, np.ndarray]:
        assert self.k_tail is not None and self.v_tail is not None
        codes = _joined(self.pieces)
        codes["k_residual"] = read_to_host(self.k_tail.half()).numpy()
        codes["v_residual"] = read_to_host(self.v_tail.half()).numpy()
        return codes


register_codec("turboquant_prod", lambda method, dim, device: TurboQuantCodec(method, dim, device, prod=True))
register_codec("turboquant_mse", lambda method, dim, device: TurboQuantCodec(method, dim, device, prod=False))
register_codec("kivi", KIVICodec)


class KVExport:
    """A :class:`~worker.capture.session.KVSink`: encodes, scores and keeps codes per method."""

    def __init__(
        self, methods: list[KVMethodSpec], layout: BundleLayout, num_heads: int, num_kv_heads: int
    ) -> None:
        self.methods, self.layout = methods, layout
        self.group = num_heads // num_kv_heads
        self.kv_heads = list(layout.kv_heads)
        self.streams: dict[tuple[str, int, int], KVStream] = {}
        self.fidelity = {m.name: FidelityAccumulator(len(layout.layers), len(self.kv_heads)) for m in methods}
        self.lengths: dict[int, int] = defaultdict(int)
        self._codecs: dict[str, KVCodec] = {}

    def _stream(self, method: KVMethodSpec, lp: int, b: int, dim: int, device: torch.device) -> KVStream:
        key = (method.name, lp, b)
        if key not in self.streams:
            if method.name not in self._codecs:
                self._codecs[method.name] = codec_for(method, dim, device)
            self.streams[key] = self._codecs[method.name].stream()
        return self.streams[key]

    def on_layer(
        self,
        lp: int,
        b: int,
        row0: int,
        q: torch.Tensor,
        k_new: torch.Tensor,
        v_new: torch.Tensor,
        k_visible: torch.Tensor,
        v_visible: torch.Tensor,
        col0: int,
        scaling: float,
        sliding_window: int | None,
    ) -> None:
        """``q [H, n, D]`` rows at positions ``row0..``; ``k_new``/``v_new [KVH, n, D]`` their own keys
        and values; ``k_visible``/``v_visible [KVH, T - col0, D]`` every key the rows can see
        (positions ``col0..``)."""
        kv = self.kv_heads
        k_new, v_new = k_new[kv].float(), v_new[kv].float()
        k_visible, v_visible = k_visible[kv].float(), v_visible[kv].float()
        if lp == 0:
            self.lengths[b] = row0 + q.shape[1]
        device, n = q.device, q.shape[1]
        q_pos = torch.arange(row0, row0 + n, device=device)
        k_pos = torch.arange(col0, row0 + n, device=device)
        allowed = causal_allowed(q_pos, k_pos, sliding_window)
        for method in self.methods:
            stream = self._stream(method, lp, b, k_new.shape[-1], k_new.device)
            k_cache, v_cache = stream.append(k_new, v_new)
            for gi, g in enumerate(kv):
                heads = [h for h in self.layout.heads if h // self.group == g]
                metrics = fidelity_block(
                    q[heads].float(),
                    k_visible[gi],
                    v_visible[gi],
                    k_hat=k_cache[gi, col0:],
                    v_hat=v_cache[gi, col0:],
                    scaling=scaling,
                    allowed=allowed,
                    causal_offset=row0 - col0,
                )
                self.fidelity[method.name].add(lp, gi, metrics)

    def finish(self) -> tuple[dict[str, Arrays], dict[str, Any]]:
        """Per method: its group arrays (codes, matrices, codebooks, fidelity) and a status dict."""
        groups: dict[str, Arrays] = {}
        status: dict[str, Any] = {}
        for method in self.methods:
            codes: dict[str, dict[tuple[int, int], np.ndarray]] = defaultdict(dict)
            for (name, lp, b), stream in self.streams.items():
                if name != method.name:
                    continue
                for array_name, array in stream.codes().items():
                    codes[array_name][(lp, b)] = array
            groups[method.name], status[method.name] = self._group_arrays(method, codes)
        return groups, status

    def _group_arrays(
        self, method: KVMethodSpec, codes: dict[str, dict[tuple[int, int], np.ndarray]]
    ) -> tuple[Arrays, dict[str, Any]]:
        layout, dim = self.layout, self.layout.head_dim
        arrays: Arrays = {
            "layer": (("layer",), np.asarray(layout.layers, dtype=np.int32)),
            "kv_head": (("kv_head",), np.asarray(self.kv_heads, dtype=np.int32)),
        }
        for name, per_cell in codes.items():
            sample = next(iter(per_cell.values()))
            shape = tuple(max(a.shape[i] for a in per_cell.values()) for i in range(sample.ndim))
            data = np.zeros((len(layout.layers), layout.batch, *shape), dtype=sample.dtype)
            for (lp, b), a in per_cell.items():
                region: tuple[int | slice, ...] = (lp, b, *(slice(0, s) for s in a.shape))
                data[region] = a
            arrays[name] = (
                ("layer", "batch", "kv_head", *(f"{name}_{i}" for i in range(1, sample.ndim))),
                data,
            )
        definition = kv_method(method.method)
        arrays.update(definition.shared_arrays(method, dim))  # matrices, codebooks
        accumulator = self.fidelity[method.name]
        report = accumulator.result()
        for metric in METRICS:
            arrays[f"fidelity_{metric}"] = (("layer", "kv_head"), report[metric].astype(np.float32))
        arrays["fidelity_rows"] = (("layer", "kv_head"), report["rows"].astype(np.int64))
        lengths = [self.lengths[b] for b in sorted(self.lengths)]
        cells = len(layout.layers) * len(self.kv_heads)
        bits = definition.job_bits(method, dim, lengths)
        status = {
            "params": method.model_dump(),
            "fidelity": {k: round(float(v), 6) for k, v in accumulator.aggregate().items()},
            "fp16_bytes": sum(lengths) * cells * dim * 2 * 2,  # K and V
            "theoretical_ratio": round(2 * 16 * dim * sum(lengths) / bits, 4),
        }
        return arrays, status
