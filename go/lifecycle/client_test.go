package lifecycle

import (
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/asynq-sidecar/asynq-sidecar/go/internal/sidecartest"
)

func socketPath(t *testing.T) string {
	return filepath.Join(t.TempDir(), "lifecycle.sock")
}

// fixedClock returns t0, t0+1s, t0+2s, ... one per call.
func fixedClock(t0 time.Time) func() time.Time {
	var mu sync.Mutex
	n := 0
	return func() time.Time {
		mu.Lock()
		defer mu.Unlock()
		n++
		return t0.Add(time.Duration(n-1) * time.Second)
	}
}

var quiet = Options{Logf: func(string, ...any) {}}

// mustBeQuick fails when f takes longer than recording could on a busy machine: waiting for a
// sidecar (a dial, a backoff step, a write) for each event would take far longer.
func mustBeQuick(t *testing.T, what string, f func()) {
	t.Helper()
	start := time.Now()
	f()
	if d := time.Since(start); d > 250*time.Millisecond {
		t.Errorf("%s took %v; it must return at once", what, d)
	}
}

func TestHelloLineHasEveryField(t *testing.T) {
	s := sidecartest.Listen(t, socketPath(t))
	t0 := time.Unix(1767225600, 125000000)
	c := Start(s.Path, Hello{PID: 42, Host: "worker-7d9f", ServerID: "abc-123", ShutdownTimeout: 8 * time.Second,
		StartedAt: time.Unix(1767225599, 500000000)}, Options{Logf: quiet.Logf, Now: fixedClock(t0)})
	defer c.Close(time.Second)
	got := s.Accept().Next(t)
	want := map[string]any{"event": "hello", "protocol": 1.0, "pid": 42.0, "host": "worker-7d9f",
		"server_id": "abc-123", "shutdown_timeout": 8.0, "started_at": 1767225599.5, "time": 1767225600.125}
	if len(got) != len(want) {
		t.Fatalf("hello = %v, want %v", got, want)
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("hello[%q] = %v, want %v", k, got[k], v)
		}
	}
}

func TestEncodingIsCompactOneLine(t *testing.T) {
	code := 0
	line := string(encode(wire{Event: "exited", Code: &code, Time: 1767225600.402123}))
	if want := `{"event":"exited","code":0,"time":1767225600.402123}` + "\n"; line != want {
		t.Errorf("encode = %q, want %q", line, want)
	}
	line = string(encodeHello(Hello{PID: 1, Host: "h"}, time.Unix(1767225600, 0)))
	if want := `{"event":"hello","protocol":1,"pid":1,"host":"h","time":1767225600}` + "\n"; line != want {
		t.Errorf("encodeHello = %q, want %q", line, want)
	}
}

func TestDefaultsArePidAndHostname(t *testing.T) {
	s := sidecartest.Listen(t, socketPath(t))
	c := Start(s.Path, Hello{}, quiet)
	defer c.Close(time.Second)
	got := s.Accept().Next(t)
	host, _ := os.Hostname()
	if int(got["pid"].(float64)) != syscall.Getpid() || got["host"] != host {
		t.Errorf("hello = %v; want this process's pid %d and host %q", got, syscall.Getpid(), host)
	}
	if _, ok := got["server_id"]; ok {
		t.Errorf("hello carries server_id %v; it was not given", got["server_id"])
	}
}

func TestEveryEventInOrder(t *testing.T) {
	s := sidecartest.Listen(t, socketPath(t))
	t0 := time.Unix(1767225600, 0)
	c := Start(s.Path, Hello{PID: 7, Host: "h"}, Options{Logf: quiet.Logf, Now: fixedClock(t0)})
	c.Ready()
	c.Registered("3f2a-uuid")
	c.Stopping("SIGTERM")
	c.Bye()
	if !c.Close(2 * time.Second) {
		t.Fatal("Close did not deliver everything")
	}
	if !c.Flush(time.Second) {
		t.Error("Flush after a Close that delivered everything = false")
	}
	fc := s.Accept()
	want := []map[string]any{
		{"event": "hello"},
		{"event": "ready", "time": 1767225601.0},
		{"event": "registered", "server_id": "3f2a-uuid", "time": 1767225602.0},
		{"event": "stopping", "signal": "SIGTERM", "time": 1767225603.0},
		{"event": "bye", "time": 1767225604.0},
	}
	for _, w := range want {
		got := fc.Next(t)
		for k, v := range w {
			if got[k] != v {
				t.Errorf("%v: %q = %v, want %v", got, k, got[k], v)
			}
		}
	}
	fc.Closed(t)
}

