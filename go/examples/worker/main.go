// Command worker is a complete asynq worker that reports its life to asynq-sidecar through the
// drop-in package asynqsidecar. It serves tasks of type "sleep", which take --task-sleep each.
//
//	worker [--redis ADDR] [--concurrency N] [--enqueue N] [--task-sleep D] [--shutdown-timeout D]
//
// The sidecar's socket comes from ASYNQ_SIDECAR_SOCKET (default /run/asynq-sidecar/lifecycle.sock).
// Without a sidecar it serves as fast as a plain asynq worker; only its exit waits up to 1 s
// more, trying to deliver the last lifecycle events.
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"os"
	"time"

	"github.com/hibiken/asynq"

	"github.com/asynq-sidecar/asynq-sidecar/go/asynqsidecar"
)

func main() {
	redisAddr := flag.String("redis", "127.0.0.1:6379", "`HOST:PORT` of the Redis server")
	concurrency := flag.Int("concurrency", 10, "tasks processed at once")
	enqueue := flag.Int("enqueue", 0, "enqueue `N` tasks of type sleep into the queue default before serving")
	taskSleep := flag.Duration("task-sleep", time.Second, "how long each sleep task takes")
	shutdownTimeout := flag.Duration("shutdown-timeout", 8*time.Second, "how long a shutdown waits for tasks in flight")
	flag.Parse()
	switch {
	case flag.NArg() > 0:
		usageError("unexpected argument %q", flag.Arg(0))
	case *concurrency < 1:
		usageError("--concurrency: invalid value %d: must be at least 1", *concurrency)
	case *enqueue < 0:
		usageError("--enqueue: invalid value %d: must be 0 or more", *enqueue)
	case *taskSleep < 0:
		usageError("--task-sleep: invalid value %v: must be 0 or more", *taskSleep)
	case *shutdownTimeout <= 0:
		usageError("--shutdown-timeout: invalid value %v: must be more than 0", *shutdownTimeout)
	}
	redis := asynq.RedisClientOpt{Addr: *redisAddr}

	if err := enqueueSleeps(redis, *enqueue); err != nil {
		log.Fatalf("enqueueing %d tasks: %v", *enqueue, err)
	}

	mux := asynq.NewServeMux()
	mux.HandleFunc("sleep", func(ctx context.Context, _ *asynq.Task) error {
		select {
		case <-time.After(*taskSleep):
			return nil
		case <-ctx.Done(): // the shutdown timeout ran out: asynq requeues the task
			return ctx.Err()
		}
	})

	// asynqsidecar.NewServer instead of asynq.NewServer; Run as always.
	srv := asynqsidecar.NewServer(redis, asynq.Config{
		Concurrency:     *concurrency,
		ShutdownTimeout: *shutdownTimeout,
	})
	if err := srv.Run(mux); err != nil {
		log.Fatal(err)
	}
}

// enqueueSleeps puts n tasks of type sleep into the queue default.
func enqueueSleeps(redis asynq.RedisConnOpt, n int) error {
	if n == 0 {
		return nil
	}
	client := asynq.NewClient(redis)
	defer client.Close()
	for range n {
		if _, err := client.Enqueue(asynq.NewTask("sleep", nil), asynq.Queue("default")); err != nil {
			return err
		}
	}
	return nil
}

func usageError(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "worker: "+format+"\n", args...)
	flag.Usage()
	os.Exit(2)
}
