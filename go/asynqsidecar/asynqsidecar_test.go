package asynqsidecar

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hibiken/asynq"

	"github.com/asynq-sidecar/asynq-sidecar/go/internal/redistest"
	"github.com/asynq-sidecar/asynq-sidecar/go/internal/sidecartest"
)

// These tests send real signals to the test process: Run's signal.Notify turns them into events
// instead of ending the process. They run one at a time (no t.Parallel).

// logs is an asynq.Logger that keeps every line, so tests can wait for one.
type logs struct {
	t       testing.TB
	mu      sync.Mutex
	lines   []string
	changed chan struct{}
}

func newLogs(t testing.TB) *logs { return &logs{t: t, changed: make(chan struct{})} }

func (l *logs) add(level string, args ...any) {
	line := level + ": " + fmt.Sprint(args...)
	l.mu.Lock()
	l.lines = append(l.lines, line)
	close(l.changed)
	l.changed = make(chan struct{})
	l.mu.Unlock()
}

func (l *logs) Debug(args ...any) { l.add("DEBUG", args...) }
func (l *logs) Info(args ...any)  { l.add("INFO", args...) }
func (l *logs) Warn(args ...any)  { l.add("WARN", args...) }
func (l *logs) Error(args ...any) { l.add("ERROR", args...) }
func (l *logs) Fatal(args ...any) { l.add("FATAL", args...) }

// count is the number of lines containing text.
func (l *logs) count(text string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	for _, line := range l.lines {
		if strings.Contains(line, text) {
			n++
		}
	}
	return n
}

// wait blocks until a line contains text; it fails the test after sidecartest.Wait.
func (l *logs) wait(text string) {
	l.t.Helper()
	timeout := time.After(sidecartest.Wait)
	for {
		l.mu.Lock()
		changed := l.changed
		l.mu.Unlock()
		if l.count(text) > 0 {
			return
		}
		select {
		case <-changed:
		case <-timeout:
			l.mu.Lock()
			defer l.mu.Unlock()
			l.t.Fatalf("no log line with %q; got:\n%s", text, strings.Join(l.lines, "\n"))
		}
	}
}

type fixture struct {
	redis   *redistest.Server
	sidecar *sidecartest.Sidecar
	logs    *logs
	srv     *Server
	done    chan error
}

// start runs a Server on a private Redis, reporting to a fake sidecar, until Run returns.
func start(t *testing.T, h asynq.Handler) *fixture {
	t.Helper()
	f := &fixture{redis: redistest.Start(t), logs: newLogs(t), done: make(chan error, 1)}
	f.sidecar = sidecartest.Listen(t, filepath.Join(t.TempDir(), "lifecycle.sock"))
	f.srv = NewServer(asynq.RedisClientOpt{Addr: f.redis.Addr},
		asynq.Config{Concurrency: 2, ShutdownTimeout: 3 * time.Second, Logger: f.logs},
		WithSocket(f.sidecar.Path))
	go func() { f.done <- f.srv.Run(h) }()
	return f
}

func (f *fixture) inspector(t *testing.T) *asynq.Inspector {
	i := asynq.NewInspector(asynq.RedisClientOpt{Addr: f.redis.Addr})
	t.Cleanup(func() { i.Close() })
	return i
}

// returned waits for Run to return and gives its error.
func (f *fixture) returned(t *testing.T) error {
	t.Helper()
	select {
	case err := <-f.done:
		return err
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return")
		return nil
	}
}

func signalSelf(t *testing.T, sig syscall.Signal) {
	t.Helper()
	if err := syscall.Kill(os.Getpid(), sig); err != nil {
		t.Fatal(err)
	}
}

func expect(t *testing.T, got map[string]any, want map[string]any) {
	t.Helper()
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%v: %q = %v, want %v", got, k, got[k], v)
		}
	}
}

