# syntax=docker/dockerfile:1
# API image (also runs the one-shot `migrate` and `s3-init` services): FastAPI + Celery client,
# no torch, no transformers. Build from the repository root:
#   docker build -f docker/api.Dockerfile -t qkvault-api .
ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN groupadd --system --gid 10001 qkvault \
 && useradd --system --uid 10001 --gid qkvault --create-home --home-dir /home/qkvault qkvault

WORKDIR /app
# Only what the package needs (keeps .venv, .git and caches out of the build).
COPY pyproject.toml README.md ./
COPY storage ./storage
COPY api ./api
COPY worker ./worker
COPY qkvault ./qkvault
RUN pip install ".[api]" \
 && python -c "import importlib.util as u, sys; sys.exit('torch must not be in the API image' if u.find_spec('torch') else 0)" \
 && rm -rf /app/build /app/*.egg-info

USER qkvault
EXPOSE 8000
# --timeout-graceful-shutdown: open event streams (GET /v1/jobs/{id}/events) would hold a SIGTERM for up to an hour
CMD ["uvicorn", "api.app:create_app", "--factory", "--host", "0.0.0.0", "--port", "8000", "--proxy-headers", \
     "--timeout-graceful-shutdown", "5"]
