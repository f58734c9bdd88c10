# Stand-ins for the images docker-compose.yml pulls (postgres, redis, minio), built from Debian
# packages for machines that cannot reach an image registry. Used by compose.test.yml only.
ARG BASE=graft-base:bookworm

FROM ${BASE} AS postgres
RUN apt-get update && apt-get install -y --no-install-recommends postgresql-15 \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /var/lib/postgresql/data /var/run/postgresql \
 && chown -R postgres /var/lib/postgresql /var/run/postgresql
COPY postgres-standin.sh /usr/local/bin/postgres-standin
ENV PATH=/usr/lib/postgresql/15/bin:$PATH
USER postgres
CMD ["postgres-standin"]

FROM ${BASE} AS redis
RUN apt-get update && apt-get install -y --no-install-recommends redis-server redis-tools \
 && rm -rf /var/lib/apt/lists/* && mkdir /data
WORKDIR /data
CMD ["redis-server", "--bind", "0.0.0.0", "--protected-mode", "no"]

FROM ${BASE} AS s3
ARG PIP_ARGS=""
RUN python3 -m venv /opt/moto && /opt/moto/bin/pip install $PIP_ARGS "moto[server]>=5.0"
ENV PATH=/opt/moto/bin:$PATH
CMD ["moto_server", "-H", "0.0.0.0", "-p", "9000"]
