# syntax=docker/dockerfile:1
# GPU worker image: the official PyTorch CUDA runtime image + `.[worker,quant]` (transformers, celery,
# s3fs, SQLAlchemy; bitsandbytes for model.quantization). The base image's torch is kept: pip sees it
# installed and does not replace it.
# Build from the repository root:
#   docker build -f docker/worker.Dockerfile -t qkvault-worker .
ARG PYTORCH_IMAGE=pytorch/pytorch:2.11.0-cuda12.8-cudnn9-runtime
FROM ${PYTORCH_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    QKVAULT_MODEL_CACHE_DIR=/var/lib/qkvault/models \
    HF_HOME=/var/lib/qkvault/hf

RUN groupadd --system --gid 10001 qkvault \
 && useradd --system --uid 10001 --gid qkvault --create-home --home-dir /home/qkvault qkvault \
 && mkdir -p /var/lib/qkvault/models /var/lib/qkvault/hf \
 && chown -R qkvault:qkvault /var/lib/qkvault

WORKDIR /app
COPY pyproject.toml README.md ./
COPY storage ./storage
COPY api ./api
COPY worker ./worker
COPY qkvault ./qkvault
# Pin the base image's torch so that resolving `.[worker]` can never swap the CUDA build.
RUN python -c "import torch; print(f'torch=={torch.__version__}')" > /tmp/constraints.txt \
 && pip install -c /tmp/constraints.txt ".[worker,quant]" \
 && python -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)" \
 && rm -rf /tmp/constraints.txt /app/build /app/*.egg-info

USER qkvault
VOLUME ["/var/lib/qkvault"]
# One worker process per GPU, concurrency 1 (see worker/app.py); config from QKVAULT_* variables.
CMD ["python", "-m", "worker"]
