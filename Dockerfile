# Two images from one source, running the same `graft` commands as the Makefile:
#   docker build --target api    -t graft-api .     # graft api, graft db upgrade, flower
#   docker build --target worker -t graft-worker .  # graft worker, on a CUDA runtime
# Both run as an unprivileged user and keep nothing but /data (temporary files, S3 cache).
#
# Build arguments (the defaults are what production uses):
#   API_BASE, WORKER_BASE  base images; any Debian/Ubuntu image with python3 (>= 3.11)
#   TORCH_INDEX_URL        where the API image takes torch from: PyTorch's CPU-only wheels, so
#                          the API carries no CUDA libraries (it only loads weights to check a
#                          registration and answers the quick /predict on the CPU)
#   PIP_ARGS               extra pip arguments for every install, e.g. an offline wheelhouse:
#                          "--no-index --find-links http://127.0.0.1:8765/" (tests/docker)
ARG API_BASE=python:3.11-slim
ARG WORKER_BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

FROM ${API_BASE} AS api
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PIP_ARGS=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
RUN python3 -m venv /opt/graft \
 && /opt/graft/bin/pip install $PIP_ARGS --index-url "$TORCH_INDEX_URL" torch torchvision
COPY pyproject.toml README.md alembic.ini /src/
COPY engine /src/engine
COPY core /src/core
COPY app /src/app
COPY worker /src/worker
COPY migrations /src/migrations
COPY graft /src/graft
RUN /opt/graft/bin/pip install $PIP_ARGS "/src[production,hf,keras]" \
 && useradd --create-home --uid 10001 graft && mkdir /data && chown graft /data
ENV PATH=/opt/graft/bin:$PATH GRAFT_DATA_DIR=/data GRAFT_HOST=0.0.0.0
USER graft
WORKDIR /data
EXPOSE 8000
HEALTHCHECK --interval=5s --start-period=60s \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz')"
CMD ["graft", "api"]

FROM ${WORKER_BASE} AS worker
ARG PIP_ARGS=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
# The CUDA runtime images carry no Python; a base that has python3 and venv is used as it is.
RUN python3 -c "import ensurepip, venv" 2>/dev/null || ( \
    apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/* )
# torch from the package index: the CUDA build, with its CUDA libraries as wheels (a layer of
# its own, so that a change to Graft's code does not reinstall it)
RUN python3 -m venv /opt/graft && /opt/graft/bin/pip install $PIP_ARGS torch torchvision
COPY --from=api /src /src
RUN /opt/graft/bin/pip install $PIP_ARGS "/src[hf,keras]" \
 && useradd --create-home --uid 10001 graft && mkdir /data && chown graft /data
ENV PATH=/opt/graft/bin:$PATH GRAFT_DATA_DIR=/data
USER graft
WORKDIR /data
# SIGTERM hands the running job back to the queue; give it time to stop between steps.
STOPSIGNAL SIGTERM
CMD ["graft", "worker"]
