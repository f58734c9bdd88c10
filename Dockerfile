# syntax=docker/dockerfile:1
# Two images from one source, running the same `graft` commands as the Makefile:
#   docker build --target api    -t graft-api .     # graft api, graft db upgrade, flower
#   docker build --target worker -t graft-worker .  # graft worker, on a CUDA runtime
# Both run as an unprivileged user and keep nothing but /data (temporary files, S3 cache).

FROM python:3.11-slim AS api
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
COPY pyproject.toml README.md alembic.ini /src/
COPY app /src/app
COPY worker /src/worker
COPY migrations /src/migrations
COPY graft /src/graft
RUN python -m venv /opt/graft && /opt/graft/bin/pip install "/src[production]" \
 && useradd --create-home --uid 10001 graft && mkdir /data && chown graft /data
ENV PATH=/opt/graft/bin:$PATH GRAFT_DATA_DIR=/data GRAFT_HOST=0.0.0.0
USER graft
WORKDIR /data
EXPOSE 8000
HEALTHCHECK CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz')"
CMD ["graft", "api"]

FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 AS worker
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
COPY --from=api /src /src
RUN python3 -m venv /opt/graft && /opt/graft/bin/pip install /src \
 && useradd --create-home --uid 10001 graft && mkdir /data && chown graft /data
ENV PATH=/opt/graft/bin:$PATH GRAFT_DATA_DIR=/data
USER graft
WORKDIR /data
# SIGTERM hands the running job back to the queue; give it time to stop between steps.
STOPSIGNAL SIGTERM
CMD ["graft", "worker"]
