# The worker image for bundled/ only: the whole sidecar runs in the worker's container
# (`asynq-sidecar run --serve`), so this image is the sidecar image (Python) plus your Go worker.
# For the two-container modes the worker image needs no Python: ../native-sidecar/worker.Dockerfile.
#
#   docker build -f deploy/kubernetes/bundled/worker.Dockerfile \
#     --build-arg SIDECAR_IMAGE=registry.example.com/asynq-sidecar:0.1.0 \
#     -t registry.example.com/asynq-worker-bundled:1.0.0 path/to/your/worker
#
# The context is your worker's module (go.mod, go.sum, ./cmd/worker). The result runs as the
# sidecar image's UID 10001 with a read-only root filesystem, like the sidecar.

ARG SIDECAR_IMAGE=registry.example.com/asynq-sidecar:0.1.0

FROM golang:1.24-bookworm AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
# Static (CGO off): the binary needs nothing from the image it lands in.
RUN CGO_ENABLED=0 go build -trimpath -ldflags="-s -w" -o /out/worker ./cmd/worker

FROM ${SIDECAR_IMAGE}
COPY --from=build /out/worker /worker
# The Deployment's command (run --serve) serves /metrics and has probes; a plain `docker run`
# of this image is the launcher without --serve, which serves no HTTP: no Docker health check.
HEALTHCHECK NONE
ENTRYPOINT ["asynq-sidecar", "run", "--socket", "/run/asynq-sidecar/lifecycle.sock", "--", "/worker"]
CMD []
