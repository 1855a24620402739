"""Every bundle certifies itself: a sampled block of each exported layer is checked on the worker.

For the first (prefill) call and the first decode call of every exported layer, the last
:data:`SAMPLE_ROWS` real rows of up to :data:`SAMPLE_SEQUENCES` of its sequences (the most and the
least padded among them, :meth:`Certifier.sequences`) are recomputed with the export's probability
function (:func:`worker.capture.attention_math.attention_probs`, the model's mask, soft-cap and
sinks), over every query head, and checked three ways:

- rows sum to 1, or to 1 minus the sink mass computed from the model's sink logits;
- no probability where the model's mask hides the key;
- probabilities times V equal the attention output the model's own function returned (before
  the output projection), relative to the largest |v| of the visible keys.

The measured maxima, the tolerances and the provenance (transformers/torch versions, the wrapped
attention implementation, weights dtype) are stored in the bundle's ``certificate`` attribute. A
check over its tolerance raises :class:`~storage.errors.CertificationFailed`: the job fails with the
figures instead of shipping wrong data.

A check never waits for the device: its maxima stay there (one running maximum per layer) until the
certificate is read (:meth:`Certifier.settle`, once per export after its forward passes), which is
where a failed check raises. Read per (layer, sequence), they cost a bulk job one synchronisation of
the GPU's launch queue each, thousands per micro-batch. A check is about 40 small kernel launches
on the forward thread; made for every sequence of a micro-batch of 64 one by one they cost
≈ 80,000 launches per micro-batch of a 32-layer model. So a call's sample of sequences (every
micro-batch of a bulk job has its own) is checked in one computation (:meth:`Certifier.check_sequences`:
every sampled sequence over all the call's keys, each one's own rows and keys kept by a mask).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from storage.errors import CertificationFailed
from worker.capture.attention_math import attention_probs, causal_allowed
from worker.capture.hook import AttentionCall
from worker.capture.hostcopy import device_ints, read_to_host

SAMPLE_ROWS = 8
SAMPLE_SEQUENCES = 4  # the sequences of one call checked at most (the most and least padded first)
# a bulk job's micro-batches after the first check every this many exported layers in turn
# (:func:`micro_batch_layers`); ≈ 60 small operators a check on the forward thread cost a summary-only
# job ≈ 18% of its time when every micro-batch checked every layer (docs/benchmarks.md, session 12),
# and at every 8th layer still a third of the capture's host time (session 19): one layer a
# micro-batch of a 32-layer model, each checked again within 32 micro-batches
MICRO_BATCH_LAYER_STRIDE = 32
# probabilities · V against the model's output, relative to max |v|: the model computes in the
# weights' dtype (bf16: 8-bit mantissa, rounding ≈ 4e-3 per product, accumulated over the keys)
OUTPUT_TOLERANCE = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 3e-2}
ROW_SUM_TOLERANCE = 1e-4  # the probabilities themselves are fp32


def micro_batch_layers(layers: tuple[int, ...], micro_batch: int) -> tuple[int, ...]:
    """The exported ``layers`` a bulk job's micro-batch ``micro_batch`` certifies: every one in
    micro-batch 0, then every :data:`MICRO_BATCH_LAYER_STRIDE`-th in turn (micro-batch ``k``: those
    at positions ``≡ k - 1`` modulo the stride, or modulo the number of layers when fewer: each
    micro-batch checks one at least), so each layer is checked again within that many
    micro-batches; the choice depends on the index alone (a resumed job checks what it would have)."""
    if micro_batch == 0 or not layers:
        return layers
    stride = min(MICRO_BATCH_LAYER_STRIDE, len(layers))
    return layers[(micro_batch - 1) % stride :: stride]


@dataclass
class LayerCertificate:
    rows: int = 0
    calls: int = 0
    row_sum_error: float = 0.0
    masked_mass: float = 0.0
    output_error: float = 0.0


@dataclass
class Certifier:
    """Checks sampled rows of each exported layer (``layer_pos`` of the layout), at most one
    prefill call and one decode call per layer. ``weights_dtype`` sets the output tolerance."""

    layers: tuple[int, ...]
    weights_dtype: str
    provenance: dict[str, Any] = field(default_factory=dict)
    # derived-attention jobs: each exported layer's chunk size (0: none). The sampled rows are then
    # computed by the reader's formula from what the bundle stores (scaling, window, chunk,
    # soft-cap, sinks; no mask, no bias), so a model the formula cannot reproduce (an ALiBi bias in
    # its mask) fails here instead of shipping q/k that reconstruct wrong attention
    derived_chunks: dict[int, int] | None = None
    _done: set[tuple[int, bool]] = field(default_factory=set)
    _layers: dict[int, LayerCertificate] = field(default_factory=dict)
    # per layer, the maxima of the checks not read yet: [row_sum_error, masked_mass, output_error]
    # on the device the checks ran on
    _unread: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def output_tolerance(self) -> float:
        return OUTPUT_TOLERANCE.get(self.weights_dtype, OUTPUT_TOLERANCE["bfloat16"])

    @staticmethod
    def sequences(pads: list[int], active: list[bool]) -> frozenset[int]:
        """The active sequences of a call to check: all of them up to :data:`SAMPLE_SEQUENCES`,
        else the most padded, the least padded, and others evenly spaced between them (by order
        in the batch): the mask's two extremes, and a sample of the rest."""
        candidates = [b for b, on in enumerate(active) if on]
        if len(candidates) <= SAMPLE_SEQUENCES:
            return frozenset(candidates)
        chosen = {max(candidates, key=lambda b: pads[b]), min(candidates, key=lambda b: pads[b])}
        last = len(candidates) - 1
        spaced = [candidates[round(i * last / (SAMPLE_SEQUENCES - 1))] for i in range(SAMPLE_SEQUENCES)]
        for b in spaced + candidates:  # the batch order fills what the spacing repeated
            if len(chosen) == SAMPLE_SEQUENCES:
                break
            chosen.add(b)
        return frozenset(chosen)

    def due(self, layer_idx: int, q_len: int) -> bool:
        """Whether this call of ``layer_idx`` is to be checked (marks it checked)."""
        key = (layer_idx, q_len == 1)
        if layer_idx not in self.layers or key in self._done:
            return False
        self._done.add(key)
        return True

    def check(
        self,
        call: AttentionCall,
        b: int,
        i0: int,
        j0: int,
        q_abs0: int,
        k_abs0: int,
        real: tuple[int, int] = (0, 0),
    ) -> None:
        """:meth:`check_sequences` of one sequence."""
        self.check_sequences(call, [(b, i0, j0, real)], q_abs0, k_abs0)

    def check_sequences(
        self,
        call: AttentionCall,
        picks: list[tuple[int, int, int, tuple[int, int]]],
        q_abs0: int,
        k_abs0: int,
    ) -> None:
        """A call whose probabilities the export does not compute (q/k/v or derived jobs): compute
        them for the sampled rows of the sequences ``picks`` as the export (or, for derived jobs, the
        reader) would, all of them at once, then verify. A pick ``(b, i0, j0, real)``: rows ``i0..``
        of the call are sequence ``b``'s real rows (absolute position of call row 0: ``q_abs0``),
        keys ``j0..`` its real keys (absolute position of call key 0: ``k_abs0``); ``real``: the
        token positions of row ``i0`` and key ``j0``. Every sequence is computed over all the
        call's keys and its last :data:`SAMPLE_ROWS` rows, the ones that are not its own masked."""
        if call.output is None or not picks:
            return
        device = call.query.device
        q_len, num_keys = call.query.shape[2], call.key.shape[2]
        r0 = max(0, q_len - SAMPLE_ROWS)
        rows = torch.arange(r0, q_len, device=device)
        keys = torch.arange(num_keys, device=device)
        columns = [
            list(column) for column in zip(*((b, i0, j0, *real) for b, i0, j0, real in picks), strict=True)
        ]
        bs, first_rows, first_keys, real_rows, real_keys = device_ints(columns, device).unbind(0)
        own_rows = rows >= first_rows[:, None]  # [S, n]
        own_keys = keys >= first_keys[:, None]  # [S, K]
        own = (own_rows[:, :, None] & own_keys[:, None, :])[:, None]  # [S, 1, n, K]
        allowed: torch.Tensor | None
        additive: torch.Tensor | None = None
        if self.derived_chunks is not None:
            q_pos = real_rows[:, None] + rows - first_rows[:, None]  # [S, n] token positions
            k_pos = real_keys[:, None] + keys - first_keys[:, None]  # [S, K]
            allowed = self._derived_visibility(call, q_pos, k_pos)[:, None] & own
        else:
            allowed, additive = _visibility(call, bs, r0, q_len - r0, 0, num_keys, None, q_abs0, k_abs0)
            if allowed is not None:
                allowed = allowed & own
            else:
                assert additive is not None
                additive = additive.masked_fill(~own, torch.finfo(additive.dtype).min)
        probs = attention_probs(
            call.query.index_select(0, bs)[:, :, r0:],
            call.key.index_select(0, bs),
            scaling=call.scaling,
            allowed=allowed,
            additive_mask=additive,
            softcap=call.softcap,
            sinks=call.sinks,
        )
        counted = sum(q_len - max(i0, r0) for _, i0, _, _ in picks)
        self._verify(call, bs, probs, r0, 0, None, q_abs0, k_abs0, own, counted)

    def _derived_visibility(
        self, call: AttentionCall, q_pos: torch.Tensor, k_pos: torch.Tensor
    ) -> torch.Tensor:
        """``[S, n, K]``: what the reader's formula lets rows at token positions ``q_pos [S, n]`` see
        of the keys at positions ``k_pos [S, K]``: causal, the window, the chunk."""
        assert self.derived_chunks is not None
        allowed = causal_allowed(q_pos, k_pos, call.sliding_window)
        chunk = self.derived_chunks.get(call.layer_idx, 0)
        if chunk:
            allowed &= (q_pos[:, :, None] // chunk) == (k_pos[:, None, :] // chunk)
        return allowed

    def check_block(
        self,
        call: AttentionCall,
        b: int,
        probs: torch.Tensor,
        r0: int,
        j0: int,
        heads: torch.Tensor,
        q_abs0: int,
        k_abs0: int,
    ) -> None:
        """The export's own probabilities ``probs [H', n, K]`` of call rows ``r0 .. r0 + n`` over call
        keys ``j0 .. j0 + K`` (every key a row can see) for query heads ``heads [H']``: the rows among
        the call's last :data:`SAMPLE_ROWS` are verified."""
        if call.output is None:
            return
        first = max(r0, call.query.shape[2] - SAMPLE_ROWS)
        if first < r0 + probs.shape[1]:
            bs = device_ints([b], call.query.device)
            block = probs[None, :, first - r0 :]
            self._verify(call, bs, block, first, j0, heads, q_abs0, k_abs0, None, block.shape[2])

    def _verify(
        self,
        call: AttentionCall,
        bs: torch.Tensor,
        probs: torch.Tensor,
        r0: int,
        j0: int,
        heads: torch.Tensor | None,
        q_abs0: int,
        k_abs0: int,
        own: torch.Tensor | None,
        counted_rows: int,
    ) -> None:
        """Row sums (with the sink's mass), masked keys, and probabilities·V against the model's
        output for ``probs [S, H', n, K]`` of sequences ``bs [S]`` (rows from ``r0``, keys from
        ``j0``, query heads ``heads``, None: all); ``own [S, 1, n, K]``: each sequence's own rows
        and keys (None: all of them), the only ones checked, ``counted_rows`` of them."""
        assert call.output is not None
        rows, width = probs.shape[2], probs.shape[3]
        probs = probs.float()
        allowed, additive = _visibility(call, bs, r0, rows, j0, width, heads, q_abs0, k_abs0)
        if allowed is not None:
            visible = allowed
        else:
            assert additive is not None
            visible = additive > torch.finfo(additive.dtype).min / 2
        if own is not None:
            visible = visible & own
        row_sums = probs.sum(dim=-1)  # [S, H', n]
        expected = torch.ones_like(row_sums)
        if call.sinks is not None:
            expected = expected - _sink_mass(call, bs, r0, rows, j0, width, heads, visible, additive)
        groups = call.query.shape[1] // call.value.shape[1]
        v = call.value.index_select(0, bs)[:, :, j0 : j0 + width].float()  # [S, KVH, K, Dv]
        v = v.repeat_interleave(groups, dim=1) if heads is None else v.index_select(1, heads // groups)
        ours = torch.matmul(probs, v)  # [S, H', n, Dv]
        theirs = call.output.index_select(0, bs)[:, r0 : r0 + rows].float()  # [S, n, H, Dv]
        theirs = (theirs if heads is None else theirs.index_select(2, heads)).transpose(1, 2)
        own_rows = None if own is None else own.any(dim=-1)  # [S, 1, n]
        magnitude = v.abs().amax(dim=(1, 3))  # [S, K]: max |v| of each key
        if own is not None:
            magnitude = magnitude.masked_fill(~own[:, 0].any(dim=1), 0.0)  # the sequence's keys
        scale = magnitude.amax(dim=-1).clamp(min=1e-6)[:, None, None, None]  # [S, 1, 1, 1]
        row_error = (row_sums - expected).abs()
        output_error = (ours - theirs).abs().amax(dim=-1) / scale[..., 0]  # [S, H', n]
        if own_rows is not None:
            row_error = row_error.masked_fill(~own_rows, 0.0)
            output_error = output_error.masked_fill(~own_rows, 0.0)
        cert = self._layers.setdefault(call.layer_idx, LayerCertificate())
        cert.rows += counted_rows
        cert.calls += len(bs)
        worst = torch.stack(
            [row_error.max(), probs.masked_fill(visible, 0.0).abs().max(), output_error.max()]
        )
        seen = self._unread.get(call.layer_idx)
        # fmax: a NaN figure is left out, as Python's max(figure, NaN) did when read one by one
        self._unread[call.layer_idx] = worst if seen is None else torch.fmax(seen, worst)

    def settle(self) -> None:
        """Read the maxima of the checks made since the last call (waiting for the device once)
        into the per-layer figures; raises :class:`~storage.errors.CertificationFailed` for a
        layer over its tolerance."""
        unread, self._unread = self._unread, {}
        for layer_idx, worst in sorted(unread.items()):
            row_sum_error, masked_mass, output_error = read_to_host(worst).tolist()
            cert = self._layers[layer_idx]
            cert.row_sum_error = max(cert.row_sum_error, row_sum_error)
            cert.masked_mass = max(cert.masked_mass, masked_mass)
            cert.output_error = max(cert.output_error, output_error)
        for layer_idx in sorted(unread):
            self._raise_if_failed(layer_idx, self._layers[layer_idx])

    def _raise_if_failed(self, layer_idx: int, cert: LayerCertificate) -> None:
        problems = []
        if cert.row_sum_error > ROW_SUM_TOLERANCE:
            problems.append(f"rows sum to 1 (minus sink mass) within {cert.row_sum_error:.2g}")
        if cert.masked_mass > 0:
            problems.append(f"probability {cert.masked_mass:.2g} on keys the model's mask hides")
        if cert.output_error > self.output_tolerance:
            problems.append(
                f"probabilities·V differ from the model's attention output by {cert.output_error:.2g} "
                f"of max|v| (tolerance {self.output_tolerance:g} for {self.weights_dtype} weights)"
            )
        if problems:
            advice = (
                "derived attention stores q/k, scaling, window, chunk, soft-cap and sinks only, and this "
                "model's attention depends on more (e.g. an ALiBi bias in its mask): export attention=true"
                if self.derived_chunks is not None
                else "report the model type and versions"
            )
            raise CertificationFailed(
                f"layer {layer_idx}: the exported attention does not reproduce the model's: "
                + "; ".join(problems)
                + f". The data would be wrong, so the job stopped; {advice}",
                detail={"layer": layer_idx, **vars(cert), "provenance": self.provenance},
            )

    def layer_checks(self) -> dict[int, dict[str, Any]]:
        """The checks done so far, per layer (a layer shard's part of the certificate)."""
        self.settle()
        return {layer: vars(cert).copy() for layer, cert in self._layers.items()}

    def add_layer_checks(self, checks: dict[int, dict[str, Any]]) -> None:
        """Take other runs' :meth:`layer_checks` (of layers this one did not check) as its own."""
        for layer, values in checks.items():
            self._layers[layer] = LayerCertificate(**values)

    def certificate(self) -> dict[str, Any]:
        """The bundle's ``certificate`` attribute: tolerances, per-layer maxima, provenance (after
        :meth:`settle`, which raises for a failed check)."""
        self.settle()
        layers = {str(k): vars(v) for k, v in sorted(self._layers.items())}
        worst = {
            name: max((getattr(v, name) for v in self._layers.values()), default=0.0)
            for name in ("row_sum_error", "masked_mass", "output_error")
        }
        return {
            "method": "sampled rows per exported layer (prefill and first decode call), recomputed "
            "in fp32 and checked: row sums, masked keys, probabilities·V vs the model's attention output",
            "sample_rows": SAMPLE_ROWS,
            "tolerance": {"row_sum": ROW_SUM_TOLERANCE, "output_relative": self.output_tolerance},
            "max": worst,
            "layers": layers,
            "provenance": self.provenance,
        }


def _visibility(
    call: AttentionCall,
    bs: torch.Tensor,
    r0: int,
    rows: int,
    j0: int,
    width: int,
    heads: torch.Tensor | None,
    q_abs0: int,
    k_abs0: int,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The model's mask for call rows ``r0 .. r0 + rows`` and keys ``j0 .. j0 + width`` of sequences
    ``bs [S]`` as ``(allowed, additive)`` (one of them set, ``[S, 1|H', n, K]`` or ``[n, K]``), for
    query heads ``heads`` (None: all): the call's own mask, or causal (with the window) when the
    call carries none."""
    if call.mask is None:
        device = call.query.device
        q_abs = torch.arange(q_abs0 + r0, q_abs0 + r0 + rows, device=device)
        k_abs = torch.arange(k_abs0 + j0, k_abs0 + j0 + width, device=device)
        return causal_allowed(q_abs, k_abs, call.sliding_window), None
    mask = call.mask.index_select(0, bs)[:, :, r0 : r0 + rows, j0 : j0 + width]
    if mask.shape[1] == call.query.shape[1] and heads is not None:
        mask = mask.index_select(1, heads)
    return (mask, None) if mask.dtype == torch.bool else (None, mask)


def _sink_mass(
    call: AttentionCall,
    bs: torch.Tensor,
    r0: int,
    rows: int,
    j0: int,
    width: int,
    heads: torch.Tensor | None,
    visible: torch.Tensor,
    additive: torch.Tensor | None,
) -> torch.Tensor:
    """``[S, H', n]``: exp(sink) / (Σ_visible exp(score) + exp(sink)) of sequences ``bs``, computed
    independently of :func:`attention_probs` (logsumexp over the visible scores and the sink)."""
    assert call.sinks is not None
    groups = call.query.shape[1] // call.key.shape[1]
    query = call.query.index_select(0, bs)[:, :, r0 : r0 + rows].float()  # [S, H, n, D]
    k = call.key.index_select(0, bs)[:, :, j0 : j0 + width].float()  # [S, KVH, K, D]
    sinks = call.sinks.float()
    if heads is None:
        k = k.repeat_interleave(groups, dim=1)
    else:
        query, k, sinks = query.index_select(1, heads), k.index_select(1, heads // groups), sinks[heads]
    scores = torch.matmul(query, k.transpose(-1, -2)) * call.scaling
    if call.softcap is not None:
        scores = torch.tanh(scores / call.softcap) * call.softcap
    if additive is not None:
        scores = scores + additive.float()
    scores = scores.masked_fill(~visible, float("-inf"))
    sink = sinks.view(1, -1, 1, 1).expand(scores.shape[0], -1, rows, 1)
    return torch.exp(sink[..., 0] - torch.logsumexp(torch.cat([scores, sink], dim=-1), dim=-1))
