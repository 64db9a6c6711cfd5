module github.com/asynq-sidecar/asynq-sidecar/go

go 1.24.0
