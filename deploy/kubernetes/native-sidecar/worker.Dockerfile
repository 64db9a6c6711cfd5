# A worker image for native-sidecar/: your Go worker built as a static binary on distroless
# static (no libc, no shell, no Python), plus the static Go launcher copied from the sidecar
# image, which starts the worker and reports its life to the sidecar's socket.
#
#   docker build -f deploy/kubernetes/native-sidecar/worker.Dockerfile \
#     --build-arg SIDECAR_IMAGE=registry.example.com/asynq-sidecar:0.1.0 \
#     -t registry.example.com/asynq-worker-with-launcher:1.0.0 path/to/your/worker
#
# The context is your worker's module (go.mod, go.sum, ./cmd/worker). The result runs as
# distroless's nonroot user (UID 65532) with a read-only root filesystem. Any other base works
# the same way, scratch included: the launcher is one static file.

ARG SIDECAR_IMAGE=registry.example.com/asynq-sidecar:0.1.0

# Only a source for COPY --from: the launcher lives at a fixed path in the sidecar image.
FROM ${SIDECAR_IMAGE} AS sidecar

FROM golang:1.24-bookworm AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
# Static (CGO off): the binary needs nothing from the image it lands in.
RUN CGO_ENABLED=0 go build -trimpath -ldflags="-s -w" -o /out/worker ./cmd/worker

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=sidecar /usr/local/bin/asynq-launch /usr/local/bin/asynq-launch
COPY --from=build /out/worker /worker
# The same command as the Deployment's, so `docker run` behaves as the pod does.
ENTRYPOINT ["/usr/local/bin/asynq-launch", "--socket", "/run/asynq-sidecar/lifecycle.sock", "--", "/worker"]
CMD []
