// Package lifecycle speaks lifecycle protocol v1 of asynq-sidecar: a worker (or a launcher)
// reports its life (hello, ready, registered, stopping, exited, bye) over a Unix socket.
//
// The protocol is specified in docs/protocol.md: newline-delimited JSON objects, each with an
// "event" and a "time" in Unix seconds. This package uses the standard library only, so that
// the static launcher (cmd/asynq-launch) stays small.
package lifecycle

import (
	"encoding/json"
	"fmt"
	"os"
	"syscall"
	"time"
)

// Version is the protocol version sent in hello.
const Version = 1

// DefaultSocket is where the sidecar listens unless told otherwise (`serve --socket`).
const DefaultSocket = "/run/asynq-sidecar/lifecycle.sock"

// SocketEnv names the environment variable that overrides DefaultSocket.
const SocketEnv = "ASYNQ_SIDECAR_SOCKET"

// SocketPath is the socket named by ASYNQ_SIDECAR_SOCKET, or DefaultSocket when it is unset or empty.
func SocketPath() string {
	if p := os.Getenv(SocketEnv); p != "" {
		return p
	}
	return DefaultSocket
}

// Hello describes the worker process; it is the first event of every connection.
type Hello struct {
	// PID is the worker's pid as the worker sees itself (0: os.Getpid()).
	PID int
	// Host is the host name asynq registers under ("": os.Hostname()).
	Host string
	// ServerID is asynq's server id, if known when hello is sent ("": left out; see
	// Client.Registered for reporting it later).
	ServerID string
	// ShutdownTimeout is asynq's Config.ShutdownTimeout (0: left out).
	ShutdownTimeout time.Duration
	// StartedAt is when the process started (zero: left out).
	StartedAt time.Time
	// Time is when hello happened (zero: when it is recorded).
	Time time.Time
}

// wire is one protocol line; field order is the order on the wire.
type wire struct {
	Event           string   `json:"event"`
	Protocol        int      `json:"protocol,omitempty"`
	PID             int      `json:"pid,omitempty"`
	Host            string   `json:"host,omitempty"`
	ServerID        string   `json:"server_id,omitempty"`
	ShutdownTimeout *float64 `json:"shutdown_timeout,omitempty"`
	StartedAt       *float64 `json:"started_at,omitempty"`
	Signal          string   `json:"signal,omitempty"`
	Code            *int     `json:"code,omitempty"`
	Time            float64  `json:"time"`
}

// unixSeconds is t as Unix seconds with microseconds, the protocol's time format.
func unixSeconds(t time.Time) float64 {
	return float64(t.UnixMicro()) / 1e6
}

func encode(w wire) []byte {
	line, err := json.Marshal(w)
	if err != nil { // only strings and finite numbers: cannot fail
		panic(fmt.Sprintf("lifecycle: encoding %q: %v", w.Event, err))
	}
	return append(line, '\n')
}

func encodeHello(h Hello, at time.Time) []byte {
	w := wire{Event: "hello", Protocol: Version, PID: h.PID, Host: h.Host, ServerID: h.ServerID,
		Time: unixSeconds(at)}
	if h.ShutdownTimeout > 0 {
		s := h.ShutdownTimeout.Seconds()
		w.ShutdownTimeout = &s
	}
	if !h.StartedAt.IsZero() {
		s := unixSeconds(h.StartedAt)
		w.StartedAt = &s
	}
	return encode(w)
}

// signalNames are the Linux signal names, as Python's signal.Signals names them, so that the
// Go and the Python launcher report the same strings.
var signalNames = map[syscall.Signal]string{
	1: "SIGHUP", 2: "SIGINT", 3: "SIGQUIT", 4: "SIGILL", 5: "SIGTRAP", 6: "SIGABRT", 7: "SIGBUS",
	8: "SIGFPE", 9: "SIGKILL", 10: "SIGUSR1", 11: "SIGSEGV", 12: "SIGUSR2", 13: "SIGPIPE",
	14: "SIGALRM", 15: "SIGTERM", 16: "SIGSTKFLT", 17: "SIGCHLD", 18: "SIGCONT", 19: "SIGSTOP",
	20: "SIGTSTP", 21: "SIGTTIN", 22: "SIGTTOU", 23: "SIGURG", 24: "SIGXCPU", 25: "SIGXFSZ",
	26: "SIGVTALRM", 27: "SIGPROF", 28: "SIGWINCH", 29: "SIGIO", 30: "SIGPWR", 31: "SIGSYS",
	34: "SIGRTMIN", 64: "SIGRTMAX",
}

// SignalName is the protocol's name of a signal: "SIGTERM" for syscall.SIGTERM, "SIG<n>" for a
// number with no name, "" for nil or a signal that is not a syscall.Signal.
func SignalName(sig os.Signal) string {
	s, ok := sig.(syscall.Signal)
	if !ok {
		return ""
	}
	if name, ok := signalNames[s]; ok {
		return name
	}
	return fmt.Sprintf("SIG%d", int(s))
}