func TestExitedCarriesCodeOrSignal(t *testing.T) {
	s := sidecartest.Listen(t, socketPath(t))
	at := time.Unix(1767225700, 250000000)
	c := Start(s.Path, Hello{PID: 7, Host: "h"}, quiet)
	c.Exited(0, at)
	c.Close(2 * time.Second)
	c2 := Start(s.Path, Hello{PID: 8, Host: "h"}, quiet)
	c2.Killed("SIGKILL", at)
	c2.Close(2 * time.Second)
	fc := s.Accept()
	fc.Next(t)
	if got := fc.Next(t); got["code"] != 0.0 || got["time"] != 1767225700.25 || got["signal"] != nil {
		t.Errorf("exited = %v; want code 0 at 1767225700.25", got)
	}
	fc = s.Accept()
	fc.Next(t)
	if got := fc.Next(t); got["signal"] != "SIGKILL" || got["code"] != nil {
		t.Errorf("exited = %v; want signal SIGKILL and no code", got)
	}
}

func TestAbsentSidecarNeverBlocksAndCloseIsBounded(t *testing.T) {
	path := socketPath(t) // nothing listens
	var c *Client
	mustBeQuick(t, "Start", func() { c = Start(path, Hello{PID: 7, Host: "h"}, quiet) })
	mustBeQuick(t, "200 events", func() {
		c.Ready()
		for range 200 {
			c.Registered("x")
		}
		c.Stopping("SIGTERM")
		c.Bye()
	})
	if c.Connected() || c.Delivered() {
		t.Error("Connected or Delivered with no sidecar")
	}
	if c.Flush(30 * time.Millisecond) {
		t.Error("Flush says delivered with no sidecar")
	}
	start := time.Now()
	if c.Close(200 * time.Millisecond) {
		t.Error("Close says delivered with no sidecar")
	}
	if d := time.Since(start); d < 200*time.Millisecond || d > time.Second {
		t.Errorf("Close(200ms) took %v", d)
	}
}

func TestLateSidecarGetsTheHistoryWithTrueTimes(t *testing.T) {
	path := socketPath(t)
	t0 := time.Unix(1767225600, 0)
	failed := make(chan struct{}, 1)
	logf := func(f string, a ...any) {
		if strings.Contains(f, "not reachable") {
			failed <- struct{}{}
		}
	}
	c := Start(path, Hello{PID: 7, Host: "h"}, Options{Logf: logf, Now: fixedClock(t0)})
	defer c.Close(time.Second)
	c.Ready()
	c.Stopping("SIGINT")
	<-failed // the first attempt failed: the sidecar comes late
	s := sidecartest.Listen(t, path)
	fc := s.Accept()
	for i, name := range []string{"hello", "ready", "stopping"} {
		got := fc.Next(t)
		if got["event"] != name || got["time"] != float64(1767225600+i) {
			t.Errorf("line %d = %v; want %s at %d", i, got, name, 1767225600+i)
		}
	}
	if !c.Flush(time.Second) {
		t.Error("Flush after delivery = false")
	}
}

