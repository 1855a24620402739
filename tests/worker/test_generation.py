"""Token choice: greedy, seeded sampling (reproducible), top-k / top-p filtering."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from storage.inputs import MAX_SEED
from storage.jobs.spec import GenerationSpec
from worker.export import choose_next
from worker.generation import returned_cache

from .export_helpers import export


def test_greedy_is_argmax_and_top_k_1_sampling_equals_greedy() -> None:
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    greedy = choose_next(logits, GenerationSpec(), None)
    assert torch.equal(greedy, logits.argmax(-1))
    sampled = choose_next(logits, GenerationSpec(do_sample=True, top_k=1), torch.Generator().manual_seed(3))
    assert torch.equal(sampled, greedy)


def test_the_spec_seed_bound_is_what_torch_takes() -> None:
    """generation.seed is refused past MAX_SEED at submission (422): torch takes exactly 0..2**64-1."""
    assert torch.Generator().manual_seed(MAX_SEED).initial_seed() == MAX_SEED
    with pytest.raises((RuntimeError, ValueError), match="Overflow"):
        torch.Generator().manual_seed(MAX_SEED + 1)
    assert GenerationSpec(seed=MAX_SEED).seed == MAX_SEED
    with pytest.raises(ValidationError, match="less than or equal to 18446744073709551615"):
        GenerationSpec(seed=MAX_SEED + 1)


def test_top_p_keeps_only_the_nucleus() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    spec = GenerationSpec(do_sample=True, top_p=0.7)
    seen = {int(choose_next(logits, spec, torch.Generator().manual_seed(s))) for s in range(200)}
    assert seen == {0, 1}  # 0.5 + 0.3 reaches 0.7; tokens 2 and 3 are never drawn


def _sampled_tokens(folder: str, seed: int, out: Path) -> list[int]:
    spec: dict[str, Any] = {
        "model": {"id": folder},
        "prompts": ["seeded"],
        "generation": {
            "max_new_tokens": 12,
            "do_sample": True,
            "temperature": 1.5,
            "seed": seed,
            "stop_at_eos": False,
        },
        "capture": {"attention": True, "layers": [0]},
    }
    ds, _, _ = export(spec, out)
    return ds["tokens"][0, : int(ds["length"][0])].values.tolist()


def test_sampling_is_reproducible_with_its_seed(tiny_model_dir: Any, tmp_path: Path) -> None:
    folder = str(tiny_model_dir("llama"))
    first = _sampled_tokens(folder, 7, tmp_path / "a.zarr")
    again = _sampled_tokens(folder, 7, tmp_path / "b.zarr")
    other = _sampled_tokens(folder, 8, tmp_path / "c.zarr")
    assert first == again
    assert first != other


@pytest.mark.parametrize("cancel_at_check", [None, 2])
def test_every_decoding_step_but_the_last_lets_rows_wait(
    tiny_model_dir: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cancel_at_check: int | None
) -> None:
    """The loop tells the session whether another step follows (the summary's rows may wait for it,
    worker/capture/waiting_rows.py): every decoding step but the last. A cancel seen before a step
    makes that step the last one, run (its calls observe the waiting rows), then the job stops."""
    from storage.errors import JobCancelled
    from worker.capture.session import ExportSession

    from .conftest import CollectingHooks

    flags: list[bool] = []
    real = ExportSession.begin_step

    def spy(self: ExportSession, q_start: int, active: Any, *, rows_wait: bool = False) -> None:
        flags.append(rows_wait)
        real(self, q_start, active, rows_wait=rows_wait)

    monkeypatch.setattr(ExportSession, "begin_step", spy)
    spec = {
        "model": {"id": str(tiny_model_dir("llama"))},
        "prompts": ["hello there", "hi"],
        "generation": {"max_new_tokens": 4, "stop_at_eos": False},
        "capture": {"detail": "summary"},
    }
    hooks = CollectingHooks(cancel_after_blocks=cancel_at_check)
    if cancel_at_check is None:
        export(spec, tmp_path / "b.zarr", hooks=hooks)
        assert flags == [False, True, True, True, False]  # the prefill, then 4 steps
    else:
        with pytest.raises(JobCancelled):
            export(spec, tmp_path / "b.zarr", hooks=hooks)
        assert flags == [False, True, False]  # the cancel seen at step 1's check: step 1 is the last


@pytest.mark.parametrize("use_cache", [False, True])
def test_the_returned_cache_is_read_by_its_declared_name(
    tiny_model_dir: Any, use_cache: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without ``use_cache`` the output has no cache (``None``) and no deprecated name is asked for
    (transformers would log its ``past_key_values`` warning on every micro-batch)."""
    import transformers
    from transformers.utils import generic

    warned: list[str] = []
    monkeypatch.setattr(generic.logger, "warning_once", lambda message, *a, **k: warned.append(str(message)))
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama")).eval()
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([[1, 2, 3]]), use_cache=use_cache, logits_to_keep=1)
    cache = returned_cache(out)
    assert (cache is not None) is use_cache
    if use_cache:
        assert cache.get_seq_length() == 3
    assert not [message for message in warned if "deprecated" in message]
