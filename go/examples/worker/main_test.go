package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hibiken/asynq"

	"github.com/asynq-sidecar/asynq-sidecar/go/internal/redistest"
	"github.com/asynq-sidecar/asynq-sidecar/go/internal/sidecartest"
)

// bin is the worker, built once for all tests.
var bin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "worker-test")
	if err != nil {
		panic(err)
	}
	bin = filepath.Join(dir, "worker")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "go build: %v\n%s", err, out)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// processed waits until the queue default has processed n tasks; it returns when that was seen.
func processed(t *testing.T, redis string, n int) time.Time {
	t.Helper()
	inspector := asynq.NewInspector(asynq.RedisClientOpt{Addr: redis})
	defer inspector.Close()
	deadline := time.Now().Add(10 * time.Second)
	for {
		if info, err := inspector.GetQueueInfo("default"); err == nil && info.Processed >= n {
			return time.Now()
		}
		if time.Now().After(deadline) {
			t.Fatalf("the worker did not process %d tasks", n)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestWorkerServesAndReportsItsLife(t *testing.T) {
	redis := redistest.Start(t)
	sidecar := sidecartest.Listen(t, filepath.Join(t.TempDir(), "lifecycle.sock"))
	cmd := exec.Command(bin, "--redis", redis.Addr, "--concurrency", "2", "--enqueue", "3",
		"--task-sleep", "10ms", "--shutdown-timeout", "2s")
	cmd.Env = append(os.Environ(), "ASYNQ_SIDECAR_SOCKET="+sidecar.Path)
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	conn := sidecar.Accept()
	if hello := conn.Next(t); hello["pid"] != float64(cmd.Process.Pid) || hello["shutdown_timeout"] != 2.0 {
		t.Errorf("hello = %v; want pid %d, shutdown_timeout 2", hello, cmd.Process.Pid)
	}
	if got := conn.Events(t, 2); strings.Join(got, ",") != "ready,registered" {
		t.Errorf("events %v", got)
	}
	processed(t, redis.Addr, 3)
	cmd.Process.Signal(syscall.SIGTERM)
	if got := conn.Events(t, 2); strings.Join(got, ",") != "stopping,bye" {
		t.Errorf("events %v", got)
	}
	if err := cmd.Wait(); err != nil {
		t.Errorf("the worker exited: %v", err)
	}
}

func TestWorkerWithoutSidecarStartsAtOnce(t *testing.T) {
	redis := redistest.Start(t)
	cmd := exec.Command(bin, "--redis", redis.Addr, "--enqueue", "1", "--task-sleep", "0s")
	cmd.Env = append(os.Environ(), "ASYNQ_SIDECAR_SOCKET="+filepath.Join(t.TempDir(), "nobody.sock"))
	start := time.Now()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	if d := processed(t, redis.Addr, 1).Sub(start); d > time.Second {
		t.Errorf("the first task was done %v after the start", d)
	}
	cmd.Process.Signal(syscall.SIGTERM)
	if err := cmd.Wait(); err != nil {
		t.Errorf("the worker exited: %v", err)
	}
}

func TestWorkerRejectsBadFlags(t *testing.T) {
	for _, args := range [][]string{{"--concurrency", "0"}, {"--enqueue", "-1"}, {"--task-sleep", "x"},
		{"--shutdown-timeout", "0s"}, {"extra"}} {
		out, err := exec.Command(bin, args...).CombinedOutput()
		if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 2 || !strings.Contains(string(out), strings.TrimPrefix(args[0], "-")) {
			t.Errorf("%v: %v\n%s", args, err, out)
		}
	}
}

// docs/protocol.md shows this worker: its excerpt must be this file's code, verbatim, so that
// the docs never show code that does not build.
func TestProtocolDocShowsThisCode(t *testing.T) {
	doc, err := os.ReadFile(filepath.Join("..", "..", "..", "docs", "protocol.md"))
	if err != nil {
		t.Fatal(err)
	}
	src, err := os.ReadFile("main.go")
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, block := range strings.Split(string(doc), "```go\n")[1:] {
		code := block[:strings.Index(block, "```")]
		if strings.Contains(code, "asynqsidecar.NewServer(redis") {
			found = true
			if !strings.Contains(string(src), code) {
				t.Errorf("docs/protocol.md shows code that is not in examples/worker/main.go:\n%s", code)
			}
		}
	}
	if !found {
		t.Error("docs/protocol.md no longer shows the example worker")
	}
}
