# One image for `graft api`, `graft worker` and `graft db upgrade` (first version: CPU torch
# from PyPI; the worker's CUDA runtime image comes with the production configuration).
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md alembic.ini ./
COPY app app
COPY worker worker
COPY migrations migrations
RUN python -m venv /opt/graft && /opt/graft/bin/pip install .

FROM python:3.11-slim
RUN useradd --create-home --uid 10001 graft && mkdir /data && chown graft /data
COPY --from=build /opt/graft /opt/graft
ENV PATH=/opt/graft/bin:$PATH PYTHONUNBUFFERED=1 GRAFT_DATA_DIR=/data GRAFT_HOST=0.0.0.0
USER graft
WORKDIR /data
EXPOSE 8000
HEALTHCHECK CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz')"
CMD ["graft", "serve"]
