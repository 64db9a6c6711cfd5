// Command asynqpeer is a plain asynq worker that the Python tests run as a real peer of the
// sidecar: built from the Go module proxy at several asynq versions, it registers in Redis exactly
// as a user's worker does, because it is one.
//
// Modes (--mode):
//
//	run      srv.Run(mux), as users write it: asynq's own signal loop and a graceful Shutdown.
//	race     go srv.Run(mux) plus a second signal handler that calls srv.Shutdown() and returns
//	         from main: asynq issue #979. When Run's goroutine wins the server's state lock,
//	         main's Shutdown returns at once and the process exits mid-drain, leaving its
//	         registration in Redis.
//	inspect  print asynq's own Inspector view of every server as JSON, and exit.
//
// On stdout, for the tests: "ready PID SERVER_ID" once its registration is in Redis, "busy N" once
// N handlers run at the same time (N = --concurrency), and, as the last line before a clean
// exit, "exit registered=true|false": whether its registration was still in Redis at that moment
// (nothing in the process can remove it afterwards, so true is a leak).
//
// With --runs KEY, every start of a handler is recorded in Redis, RPUSH KEY "TASK_ID SERVER_ID
// RETRIED UNIX_MS" (RETRIED: asynq's retry count of this run, 0 the first time), so that a test
// can tell which server ran a task, how often, and when. With --hold KEY a handler runs until
// the key KEY exists (or its context ends) instead of for --task-sleep. --retry-delay sets the
// server's RetryDelayFunc (a task asynq retries is due again after that long) and --poll its
// TaskCheckInterval and DelayedTaskCheckInterval (how soon a due retry is moved to pending and
// dequeued): with both small, a task asynq's recoverer retries runs again at once.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log"
	"os"
	"os/signal"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hibiken/asynq"
	"github.com/redis/go-redis/v9"
)

