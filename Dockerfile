# asynq-sidecar: the sidecar (`serve`), the launcher (`run -- CMD`) and `sweep` in one image,
# plus the static Go launcher at /usr/local/bin/asynq-launch for worker images to copy:
#   COPY --from=asynq-sidecar:0.1.0 /usr/local/bin/asynq-launch /usr/local/bin/asynq-launch
#
#   docker build -t asynq-sidecar:0.1.0 \
#     --build-arg REVISION="$(git rev-parse HEAD)" \
#     --build-arg CREATED="$(date -u +%Y-%m-%dT%H:%M:%SZ)" .
#
# Runs as UID/GID 10001 and works with a read-only root filesystem: nothing is written outside
# /run/asynq-sidecar (the lifecycle socket's directory, a volume: an emptyDir in Kubernetes,
# shared with the worker container). docs/deploy.md explains the Kubernetes manifests.

ARG PYTHON_IMAGE=python:3.12-slim-bookworm
ARG GO_IMAGE=golang:1.24-bookworm

# ---------------------------------------------------------------- builder
# The package and its dependencies, resolved from the ranges in pyproject.toml, into a venv
# that the final stage copies whole. Every dependency ships wheels: no compiler is needed.
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN python -m venv /opt/asynq-sidecar
WORKDIR /src
COPY pyproject.toml README.md ./
COPY exporter/ exporter/
# A regular (not editable) install, so the venv needs nothing from /src. pip compiles the
# bytecode here: the read-only final image never has to write any.
RUN /opt/asynq-sidecar/bin/pip install --no-cache-dir .

# ---------------------------------------------------------------- launcher
# The Go launcher (go/cmd/asynq-launch, standard library only): CGO off makes it one static
# file that runs in any image, scratch included. It needs none of the module's requirements,
# so nothing is downloaded.
FROM ${GO_IMAGE} AS launcher
WORKDIR /src
COPY go/ ./
RUN CGO_ENABLED=0 go build -trimpath -ldflags="-s -w" -o /out/asynq-launch ./cmd/asynq-launch

# ---------------------------------------------------------------- final
FROM ${PYTHON_IMAGE}
ARG PYTHON_IMAGE
ARG VERSION=0.1.0
ARG REVISION=""
ARG CREATED=""
LABEL org.opencontainers.image.title="asynq-sidecar" \
      org.opencontainers.image.description="Observability sidecar and Prometheus exporter for Asynq workers: shutdown metrics, registration hygiene, leak cleanup" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"

# PYTHONDONTWRITEBYTECODE: the root filesystem is read-only, never try to write .pyc files.
ENV PATH=/opt/asynq-sidecar/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# A numeric, non-root user (runAsNonRoot can verify a number, not a name) and the socket's
# directory, writable by that user and its group only (workers join the group: fsGroup).
RUN groupadd --system --gid 10001 asynq-sidecar \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin asynq-sidecar \
 && install -d -o 10001 -g 10001 -m 0770 /run/asynq-sidecar

COPY --from=builder /opt/asynq-sidecar /opt/asynq-sidecar
COPY --from=launcher /out/asynq-launch /usr/local/bin/asynq-launch

USER 10001:10001
VOLUME ["/run/asynq-sidecar"]
EXPOSE 10050

# For Docker and Compose (Kubernetes ignores it and uses the probes in deploy/kubernetes/).
# python, not curl: the slim base has no curl. The port follows ASYNQ_SIDECAR_LISTEN.
# Worker images take only /usr/local/bin/asynq-launch from this one (COPY --from), not this check.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('ASYNQ_SIDECAR_LISTEN', '0.0.0.0:10050').rpartition(':')[2]; urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=4)"]

ENTRYPOINT ["asynq-sidecar"]
CMD ["serve"]