func TestRestartingSidecarGetsTheWholeHistoryAgain(t *testing.T) {
	path := socketPath(t)
	s := sidecartest.Listen(t, path)
	c := Start(path, Hello{PID: 7, Host: "h"}, quiet)
	defer c.Close(time.Second)
	c.Ready()
	fc := s.Accept()
	if got := fc.Events(t, 2); strings.Join(got, ",") != "hello,ready" {
		t.Fatalf("first connection: %v", got)
	}
	s.Close() // the sidecar stops: its socket file is removed, the connection closed
	c.Stopping("SIGTERM")
	s2 := sidecartest.Listen(t, path)
	fc2 := s2.Accept()
	if got := fc2.Events(t, 3); strings.Join(got, ",") != "hello,ready,stopping" {
		t.Fatalf("after the restart: %v", got)
	}
	c.Bye()
	if got := fc2.Events(t, 1); got[0] != "bye" {
		t.Fatalf("then: %v", got)
	}
}

func TestSidecarThatNeverReadsOrAcceptsDoesNotBlock(t *testing.T) {
	release := make(chan struct{})
	defer close(release)
	for _, accept := range []bool{true, false} {
		path := socketPath(t)
		ln, err := net.Listen("unix", path)
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		if accept {
			go func() {
				conn, err := ln.Accept()
				if err == nil {
					defer conn.Close()
					<-release // holds the connection, never reads
				}
			}()
		}
		var c *Client
		mustBeQuick(t, "Start and 100 events", func() {
			c = Start(path, Hello{PID: 7, Host: "h"}, quiet)
			for range 100 {
				c.Ready()
			}
			c.Bye()
		})
		start := time.Now()
		c.Close(300 * time.Millisecond)
		if d := time.Since(start); d > time.Second {
			t.Errorf("accept=%v: Close(300ms) took %v", accept, d)
		}
	}
}

func TestHistoryIsCappedButTheFinalEventFits(t *testing.T) {
	s := sidecartest.Listen(t, socketPath(t))
	var logged []string
	var mu sync.Mutex
	c := Start(s.Path, Hello{PID: 7, Host: "h"}, Options{Logf: func(f string, a ...any) {
		mu.Lock()
		logged = append(logged, f)
		mu.Unlock()
	}})
	for range 100 {
		c.Registered("x")
	}
	c.Bye()
	c.Bye() // a second final event does not fit
	if !c.Close(2 * time.Second) {
		t.Fatal("Close did not deliver")
	}
	fc := s.Accept()
	got := fc.Events(t, MaxEvents)
	fc.Closed(t)
	if got[0] != "hello" || got[MaxEvents-2] != "registered" || got[MaxEvents-1] != "bye" {
		t.Errorf("kept %v", got)
	}
	mu.Lock()
	defer mu.Unlock()
	n := 0
	for _, f := range logged {
		if strings.Contains(f, "dropped") {
			n++
		}
	}
	if n != 1 {
		t.Errorf("%d log lines about dropped events, want 1: %q", n, logged)
	}
}

func TestEventsAfterCloseAreDropped(t *testing.T) {
	s := sidecartest.Listen(t, socketPath(t))
	c := Start(s.Path, Hello{PID: 7, Host: "h"}, quiet)
	c.Close(2 * time.Second)
	c.Bye()
	fc := s.Accept()
	fc.Next(t)
	fc.Closed(t)
	if !c.Close(time.Second) {
		t.Error("a second Close says not delivered")
	}
}

func TestSignalName(t *testing.T) {
	for sig, want := range map[syscall.Signal]string{syscall.SIGTERM: "SIGTERM", syscall.SIGKILL: "SIGKILL",
		syscall.SIGTSTP: "SIGTSTP", syscall.SIGIO: "SIGIO", 34: "SIGRTMIN", 40: "SIG40"} {
		if got := SignalName(sig); got != want {
			t.Errorf("SignalName(%d) = %q, want %q", int(sig), got, want)
		}
	}
	if got := SignalName(nil); got != "" {
		t.Errorf("SignalName(nil) = %q", got)
	}
}

func TestSocketPathFromEnvironment(t *testing.T) {
	t.Setenv(SocketEnv, "")
	if got := SocketPath(); got != DefaultSocket {
		t.Errorf("SocketPath() = %q with %s empty", got, SocketEnv)
	}
	t.Setenv(SocketEnv, "/tmp/x.sock")
	if got := SocketPath(); got != "/tmp/x.sock" {
		t.Errorf("SocketPath() = %q", got)
	}
}