func main() {
	mode := flag.String("mode", "run", "run, race or inspect")
	addr := flag.String("redis", "127.0.0.1:6379", "Redis address")
	queues := flag.String("queue", "default", "the queue to enqueue into and serve; or NAME=WEIGHT,... (tasks go to the first)")
	strict := flag.Bool("strict", false, "asynq Config.StrictPriority")
	concurrency := flag.Int("concurrency", 2, "asynq Config.Concurrency")
	enqueue := flag.Int("enqueue", 0, "enqueue this many sleep tasks before serving")
	taskSleep := flag.Duration("task-sleep", time.Second, "how long a sleep task runs (less when cancelled)")
	shutdownTimeout := flag.Duration("shutdown-timeout", time.Second, "asynq Config.ShutdownTimeout")
	runs := flag.String("runs", "", "RPUSH each handler start to this Redis list (none when empty)")
	hold := flag.String("hold", "", "a handler runs until this Redis key exists, not for --task-sleep")
	retryDelay := flag.String("retry-delay", "", "asynq Config.RetryDelayFunc returns this duration (asynq's default when empty)")
	poll := flag.Duration("poll", 0, "asynq Config.TaskCheckInterval and DelayedTaskCheckInterval (asynq's defaults when 0)")
	flag.Parse()
	log.SetFlags(0)
	log.SetPrefix("asynqpeer: ")

	opt := asynq.RedisClientOpt{Addr: *addr}
	if *mode == "inspect" {
		if err := inspect(opt); err != nil {
			log.Fatal(err)
		}
		return
	}
	if *mode != "run" && *mode != "race" {
		log.Fatalf("--mode must be run, race or inspect, not %q", *mode)
	}
	weights, first, err := parseQueues(*queues)
	if err != nil {
		log.Fatal(err)
	}
	queue := &first
	cfg := asynq.Config{
		Concurrency:              *concurrency,
		Queues:                   weights,
		StrictPriority:           *strict,
		ShutdownTimeout:          *shutdownTimeout,
		LogLevel:                 asynq.WarnLevel,
		TaskCheckInterval:        *poll,
		DelayedTaskCheckInterval: *poll,
	}
	if *retryDelay != "" {
		d, err := time.ParseDuration(*retryDelay)
		if err != nil || d < 0 {
			log.Fatalf("--retry-delay: not a duration >= 0: %q", *retryDelay)
		}
		cfg.RetryDelayFunc = func(int, error, *asynq.Task) time.Duration { return d }
	}
	if *enqueue > 0 {
		client := asynq.NewClient(opt)
		for i := 0; i < *enqueue; i++ {
			if _, err := client.Enqueue(asynq.NewTask("sleep", nil), asynq.Queue(*queue)); err != nil {
				log.Fatalf("enqueue: %v", err)
			}
		}
		client.Close()
	}

	rdb := redis.NewClient(&redis.Options{Addr: *addr})
	defer rdb.Close()
	host, _ := os.Hostname()
	prefix := fmt.Sprintf("asynq:servers:{%s:%d:", host, os.Getpid())
	var member, serverID string
	known := make(chan struct{}) // closed once member and serverID are set
	// A twin (the same host and pid in another PID namespace) may be registered already: this
	// server's registration is the one that was not there before it started.
	before, err := withPrefix(rdb, prefix)
	if err != nil {
		log.Fatal(err)
	}
	go func() {
		m, err := waitRegistered(rdb, prefix, before)
		if err != nil {
			log.Fatal(err)
		}
		member = m
		serverID = strings.TrimSuffix(strings.TrimPrefix(member, prefix), "}")
		close(known)
		fmt.Println("ready", os.Getpid(), serverID)
	}()

	var running atomic.Int32
	mux := asynq.NewServeMux()
	mux.HandleFunc("sleep", func(ctx context.Context, _ *asynq.Task) error {
		if *runs != "" {
			if err := record(ctx, rdb, *runs, known, &serverID); err != nil {
				return err
			}
		}
		if running.Add(1) == int32(*concurrency) {
			fmt.Println("busy", *concurrency)
		}
		defer running.Add(-1)
		if *hold != "" {
			return holdUntil(ctx, rdb, *hold)
		}
		select {
		case <-time.After(*taskSleep):
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	})
	srv := asynq.NewServer(opt, cfg)

	if *mode == "run" {
		if err := srv.Run(mux); err != nil {
			log.Fatal(err)
		}
	} else {
		// Both this handler and Run's own loop get the signal; whichever takes the server's
		// state lock first does the Shutdown, the other returns at once.
		sigs := make(chan os.Signal, 1)
		signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
		go func() {
			if err := srv.Run(mux); err != nil {
				log.Fatal(err)
			}
		}()
		<-sigs
		srv.Shutdown()
	}
	left := false
	select {
	case <-known:
		if left, err = registered(rdb, member); err != nil {
			log.Fatal(err)
		}
	default: // it never registered: nothing of it is left
	}
	fmt.Printf("exit registered=%t\n", left)
}

// record appends "TASK_ID SERVER_ID RETRIED UNIX_MS" for the run starting now to the list key,
// once this server's id is known (its first beat comes before its first task, or just after).
func record(ctx context.Context, rdb *redis.Client, key string, known <-chan struct{}, serverID *string) error {
	started := time.Now()
	id, _ := asynq.GetTaskID(ctx)
	retried, _ := asynq.GetRetryCount(ctx)
	select {
	case <-known:
	case <-ctx.Done():
		return ctx.Err()
	}
	line := fmt.Sprintf("%s %s %d %d", id, *serverID, retried, started.UnixMilli())
	return rdb.RPush(ctx, key, line).Err()
}

// holdUntil returns once the key exists in Redis, or with the context's error when it ends first.
func holdUntil(ctx context.Context, rdb *redis.Client, key string) error {
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		n, err := rdb.Exists(ctx, key).Result()
		if err == nil && n > 0 {
			return nil
		}
		select {
		case <-tick.C:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// parseQueues reads "NAME" or "NAME=WEIGHT,NAME=WEIGHT"; the first name is where tasks go.
func parseQueues(spec string) (map[string]int, string, error) {
	weights := map[string]int{}
	first := ""
	for _, part := range strings.Split(spec, ",") {
		name, w, found := strings.Cut(part, "=")
		weight := 1
		if found {
			if _, err := fmt.Sscanf(w, "%d", &weight); err != nil || weight < 1 {
				return nil, "", fmt.Errorf("--queue: bad weight in %q", part)
			}
		}
		if name == "" {
			return nil, "", fmt.Errorf("--queue: empty queue name in %q", spec)
		}
		if first == "" {
			first = name
		}
		weights[name] = weight
	}
	return weights, first, nil
}

// withPrefix lists the members of asynq:servers that start with prefix.
func withPrefix(rdb *redis.Client, prefix string) (map[string]bool, error) {
	members, err := rdb.ZRange(context.Background(), "asynq:servers", 0, -1).Result()
	if err != nil {
		return nil, err
	}
	found := map[string]bool{}
	for _, m := range members {
		if strings.HasPrefix(m, prefix) {
			found[m] = true
		}
	}
	return found, nil
}

// waitRegistered polls asynq:servers until a member of this host and pid that is not in before
// appears; two new ones at once (twins started together) cannot be told apart: an error.
func waitRegistered(rdb *redis.Client, prefix string, before map[string]bool) (string, error) {
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		found, err := withPrefix(rdb, prefix)
		if err != nil {
			return "", err
		}
		var fresh []string
		for m := range found {
			if !before[m] {
				fresh = append(fresh, m)
			}
		}
		switch len(fresh) {
		case 0:
		case 1:
			return fresh[0], nil
		default:
			return "", fmt.Errorf("registrations %v appeared at once: which is this server's is unknown", fresh)
		}
		time.Sleep(5 * time.Millisecond)
	}
	return "", errors.New("no registration in asynq:servers after 10s")
}

// registered reads asynq:servers directly, not through the Inspector: listing servers with the
// Inspector also removes other servers' expired members, which is the sidecar's job under test.
func registered(rdb *redis.Client, member string) (bool, error) {
	_, err := rdb.ZScore(context.Background(), "asynq:servers", member).Result()
	if errors.Is(err, redis.Nil) {
		return false, nil
	}
	return err == nil, err
}

type workerJSON struct {
	TaskID   string   `json:"task_id"`
	TaskType string   `json:"task_type"`
	Queue    string   `json:"queue"`
	Started  [2]int64 `json:"started"`
	Deadline [2]int64 `json:"deadline"`
}

type serverJSON struct {
	ID             string         `json:"id"`
	Host           string         `json:"host"`
	PID            int            `json:"pid"`
	Concurrency    int            `json:"concurrency"`
	Queues         map[string]int `json:"queues"`
	StrictPriority bool           `json:"strict_priority"`
	Status         string         `json:"status"`
	Started        [2]int64       `json:"started"`
	ActiveWorkers  []workerJSON   `json:"active_workers"`
}

// unix is a time as [Unix seconds, nanoseconds], the two fields of the protobuf Timestamp.
func unix(t time.Time) [2]int64 { return [2]int64{t.Unix(), int64(t.Nanosecond())} }

func inspect(opt asynq.RedisClientOpt) error {
	inspector := asynq.NewInspector(opt)
	defer inspector.Close()
	servers, err := inspector.Servers()
	if err != nil {
		return err
	}
	out := make([]serverJSON, 0, len(servers))
	for _, s := range servers {
		j := serverJSON{ID: s.ID, Host: s.Host, PID: s.PID, Concurrency: s.Concurrency,
			Queues: s.Queues, StrictPriority: s.StrictPriority, Status: s.Status,
			Started: unix(s.Started), ActiveWorkers: []workerJSON{}}
		for _, w := range s.ActiveWorkers {
			j.ActiveWorkers = append(j.ActiveWorkers, workerJSON{TaskID: w.TaskID, TaskType: w.TaskType,
				Queue: w.Queue, Started: unix(w.Started), Deadline: unix(w.Deadline)})
		}
		out = append(out, j)
	}
	return json.NewEncoder(os.Stdout).Encode(out)
}
