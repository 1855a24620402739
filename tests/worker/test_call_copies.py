"""A layer call's q/k and hidden-state rows go to the host in one copy for the whole (micro-)batch;
each sequence's row blocks are views of it, released together, and handed to the writer together
(worker/capture/session.py)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from storage.bundle.rowblocks import RowBlock
from storage.jobs.layout import layout_for_job
from storage.jobs.spec import JobSpec
from storage.models.facts import ModelFacts
from worker.capture.hook import AttentionCall
from worker.capture.hostcopy import HostBlock, shared_views
from worker.capture.session import ExportSession

FACTS = ModelFacts("llama", 2, 4, 2, 8, hidden_size=32)


def test_shared_views_release_the_buffer_after_the_last_one() -> None:
    released: list[int] = []
    host = HostBlock(np.arange(24).reshape(2, 3, 4), release=lambda: released.append(1))
    first, second = shared_views(host, [host.array[0], host.array[1, 1:]])
    assert first.array.tolist() == host.array[0].tolist() and second.array.shape == (2, 4)
    first.release()  # type: ignore[misc]
    assert not released
    second.release()  # type: ignore[misc]
    assert released == [1]


def test_one_host_copy_per_array_and_layer_call_whatever_the_batch(monkeypatch: Any) -> None:
    lengths = [5, 9, 7]
    spec = JobSpec.model_validate(
        {
            "model": {"id": "tiny"},
            "prompts": ["x"] * len(lengths),
            "generation": {"max_new_tokens": 0},
            "capture": {"attention": "derived", "hidden_states": True},
        }
    )
    layout = layout_for_job(spec, FACTS, lengths)
    width = max(lengths)
    pads = [width - n for n in lengths]
    written: dict[tuple[str, int, int, int], np.ndarray] = {}
    handed_over: list[set[tuple[str, int]]] = []  # (array, layer) of each hand-over's blocks

    def write(blocks: list[RowBlock]) -> None:
        handed_over.append({(block.name, block.layer_pos) for block in blocks})
        for block in blocks:
            written[(block.name, block.layer_pos, block.batch, block.block)] = np.array(block.data)
            if block.release is not None:
                block.release()

    session = ExportSession(layout, spec.capture.resolved(), pads, lengths, write)
    copies: list[tuple[int, ...]] = []
    host = session._host

    def counted(tensor: torch.Tensor) -> HostBlock:
        copies.append(tuple(tensor.shape))
        return host(tensor)

    monkeypatch.setattr(session, "_host", counted)
    torch.manual_seed(0)
    session.begin_step(0, [True] * len(lengths))
    calls = []
    for layer in range(FACTS.num_layers):
        q = torch.randn(len(lengths), FACTS.num_heads, width, FACTS.head_dim)
        k = torch.randn(len(lengths), FACTS.num_kv_heads, width, FACTS.head_dim)
        session.on_attention(AttentionCall(layer, q, k, torch.randn_like(k), None, 0.35, None))
        hidden = torch.randn(len(lengths), width, FACTS.hidden_size)
        session.on_hidden(layer, hidden)
        calls.append((q, k, hidden))
    session.flush()
    # q, k and the hidden states of each layer: one copy each for the three sequences
    assert len(copies) == 3 * FACTS.num_layers
    # a layer call's blocks (every sequence's q and k; then its hidden states) handed over at once
    layers = range(len(layout.layers))
    calls_blocks = [[{("q", lp), ("k", lp)}, {("hidden_states", lp)}] for lp in layers]
    assert handed_over == [blocks for pair in calls_blocks for blocks in pair]
    assert all(shape[0] == len(lengths) for shape in copies)
    dtype = np.dtype(layout.dtype("q"))
    for layer, (q, k, hidden) in enumerate(calls):
        lp = layout.layers.index(layer)
        for b, pad in enumerate(pads):  # each sequence's rows, its padding left out
            assert np.array_equal(written[("q", lp, b, 0)], q[b, :, pad:].numpy().astype(dtype))
            assert np.array_equal(written[("k", lp, b, 0)], k[b, :, pad:].numpy().astype(dtype))
            got = written[("hidden_states", lp, b, 0)]
            assert np.array_equal(got, hidden[b, pad:][None].numpy().astype(dtype))
