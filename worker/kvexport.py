"""Compressed KV export (KV_COMPRESSION.md), streamed as the cache is produced.

Every layer call's new key/value rows (prefill and generated tokens alike) are quantised on the
worker's device at once with each requested method; the codes go to the host, and a dequantised
copy stays on the device: the cache a serving system would hold at that moment (TurboQuant: every
token; KIVI: key groups and value tokens older than the full-precision window, the rest in fp16).
The same call's real post-RoPE queries are scored against that cache (over their causal /
sliding-window keys) for the fidelity report. At the end each method's ``kv/<method>_<bits>/``
group is written with its codes, matrices, codebooks and report.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from storage.bundle.layout import BundleLayout
from storage.kvquant.accounting import job_kv_bits
from storage.kvquant.codebook import lloyd_max_codebook
from storage.kvquant.rotation import qjl_matrix, rotation_matrix
from storage.kvspec import KVMethodSpec
from worker.capture.attention_math import causal_allowed
from worker.kvfidelity import METRICS, FidelityAccumulator, fidelity_block
from worker.kvquant import KIVI, TurboQuantMSE, TurboQuantProd, to_numpy

Arrays = dict[str, tuple[tuple[str, ...], np.ndarray]]


@dataclass
class _Stream:
    """One method's state for one (layer, sequence)."""

    codes: dict[str, list[np.ndarray]] = field(default_factory=lambda: defaultdict(list))
    k_hat: torch.Tensor | None = None  # dequantised cache [KVH, T, D] (KIVI: quantised part only)
    v_hat: torch.Tensor | None = None
    k_tail: torch.Tensor | None = None  # KIVI: exact rows not yet quantised
    v_tail: torch.Tensor | None = None
    k_done = 0  # KIVI: tokens quantised so far
    v_done = 0