func TestRunReportsEveryStepAndSaysByeOnceDeregistered(t *testing.T) {
	started, release := make(chan struct{}, 1), make(chan struct{})
	f := start(t, asynq.HandlerFunc(func(ctx context.Context, task *asynq.Task) error {
		started <- struct{}{}
		<-release
		return nil
	}))
	conn := f.sidecar.Accept()
	host, _ := os.Hostname()
	expect(t, conn.Next(t), map[string]any{"event": "hello", "protocol": 1.0, "pid": float64(os.Getpid()),
		"host": host, "shutdown_timeout": 3.0})
	expect(t, conn.Next(t), map[string]any{"event": "ready"})
	registered := conn.Next(t)
	expect(t, registered, map[string]any{"event": "registered"})

	servers, err := f.inspector(t).Servers()
	if err != nil || len(servers) != 1 {
		t.Fatalf("Servers() = %v, %v; want this one", servers, err)
	}
	if s := servers[0]; registered["server_id"] != s.ID || s.PID != os.Getpid() || s.Host != host {
		t.Errorf("registered %v; asynq lists %s:%d:%s", registered["server_id"], s.Host, s.PID, s.ID)
	}
	if f.srv.ServerID() != servers[0].ID {
		t.Errorf("ServerID() = %q, want %q", f.srv.ServerID(), servers[0].ID)
	}

	// A task in flight, SIGTERM, and a second SIGTERM during the drain.
	client := asynq.NewClient(asynq.RedisClientOpt{Addr: f.redis.Addr})
	defer client.Close()
	if _, err := client.Enqueue(asynq.NewTask("sleep", nil)); err != nil {
		t.Fatal(err)
	}
	select {
	case <-started:
	case <-time.After(sidecartest.Wait):
		t.Fatal("the task did not start")
	}
	signalSelf(t, syscall.SIGTERM)
	expect(t, conn.Next(t), map[string]any{"event": "stopping", "signal": "SIGTERM"})
	f.logs.wait("Starting graceful shutdown")
	signalSelf(t, syscall.SIGTERM)
	f.logs.wait("SIGTERM received again: already shutting down")
	close(release)

	expect(t, conn.Next(t), map[string]any{"event": "bye"})
	conn.Closed(t)
	if err := f.returned(t); err != nil {
		t.Errorf("Run returned %v", err)
	}
	if n := f.logs.count("Starting graceful shutdown"); n != 1 {
		t.Errorf("asynq's Shutdown ran %d times, want once", n)
	}
	if servers, err := f.inspector(t).Servers(); err != nil || len(servers) != 0 {
		t.Errorf("after Run: Servers() = %v, %v; want none", servers, err)
	}
}

func TestSIGTSTPStopsFetchingAndDoesNotStopTheWorker(t *testing.T) {
	f := start(t, asynq.HandlerFunc(func(context.Context, *asynq.Task) error { return nil }))
	conn := f.sidecar.Accept()
	if got := conn.Events(t, 3); strings.Join(got, ",") != "hello,ready,registered" {
		t.Fatalf("events %v", got)
	}
	signalSelf(t, syscall.SIGTSTP)
	f.logs.wait("Processor stopped") // asynq's srv.Stop() ran, and this process was not frozen
	signalSelf(t, syscall.SIGINT)
	expect(t, conn.Next(t), map[string]any{"event": "stopping", "signal": "SIGINT"})
	expect(t, conn.Next(t), map[string]any{"event": "bye"})
	if err := f.returned(t); err != nil {
		t.Errorf("Run returned %v", err)
	}
}

func TestNoByeWhenRedisCannotConfirmTheRegistrationIsGone(t *testing.T) {
	f := start(t, asynq.HandlerFunc(func(context.Context, *asynq.Task) error { return nil }))
	conn := f.sidecar.Accept()
	if got := conn.Events(t, 3); strings.Join(got, ",") != "hello,ready,registered" {
		t.Fatalf("events %v", got)
	}
	f.redis.Stop() // asynq cannot deregister, and nobody can check
	signalSelf(t, syscall.SIGTERM)
	expect(t, conn.Next(t), map[string]any{"event": "stopping"})
	conn.Closed(t) // no bye: the sidecar counts the worker lost and cleans up
	if err := f.returned(t); err != nil {
		t.Errorf("Run returned %v", err)
	}
	f.logs.wait("not saying bye")
}

func TestStartErrorIsReturnedWithoutReady(t *testing.T) {
	f := &fixture{redis: redistest.Start(t), logs: newLogs(t)}
	f.sidecar = sidecartest.Listen(t, filepath.Join(t.TempDir(), "lifecycle.sock"))
	srv := NewServer(asynq.RedisClientOpt{Addr: f.redis.Addr}, asynq.Config{Logger: f.logs}, WithSocket(f.sidecar.Path))
	h := asynq.HandlerFunc(func(context.Context, *asynq.Task) error { return nil })
	if err := srv.Asynq().Start(h); err != nil {
		t.Fatal(err)
	}
	defer srv.Asynq().Shutdown()
	if err := srv.Run(h); err == nil || !strings.Contains(err.Error(), "already running") {
		t.Errorf("Run on a running server returned %v", err)
	}
	conn := f.sidecar.Accept()
	expect(t, conn.Next(t), map[string]any{"event": "hello", "shutdown_timeout": 8.0})
	conn.Closed(t)
}
