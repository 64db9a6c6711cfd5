package lifecycle_test

import (
	"os"
	"os/signal"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/asynq-sidecar/asynq-sidecar/go/lifecycle"
)

// A worker that reports its own life; docs/protocol.md shows this function's body.
func Example() {
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)

	lc := lifecycle.Start(lifecycle.SocketPath(), lifecycle.Hello{ // ASYNQ_SIDECAR_SOCKET or the default
		ShutdownTimeout: 8 * time.Second, // asynq's Config.ShutdownTimeout
	}, lifecycle.Options{}) // pid and host default to os.Getpid() and os.Hostname()
	defer lc.Close(time.Second) // deliver what is buffered, for at most 1 s

	serverID := startServing() // srv.Start(mux), then the id from asynq's Inspector
	lc.Ready()
	lc.Registered(serverID)

	lc.Stopping(lifecycle.SignalName(<-sigs)) // the moment the signal arrives
	drain()                                   // srv.Shutdown(): drain, deregister
	lc.Bye()
}

func startServing() string { return "3c1d7e52-8d2a-4b8e-9a51-4f0e2f1c9d11" }

func drain() {}

// docs/protocol.md shows Example's body verbatim, so that it never shows code that does not build.
func TestProtocolDocShowsTheExample(t *testing.T) {
	doc, err := os.ReadFile("../../docs/protocol.md")
	if err != nil {
		t.Fatal(err)
	}
	src, err := os.ReadFile("example_test.go")
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, block := range strings.Split(string(doc), "```go\n")[1:] {
		code := block[:strings.Index(block, "```")]
		if strings.Contains(code, "lifecycle.Start(") {
			found = true
			if !strings.Contains(string(src), code) {
				t.Errorf("docs/protocol.md shows code that is not in lifecycle/example_test.go:\n%s", code)
			}
		}
	}
	if !found {
		t.Error("docs/protocol.md no longer shows the lifecycle example")
	}
}