def _cat(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    return b if a is None else torch.cat([a, b], dim=1)


class KVExport:
    """A :class:`~worker.capture.session.KVSink`: encodes, scores and keeps codes per method."""

    def __init__(
        self, methods: list[KVMethodSpec], layout: BundleLayout, num_heads: int, num_kv_heads: int
    ) -> None:
        self.methods, self.layout = methods, layout
        self.group = num_heads // num_kv_heads
        self.kv_heads = list(layout.kv_heads)
        self.streams: dict[tuple[str, int, int], _Stream] = defaultdict(_Stream)
        self.fidelity = {m.name: FidelityAccumulator(len(layout.layers), len(self.kv_heads)) for m in methods}
        self.lengths: dict[int, int] = defaultdict(int)
        self._encoders: dict[str, dict[str, Any]] = {}

    def _encoder(self, method: KVMethodSpec, dim: int, device: torch.device) -> dict[str, Any]:
        if method.name not in self._encoders:
            if method.method == "kivi":  # groups are cut here, so the encoder itself keeps no window
                enc: dict[str, Any] = {"kivi": KIVI(method.bits, method.group, residual=0)}
            else:
                values = TurboQuantMSE(dim, method.bits, method.seed, device)
                keys: Any = values
                if method.method == "turboquant_prod":
                    keys = TurboQuantProd(dim, method.bits, method.seed, method.seed + 1, device)
                enc = {"k": keys, "v": values}
            self._encoders[method.name] = enc
        return self._encoders[method.name]

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
            stream = self.streams[(method.name, lp, b)]
            k_cache, v_cache = self._append(method, stream, k_new, v_new)
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
                )
                self.fidelity[method.name].add(lp, gi, metrics)

    def _append(
        self, method: KVMethodSpec, stream: _Stream, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode the new rows; returns the cache a serving system holds now (k̂, v̂ ``[KVH, T, D]``)."""
        enc = self._encoder(method, k.shape[-1], k.device)
        if method.method != "kivi":
            ek, ev = enc["k"].encode(k), enc["v"].encode(v)
            for prefix, encoded in (("k_", ek), ("v_", ev)):
                for name, array in to_numpy(encoded).items():
                    stream.codes[prefix + name].append(array)
            k_hat = enc["k"].dequantize(ek) if method.method == "turboquant_prod" else enc["k"].decode(ek)
            stream.k_hat, stream.v_hat = _cat(stream.k_hat, k_hat), _cat(stream.v_hat, enc["v"].decode(ev))
            assert stream.k_hat is not None and stream.v_hat is not None
            return stream.k_hat, stream.v_hat
        kivi, dim = enc["kivi"], k.shape[-1]
        stream.k_tail, stream.v_tail = _cat(stream.k_tail, k), _cat(stream.v_tail, v)
        total = stream.k_done + stream.k_tail.shape[1]
        ready_k = max(0, (total - method.residual) // method.group * method.group - stream.k_done)
        if ready_k:  # whole key groups now older than the full-precision window
            ek = kivi.encode_keys(stream.k_tail[:, :ready_k])
            for name in ("codes_packed", "scale", "zero"):
                stream.codes["k_" + name].append(ek[name].cpu().numpy())
            stream.k_hat = _cat(stream.k_hat, kivi.decode_keys(ek, dim))
            stream.k_tail, stream.k_done = stream.k_tail[:, ready_k:], stream.k_done + ready_k
        ready_v = max(0, total - method.residual - stream.v_done)
        if ready_v:  # value tokens now older than the window
            ev = kivi.encode_values(stream.v_tail[:, :ready_v])
            for name in ("codes_packed", "scale", "zero"):
                stream.codes["v_" + name].append(ev[name].cpu().numpy())
            stream.v_hat = _cat(stream.v_hat, kivi.decode_values(ev, dim))
            stream.v_tail, stream.v_done = stream.v_tail[:, ready_v:], stream.v_done + ready_v
        tail_k, tail_v = stream.k_tail.half().float(), stream.v_tail.half().float()  # held in fp16
        return _cat(stream.k_hat, tail_k), _cat(stream.v_hat, tail_v)

    def finish(self) -> tuple[dict[str, Arrays], dict[str, Any]]:
        """Per method: its group arrays (codes, matrices, codebooks, fidelity) and a status dict."""
        groups: dict[str, Arrays] = {}
        status: dict[str, Any] = {}
        for method in self.methods:
            codes: dict[str, dict[tuple[int, int], np.ndarray]] = defaultdict(dict)
            for (name, lp, b), stream in self.streams.items():
                if name != method.name:
                    continue
                for array_name, pieces in stream.codes.items():
                    codes[array_name][(lp, b)] = np.concatenate(pieces, axis=1)
                if method.method == "kivi":
                    assert stream.k_tail is not None and stream.v_tail is not None
                    codes["k_residual"][(lp, b)] = stream.k_tail.half().cpu().numpy()
                    codes["v_residual"][(lp, b)] = stream.v_tail.half().cpu().numpy()
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
        if method.method != "kivi":
            key_bits = method.bits - 1 if method.method == "turboquant_prod" else method.bits
            arrays["rotation"] = (("row", "col"), rotation_matrix(dim, method.seed))
            arrays["codebook_k"] = (("code_k",), lloyd_max_codebook(key_bits, dim).astype(np.float32))
            arrays["codebook_v"] = (("code_v",), lloyd_max_codebook(method.bits, dim).astype(np.float32))
            if method.method == "turboquant_prod":
                arrays["qjl"] = (("row", "col"), qjl_matrix(dim, method.seed + 1))
        accumulator = self.fidelity[method.name]
        report = accumulator.result()
        for metric in METRICS:
            arrays[f"fidelity_{metric}"] = (("layer", "kv_head"), report[metric].astype(np.float32))
        arrays["fidelity_rows"] = (("layer", "kv_head"), report["rows"].astype(np.int64))
        lengths = [self.lengths[b] for b in sorted(self.lengths)]
        cells = len(layout.layers) * len(self.kv_heads)
        bits = job_kv_bits(
            method.method, method.bits, dim, lengths, group=method.group, residual=method.residual
        )
        status = {
            "params": method.model_dump(),
            "fidelity": {k: round(float(v), 6) for k, v in accumulator.aggregate().items()},
            "fp16_bytes": sum(lengths) * cells * dim * 2 * 2,  # K and V
            "theoretical_ratio": round(2 * 16 * dim * sum(lengths) / bits, 4),
        }
        return arrays, status
