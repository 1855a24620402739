"""One export: tokenize, prefill, decode token by token, stream captured rows into the bundle.

The generation loop is our own (greedy or seeded sampling) so every forward pass is known to the
capture session: which cache position its first query row has, and which sequences are still
producing tokens. Every token gets its attention row, q/k/v and hidden states, the last generated
one included (one extra forward pass feeds it back). With ``detail=top_heads`` a second pass over
the final tokens stores the attention of the heads the first pass's exact metrics ranked highest.
A layer shard (worker/layershards.py) runs the passes for its part of the exported layers only,
each forward pass ending after the part's last layer.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from storage.bundle.layout import BundleLayout
from storage.bundle.rowblocks import RowBlock
from storage.bundle.writer import BundleWriter
from storage.errors import InvalidJobSpec, JobCancelled, LeaseLost, StoreError
from storage.jobs.layout import layout_for_job
from storage.jobs.modelcheck import check_spec_for_model
from storage.jobs.spec import JobSpec
from worker.alternatives import AlternativesCollector
from worker.bundle_attrs import provenance, root_attrs
from worker.capture.certify import Certifier, micro_batch_layers
from worker.capture.hook import capturing
from worker.capture.session import ExportSession
from worker.capture.sidestream import after_mark, mark_queued
from worker.derived import AttentionFacts, layer_chunks
from worker.generation import (
    Batch,
    LayersDone,
    cache_argument,
    choose_next,
    eos_ids,
    hidden_state_hooks,
    make_batch,
    returned_cache,
    stop_after_layer,
    tokenize,
)
from worker.kvexport import KVExport
from worker.models import LoadedModel
from worker.summary_output import choose_top_heads, summary_arrays


class ExportHooks(Protocol):
    """What the job runner learns while an export runs (progress, cancellation); chunk records go
    from the writer's store threads to the writer's ``on_chunk``. Called on the forward thread: none
    of them may wait on SQL (worker/reporting.py)."""

    def phase(self, name: str, units_total: int | None = None) -> None: ...
    def unit_done(self) -> None: ...
    def check_cancelled(self) -> None: ...  # raises JobCancelled; called between row blocks


@dataclass(frozen=True)
class BatchInput:
    """The sequences of one micro-batch of a bulk job (worker/bulk.py), tokenized: their token ids,
    texts (empty for token-id rows), job-wide indices and source rows; ``index``: the micro-batch's
    (which layers its certificate checks: :func:`~worker.capture.certify.micro_batch_layers`)."""

    prompt_ids: list[list[int]]
    texts: list[str]
    sequences: list[int]
    source_rows: list[int]
    index: int


@dataclass
class PreparedFinish:
    """The end of one export, computed but not yet written (:meth:`Exporter.prepare_finish`):
    small ``arrays`` of the root, ``groups`` (``summary``), ``kv_groups`` (``kv/<method>``, whose
    ``kv_status`` entries get their stored sizes when written), the final root ``attrs`` and the
    export's ``summary`` (which shares ``kv_status``)."""

    arrays: dict[str, np.ndarray]
    groups: dict[str, dict[str, tuple[tuple[str, ...], np.ndarray]]]
    kv_groups: dict[str, dict[str, tuple[tuple[str, ...], np.ndarray]]]
    kv_status: dict[str, Any]
    attrs: dict[str, Any]
    summary: dict[str, Any]
    partial: bool


@dataclass
class _Tokenized:
    """What :meth:`Exporter.prepare_finish` computes with the tokenizer (on the forward thread): the
    root's small ``arrays`` so far, each sequence's length, prompt length and token strings, the
    prompts' and generated texts."""

    arrays: dict[str, np.ndarray]
    lengths: list[int]
    prompt_lengths: list[int]
    token_strings: list[list[str]]
    texts: dict[str, list[str]]


