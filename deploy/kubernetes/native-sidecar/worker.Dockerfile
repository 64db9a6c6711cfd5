# A worker image that contains the launcher, for native-sidecar/ and bundled/: your Go worker
# built as a static binary, on top of the asynq-sidecar image (Python and `asynq-sidecar run`).
#
#   docker build -f deploy/kubernetes/native-sidecar/worker.Dockerfile \
#     --build-arg SIDECAR_IMAGE=registry.example.com/asynq-sidecar:0.1.0 \
#     -t registry.example.com/asynq-worker-with-launcher:1.0.0 path/to/your/worker
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
# The launcher serves no HTTP, so the sidecar image's /healthz check does not apply here.
HEALTHCHECK NONE
# The same command as the Deployment's, so `docker run` behaves as the pod does. Setting
# ENTRYPOINT drops the base image's CMD ["serve"]; the empty CMD says so explicitly.
ENTRYPOINT ["asynq-sidecar", "run", "--socket", "/run/asynq-sidecar/lifecycle.sock", "--", "/worker"]
CMD []