class Exporter:
    """Runs one padded batch's forward passes under capture and writes its bundle: a job's
    ``prompts``, or one micro-batch of a bulk job (``batch``)."""

    def __init__(
        self,
        spec: JobSpec,
        lm: LoadedModel,
        writer: BundleWriter,
        hooks: ExportHooks,
        *,
        verified_only: bool = True,
        batch: BatchInput | None = None,
        layer_positions: range | None = None,
    ) -> None:
        """``verified_only=False``: run capture options the architecture matrix has not verified for
        this model type (the matrix itself, which produces the verdicts); ``batch``: the sequences
        of a bulk job's micro-batch (else the spec's prompts, tokenized here); ``layer_positions``: a
        layer shard's part of the exported layers (positions in the layout; :meth:`run_passes`
        captures those only)."""
        self.spec, self.lm, self.writer, self.hooks = spec, lm, writer, hooks
        self.capture = spec.capture.resolved()
        self.timings: dict[str, float] = {"load_model": lm.load_s}
        tok = lm.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.pad_id = int(pad) if pad is not None else 0
        self.batch = batch
        self.prompt_ids = batch.prompt_ids if batch else tokenize(spec, tok, lm.facts.max_positions)
        self.texts = batch.texts if batch else list(spec.inline_prompts)
        facts = lm.facts
        check_spec_for_model(spec, facts, verified_only=verified_only)
        self.layout: BundleLayout = layout_for_job(spec, facts, [len(p) for p in self.prompt_ids])
        every = range(len(self.layout.layers))
        positions = every if layer_positions is None else layer_positions
        if not positions or positions.step != 1 or not set(positions) <= set(every):
            raise ValueError(f"layer positions {positions} are not a run of the {len(every)} exported layers")
        self.part: tuple[int, ...] = tuple(self.layout.layers[i] for i in positions)
        self.layer_shard = layer_positions is not None
        # the last model layer a forward pass needs (None: all, for the logits)
        self.last_layer: int | None = max(self.part) if self.part != self.layout.layers else None
        if self.capture.top_heads is not None:
            longest = max(len(p) for p in self.prompt_ids) + spec.generation.max_new_tokens
            if longest < self.capture.summary_params.min_keys:
                raise InvalidJobSpec(
                    f"detail=top_heads ranks heads by metrics of rows with at least "
                    f"{self.capture.summary_params.min_keys} visible keys (4 × (sink + local window)), "
                    f"but the longest sequence has {longest} tokens: use a longer prompt or lower "
                    "capture.summary_params.local_window"
                )
        self.generated: list[list[int]] = [[] for _ in self.prompt_ids]
        self.alternatives = (
            AlternativesCollector(self.layout.batch, self.layout.positions, self.layout.alternatives_k)
            if self.layout.alternatives
            else None
        )
        self.metrics: Any = None
        if self.layout.summary:
            from worker.capture.metrics import HeadMetricsAccumulator

            self.metrics = HeadMetricsAccumulator(
                len(self.layout.layers),
                self.layout.batch,
                len(self.layout.heads),
                self.capture.summary_params,
            )
        self.kv: KVExport | None = None
        if spec.kv_compression:
            self.kv = KVExport(list(spec.kv_compression), self.layout, facts.num_heads, facts.num_kv_heads)
        self.top_head_index: np.ndarray | None = None
        # derived attention: per-layer scaling/window (from the calls) and chunk size (from the config)
        self.attention_facts = AttentionFacts(self.layout, layer_chunks(lm.model.config, self.layout.layers))
        self.generation_checks: dict[str, dict[str, Any]] = {}
        self.induction: np.ndarray | None = None
        self._supports_logits_to_keep = "logits_to_keep" in inspect.signature(lm.model.forward).parameters
        self._cache_argument = cache_argument(lm.model)
        self._check_cancel = True
        self.hidden_layers = self.layout.layers if self.layout.hidden_states else ()
        self.certifier = Certifier(
            self.layout.layers if batch is None else micro_batch_layers(self.layout.layers, batch.index),
            str(lm.dtype).replace("torch.", ""),
            provenance(lm),
            derived_chunks=self.attention_facts.chunk_of() if self.layout.derived_attention else None,
        )

    @property
    def passes(self) -> int:
        """Forward passes over each exported layer: the prefill, one per generated token, the
        top-heads pass and the induction probe (the progress units of a layer)."""
        extra = int(bool(self.layout.top_heads)) + int(self.capture.induction_probe is not None)
        return 1 + self.spec.generation.max_new_tokens + extra

    def base_attrs(self, job_id: str) -> dict[str, Any]:
        """Root attributes known before the first chunk (the rest are written last)."""
        return root_attrs(job_id, self.spec, self.lm, self.capture, self.layout, self.attention_facts)

    # -- running -------------------------------------------------------------------------------
    def _forward(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        pos: torch.Tensor,
        cache: Any,
        *,
        use_cache: bool = False,
        all_logits: bool = False,
    ) -> tuple[torch.Tensor, Any]:
        """Logits (the last position's unless ``all_logits``) and the KV cache the model returns:
        the model makes its own cache on the first pass (hybrid and recurrent models keep state
        of their own kind in it)."""
        extra: dict[str, Any] = (
            {"logits_to_keep": 0 if all_logits else 1} if self._supports_logits_to_keep else {}
        )
        extra[self._cache_argument] = cache
        try:
            out = self.lm.model(
                input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=use_cache, **extra
            )
        except LayersDone:  # a layer shard's layers all ran; it generates nothing (no logits needed)
            return torch.empty(0), None
        logits: torch.Tensor = out.logits if all_logits else out.logits[:, -1]
        return logits, returned_cache(out)

    def _one_pass(self, session: ExportSession, batch: Batch) -> None:
        """One forward pass over whole sequences (no cache) under ``session``: every row at once."""
        with torch.inference_mode(), capturing(session), stop_after_layer(self.lm.model, self.last_layer):
            session.begin_step(0, [True] * len(batch.pads))
            pos = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
            self._forward(batch.input_ids, batch.attention_mask, pos, cache=None)

    def _write_blocks(self, blocks: list[RowBlock]) -> None:
        self.writer.write_row_blocks(blocks)
        if self._check_cancel:
            self.hooks.check_cancelled()

    def run(self, job_id: str) -> dict[str, Any]:
        return self.write_finish(self.run_until_finish(job_id)())

    def run_until_finish(self, job_id: str) -> Callable[[], PreparedFinish]:
        """:meth:`run` up to its writes: every forward pass (row blocks queued) and the part of
        :meth:`prepare_finish` that needs the tokenizer; returns the rest, which waits for the
        device's figures (the metrics, the kv compression, the certificate), for the caller to run
        on any thread before :meth:`write_finish` (a bulk job, on its drain thread, while the next
        micro-batch's passes are queued). On a cancel the bundle is finished as partial here and
        JobCancelled raised."""
        started = time.perf_counter()
        try:
            self.run_passes(job_id)
        except JobCancelled:  # keep what was captured: the blocks were flushed, mark it partial
            self.finish(started=started, partial=True)
            raise
        passes_queued = mark_queued(self.lm.device)  # the device part waits for it, on its own
        try:
            t0 = time.perf_counter()
            device_part = self._prepare_host(started=started, partial=False)
            self.timings["finish_host"] = time.perf_counter() - t0
        except BaseException:
            self.writer.close()  # chunks already queued are stored and recorded (partial data)
            raise

        def prepared() -> PreparedFinish:
            try:
                with after_mark(passes_queued) as waited_s:  # not behind the next micro-batch's passes
                    self.timings["finish_wait"] = waited_s  # for the passes' device work still queued
                    return device_part()
            except BaseException:
                self.writer.close()
                raise

        return prepared

    def run_passes(self, job_id: str) -> None:
        """Create the bundle's arrays (a layer shard opens them) and run every forward pass,
        streaming the captured rows (of :attr:`part`'s layers). On a cancel the captured blocks
        are flushed before JobCancelled propagates; on any other error the writer is closed
        (queued chunks stored and recorded)."""
        lm, layout = self.lm, self.layout
        setup_from = time.perf_counter()  # the passes' setup: arrays, batch, session, hooks
        if self.layer_shard:  # the planner created the arrays; the other shards write into them
            self.writer.open(layout)
        else:
            self.writer.create(layout, self.base_attrs(job_id))
        batch = make_batch(self.prompt_ids, self.pad_id, lm.device)
        session = ExportSession(
            layout,
            self.capture,
            batch.pads,
            [len(p) for p in self.prompt_ids],
            self._write_blocks,
            on_layer_done=self.hooks.unit_done,
            observer=self.metrics,
            kv=self.kv,
            certifier=self.certifier,
            layers=self.part,
        )
        units = len(self.part) * self.passes
        try:
            with (
                torch.inference_mode(),
                capturing(self.attention_facts.wrap(session)),
                hidden_state_hooks(lm.model, self.part if layout.hidden_states else (), session.on_hidden),
                stop_after_layer(lm.model, self.last_layer),
            ):
                self._generate(batch, session, units, setup_from)
            t0 = time.perf_counter()
            session.flush()
            self.timings["passes_end"] = time.perf_counter() - t0  # the last partial blocks
            if layout.top_heads:
                self._top_heads_pass()
            if self.capture.induction_probe is not None:
                self._induction_pass()
            self._generation_checks(batch)
        except JobCancelled:
            self._check_cancel = False
            session.flush()
            raise
        except BaseException:
            self.writer.close()  # chunks already queued are stored and recorded (partial data)
            raise

    def _generate(self, batch: Batch, session: ExportSession, units: int, setup_from: float) -> None:
        gen = self.spec.generation
        # prompt only: no KV cache (at 131K tokens an 8B model's cache alone is 17 GB)
        use_cache = gen.max_new_tokens > 0
        mask = batch.attention_mask
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        self.hooks.phase("prefill", units_total=units)
        t0 = time.perf_counter()
        self.timings["passes_setup"] = t0 - setup_from
        session.begin_step(0, [True] * len(batch.pads))
        prompt_alts = self.alternatives is not None and self.capture.prompt_alternatives
        logits, cache = self._forward(
            batch.input_ids, mask, pos, None, use_cache=use_cache, all_logits=prompt_alts
        )
        if prompt_alts:
            self._record_prompt_alternatives(batch, logits)
            logits = logits[:, -1]
        self.timings["prefill"] = time.perf_counter() - t0
        self.timings["prefill_capture_host"] = prefill_host = session.host_s
        t0 = time.perf_counter()
        if gen.max_new_tokens:
            self.hooks.phase("decoding")
        chosen: list[tuple[torch.Tensor, list[bool]]] = []  # each step's tokens (on the device), who made one
        try:
            self._decode(batch, session, logits, cache, chosen)
        except JobCancelled:  # keep the tokens generated so far (the bundle is finished as partial)
            self._take_generated(chosen)
            raise
        self._take_generated(chosen)
        self.timings["decode"] = time.perf_counter() - t0
        self.timings["decode_capture_host"] = session.host_s - prefill_host

    def _decode(
        self,
        batch: Batch,
        session: ExportSession,
        logits: torch.Tensor,
        cache: Any,
        chosen: list[tuple[torch.Tensor, list[bool]]],
    ) -> None:
        """The decoding steps after the prefill's ``logits`` and ``cache``: each step's tokens go to
        ``chosen``, read on the host once at the end (:meth:`_take_generated`) unless stopping at
        EOS needs them at every step (plain batched decoding waits for no token either)."""
        gen = self.spec.generation
        generator = torch.Generator(device=self.lm.device).manual_seed(gen.seed) if gen.do_sample else None
        eos = eos_ids(self.lm.tokenizer, self.lm.model) if gen.stop_at_eos else set()
        mask = batch.attention_mask
        pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, -1:]
        done = [False] * len(batch.pads)
        width = batch.input_ids.shape[1]
        for step in range(gen.max_new_tokens):
            next_ids = choose_next(logits, gen, generator)
            active = [not d for d in done]
            if eos:  # whether a sequence goes on depends on this step's token: read them now
                done = [d or token in eos for d, token in zip(done, next_ids.tolist(), strict=True)]
            for b in range(len(active)):
                if not active[b]:
                    next_ids[b] = batch.pad_id
                elif self.alternatives is not None:
                    position = torch.tensor([len(self.prompt_ids[b]) + step])
                    self.alternatives.record(b, position, logits[b : b + 1], next_ids[b : b + 1])
            chosen.append((next_ids, active))
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            pos = pos + 1
            stop = self._stop_requested()  # a cancel lands within one decoding step
            last = stop is not None or all(done) or step + 1 == gen.max_new_tokens
            # feed the new token back: its row and q/k/v (the summary's rows may wait for the last step)
            session.begin_step(width + step, active, rows_wait=not last)
            logits, cache = self._forward(next_ids[:, None], mask, pos, cache, use_cache=True)
            if stop is not None:
                raise stop
            if last:
                break

    def _take_generated(self, chosen: list[tuple[torch.Tensor, list[bool]]]) -> None:
        """The tokens of ``chosen``'s steps into :attr:`generated` (one read from the device)."""
        if not chosen:
            return
        tokens = torch.stack([ids for ids, _ in chosen]).tolist()  # [steps, B]
        for step_tokens, (_, active) in zip(tokens, chosen, strict=True):
            for b, token in enumerate(step_tokens):
                if active[b]:
                    self.generated[b].append(int(token))
        chosen.clear()

    def _stop_requested(self) -> JobCancelled | LeaseLost | None:
        """The cancel or lost lease the hooks report, if any (raised after one more decoding step:
        its calls observe the summary rows that waited for it)."""
        try:
            self.hooks.check_cancelled()
        except (JobCancelled, LeaseLost) as stop:
            return stop
        return None

    def _record_prompt_alternatives(self, batch: Batch, logits: torch.Tensor) -> None:
        assert self.alternatives is not None
        for b, (pad, prompt) in enumerate(zip(batch.pads, self.prompt_ids, strict=True)):
            if len(prompt) > 1:  # logits at position p predict the token at p + 1
                positions = torch.arange(1, len(prompt))
                actual = torch.tensor(prompt[1:], device=logits.device)
                self.alternatives.record(b, positions, logits[b, pad : pad + len(prompt) - 1], actual)

    def _top_heads_pass(self) -> None:
        """Second pass over the final tokens: attention of the chosen heads of each layer."""
        assert self.metrics is not None and self.capture.top_heads is not None
        self.hooks.phase("top_heads")
        chosen = choose_top_heads(self.metrics.result(), self.layout, self.capture.top_heads)
        self.top_head_index = np.asarray(chosen, dtype=np.int32)
        sequences = [p + g for p, g in zip(self.prompt_ids, self.generated, strict=True)]
        batch = make_batch(sequences, self.pad_id, self.lm.device)
        session = ExportSession(
            self.layout,
            self.capture,
            batch.pads,
            [len(p) for p in self.prompt_ids],
            self._write_blocks,
            on_layer_done=self.hooks.unit_done,
            attention_heads=chosen,
            store_qkv=False,
            store_hidden=False,
            layers=self.part,
        )
        t0 = time.perf_counter()
        self._one_pass(session, batch)
        session.flush()
        self.timings["top_heads_pass"] = time.perf_counter() - t0

    def _generation_checks(self, batch: Batch) -> None:
        """kv_compression entries with check_generation: greedy decoding from the compressed cache."""
        from worker.kvcheck import agreement, greedy_tokens

        gen = self.spec.generation
        checks = [m for m in self.spec.kv_compression if m.check_generation]
        if not checks or not gen.max_new_tokens:
            return
        self.hooks.phase("kv_generation_check")
        exact = self.generated
        if gen.do_sample or gen.stop_at_eos:  # compare against the exact greedy run, every step
            exact = greedy_tokens(self.lm.model, batch, None, gen.max_new_tokens)
        for method in checks:
            generated = greedy_tokens(self.lm.model, batch, method, gen.max_new_tokens)
            self.generation_checks[method.name] = agreement(generated, exact)

    def _induction_pass(self) -> None:
        """The optional induction probe: one forward pass over a repeated random sequence."""
        from worker.capture.induction import InductionObserver, probe_tokens

        probe = self.capture.induction_probe
        assert probe is not None
        self.hooks.phase("induction_probe")
        tok, model = self.lm.tokenizer, self.lm.model
        prefix = [int(tok.bos_token_id)] if tok.bos_token_id is not None else []
        tokens = probe_tokens(probe, int(model.config.vocab_size), set(tok.all_special_ids), prefix)
        observer = InductionObserver(
            len(self.layout.layers), len(self.layout.heads), len(prefix), probe.length
        )
        session = ExportSession(
            self.layout,
            self.capture,
            [0],
            [len(tokens)],
            self._write_blocks,
            on_layer_done=self.hooks.unit_done,
            observer=observer,
            store_attention=False,
            store_qkv=False,
            store_hidden=False,
            layers=self.part,
        )
        batch = make_batch([tokens], self.pad_id, self.lm.device)
        self._one_pass(session, batch)
        self.induction = observer.scores()

    def finish(self, started: float, partial: bool) -> dict[str, Any]:
        """Write everything but the row blocks and mark the bundle complete (or partial): the
        token arrays, summary and kv groups, then the root's attributes once every queued chunk
        is stored (:meth:`prepare_finish` then :meth:`write_finish`)."""
        return self.write_finish(self.prepare_finish(started, partial))

    def prepare_finish(self, started: float, partial: bool) -> PreparedFinish:
        """What :meth:`finish` writes, as numpy arrays and attributes; nothing is written. A bulk
        job computes it in two parts (:meth:`run_until_finish`) and writes it on its drain thread
        while the next micro-batch's forward passes run (worker/bulk.py)."""
        return self._prepare_host(started, partial)()

    def _prepare_host(self, started: float, partial: bool) -> Callable[[], PreparedFinish]:
        """:meth:`prepare_finish`'s tokenizer part, on the forward thread (the tokenizer is not
        shared between threads; the token ids are on the host); returns its device part (the
        metrics, the kv compression, the certificate: torch only, any thread)."""
        self.hooks.phase("finalizing")
        layout, tok = self.layout, self.lm.tokenizer
        tokens = np.full((layout.batch, layout.positions), -1, dtype=np.int32)
        lengths, prompt_lengths, token_strings, generated_texts = [], [], [], []
        strings: dict[int, str] = {}  # each distinct token decoded once
        for b, (prompt, generated) in enumerate(zip(self.prompt_ids, self.generated, strict=True)):
            seq = prompt + generated
            tokens[b, : len(seq)] = seq
            lengths.append(len(seq))
            prompt_lengths.append(len(prompt))
            for t in set(seq) - strings.keys():
                strings[t] = tok.decode([t])
            token_strings.append([strings[t] for t in seq])
            generated_texts.append(tok.decode(generated, skip_special_tokens=True))
        arrays: dict[str, np.ndarray] = {
            "tokens": tokens,
            "length": np.asarray(lengths, dtype=np.int32),
            "prompt_length": np.asarray(prompt_lengths, dtype=np.int32),
        }
        if self.batch is not None:
            arrays["sequence"] = np.asarray(self.batch.sequences, dtype=np.int64)
            arrays["source_row"] = np.asarray(self.batch.source_rows, dtype=np.int64)
        if layout.attention and layout.query_rows is not None:
            query_position = np.full((layout.batch, layout.query_rows), -1, dtype=np.int32)
            for b, length in enumerate(lengths):
                kept = [p for p in range(length) if self.capture.keeps_row(p, prompt_lengths[b])]
                query_position[b, : len(kept)] = kept
            arrays["query_position"] = query_position
        if layout.attention and self.top_head_index is not None:
            arrays["top_head_index"] = self.top_head_index
        arrays.update(self.attention_facts.arrays())
        if self.alternatives is not None:
            arrays.update(self.alternatives.arrays(tok))
        texts = {"prompts": self.texts, "generated": generated_texts}
        tokenized = _Tokenized(arrays, lengths, prompt_lengths, token_strings, texts)
        return lambda: self._prepare_device(started, partial, tokenized)

    @torch.inference_mode()  # the tensors were made in it (this may run on another thread)
    def _prepare_device(self, started: float, partial: bool, tokenized: _Tokenized) -> PreparedFinish:
        """:meth:`prepare_finish`'s device part: the summary, the kv compression, the certificate
        (each waits for the device), then the attributes."""
        layout, arrays, lengths = self.layout, tokenized.arrays, tokenized.lengths
        prompt_lengths, texts = tokenized.prompt_lengths, tokenized.texts
        groups: dict[str, dict[str, tuple[tuple[str, ...], np.ndarray]]] = {}
        summary_attrs: dict[str, Any] = {}
        if self.metrics is not None:
            groups["summary"], summary_attrs = summary_arrays(
                self.metrics.result(),
                self.induction,
                layout,
                self.capture.summary_params,
                self.lm.facts.num_heads,
                self.lm.facts.num_kv_heads,
                self.capture.induction_probe.threshold if self.capture.induction_probe else 0.4,
            )
        kv_status: dict[str, Any] = {}
        kv_groups: dict[str, dict[str, tuple[tuple[str, ...], np.ndarray]]] = {}
        if self.kv is not None and not partial:
            self.hooks.phase("kv_compression")
            t0 = time.perf_counter()
            kv_groups, kv_status = self.kv.finish()
            for name, check in self.generation_checks.items():
                kv_status[name]["generation_check"] = check
            self.timings["kv_compression"] = time.perf_counter() - t0
        self.timings["total"] = time.perf_counter() - started + self.timings.get("load_model", 0.0)
        summary = {
            "lengths": lengths,
            "prompt_lengths": prompt_lengths,
            "generated": texts["generated"],
            "timings_s": {k: round(v, 4) for k, v in self.timings.items()},
            **({"summary": summary_attrs} if summary_attrs else {}),
            **({"kv_compression": kv_status} if kv_status else {}),
        }
        attrs = {
            "token_strings": tokenized.token_strings,
            "texts": texts,
            "attention_rows": lengths,
            "certificate": self.certifier.certificate(),
            "timings_s": summary["timings_s"],
            **({"summary": summary_attrs} if summary_attrs else {}),
            **({"kv_compression": kv_status} if kv_status else {}),
        }
        return PreparedFinish(arrays, groups, kv_groups, kv_status, attrs, summary, partial)

    def write_finish(
        self, prepared: PreparedFinish, before_complete: Callable[[], None] | None = None
    ) -> dict[str, Any]:
        """Write what :meth:`prepare_finish` computed (numpy and the writer only: any thread), wait
        for every queued chunk, call ``before_complete``, then write the attributes that mark the
        bundle complete (or partial). Returns the export's summary. On an error the writer is
        closed (the chunks already queued are stored and recorded; not when the store itself
        fails) and the error raised: the bundle is not marked complete."""
        writer = self.writer
        try:
            for name, data in prepared.arrays.items():
                writer.write_array(name, data)
            for name, arrays in prepared.groups.items():
                writer.write_group(name, arrays)
            for name, arrays in prepared.kv_groups.items():  # kv_status: the stored sizes
                status = prepared.kv_status[name]
                records = writer.write_group(f"kv/{name}", arrays, per_layer_batch=True)
                stored = sum(r.nbytes for r in records if "/fidelity_" not in r.key)
                status["stored_bytes"] = stored
                status["stored_ratio"] = round(status["fp16_bytes"] / max(stored, 1), 4)
                writer.group[f"kv/{name}"].update_attributes(status)
            writer.finalize(
                prepared.attrs,
                complete=not prepared.partial,
                partial=prepared.partial,
                before_complete=before_complete,
            )
        except StoreError:
            # the store is failing: closing would make each queued chunk wait out its retry budget
            # (minutes); the next attempt resumes from the chunks recorded
            raise
        except BaseException:
            writer.close()
            raise
        return prepared.summary
