// Package asynqsidecar runs an asynq server that reports its life to asynq-sidecar: a drop-in
// for asynq.NewServer and Server.Run.
//
//	srv := asynqsidecar.NewServer(redisOpt, asynq.Config{Concurrency: 10}) // was asynq.NewServer
//	if err := srv.Run(mux); err != nil {                                    // unchanged
//		log.Fatal(err)
//	}
//
// Run does what asynq's Run does (Start, wait for a signal, Shutdown) and reports each step over
// lifecycle protocol v1 (package lifecycle), to the socket named by ASYNQ_SIDECAR_SOCKET
// (default /run/asynq-sidecar/lifecycle.sock; see WithSocket):
//
//   - hello at once, before asynq starts (with this process's pid, host name and the server's
//     shutdown timeout). Nothing ever waits for the sidecar: events are delivered in the
//     background, buffered while no sidecar listens and replayed after a sidecar restart.
//   - ready once srv.Start returned.
//   - registered with the server's asynq id, found through asynq's public Inspector (the
//     server whose host and pid are this process's and that started after Run began), a few
//     milliseconds after Start, in the background; the sidecar then knows exactly which
//     registration asynq:servers:{host:pid:id} is this worker's.
//   - One signal loop, as asynq's Run has: SIGTSTP stops fetching new tasks (srv.Stop);
//     SIGTERM or SIGINT reports stopping (stamped on receipt) and calls srv.Shutdown exactly
//     once. A second SIGTERM or SIGINT during the drain is logged and ignored: it never starts
//     a second Shutdown, so the race of a second Shutdown returning before the first has
//     removed the registration (asynq issue #979) cannot happen.
//   - bye once Shutdown returned and Redis, read through the Inspector, no longer lists the
//     server. If it still does, or Redis cannot be read, Run logs it and closes the
//     connection without bye: the sidecar counts the exit as lost and removes the registration
//     itself once no heartbeat proves it alive.
//   - Before returning, Run spends at most 1 s delivering what is left (the whole second when
//     no sidecar listens).
//
// Inspector.Servers, which Run calls to find the server id (until found: at once, then backing
// off from 5 ms to 1 s, for at most 15 s) and once more after Shutdown, is not a pure read: like
// `asynq server ls` and asynqmon's servers page, it removes from the asynq:servers and
// asynq:workers sorted sets every member whose expiry score is a second or more in the past
// on this process's clock (ZREMRANGEBYSCORE), that is registrations of servers that died
// without deregistering. It reads every live server's info and active tasks (a GET and an
// HVALS per server), so each call costs O(servers) on Redis. On a worker whose clock runs more
// than about 5 s ahead of the others, it can remove the members of live servers, which re-add
// them at their next heartbeat (within 5 s). The check after Shutdown sees the asynq:servers
// entry only: when asynq's ClearServerState failed after its first step, a leftover
// asynq:workers member is invisible to it (it expires within 10 s and the next listing
// removes it).
package asynqsidecar

import (
	"errors"
	"fmt"
	"log"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"github.com/hibiken/asynq"

	"github.com/asynq-sidecar/asynq-sidecar/go/lifecycle"
)

// asynq's own default for Config.ShutdownTimeout.
const defaultShutdownTimeout = 8 * time.Second

// How the server id is looked up after Start: at once, then backing off, for at most lookupFor.
const (
	lookupFirst = 5 * time.Millisecond
	lookupMax   = time.Second
	lookupFor   = 15 * time.Second // three heartbeats: a first beat that failed is retried at 5 s
)

// closeTimeout bounds the delivery of the last events before Run returns.
const closeTimeout = time.Second

// Server is an asynq server that reports its life to asynq-sidecar. Build it with NewServer;
// serve with Run.
type Server struct {
	srv             *asynq.Server
	inspector       *asynq.Inspector
	shutdownTimeout time.Duration
	socket          string
	logger          asynq.Logger
	host            string

	mu       sync.Mutex
	serverID string // found after Start, "" until then
	since    time.Time
}

// Option changes a default of NewServer.
type Option func(*Server)

// WithSocket sets the sidecar's socket (default: ASYNQ_SIDECAR_SOCKET, else
// /run/asynq-sidecar/lifecycle.sock).
func WithSocket(path string) Option {
	return func(s *Server) { s.socket = path }
}

// NewServer is asynq.NewServer(r, cfg) plus an asynq.Inspector on the same Redis (for the
// server id and the check after Shutdown). It connects to nothing yet. Run's log lines go to
// cfg.Logger when it is set, otherwise to stderr.
func NewServer(r asynq.RedisConnOpt, cfg asynq.Config, opts ...Option) *Server {
	s := &Server{
		srv:             asynq.NewServer(r, cfg),
		inspector:       asynq.NewInspector(r),
		shutdownTimeout: cfg.ShutdownTimeout,
		socket:          lifecycle.SocketPath(),
		logger:          cfg.Logger,
	}
	if s.shutdownTimeout <= 0 {
		s.shutdownTimeout = defaultShutdownTimeout
	}
	if s.logger == nil {
		s.logger = stderrLogger{log.New(os.Stderr, "", log.LstdFlags|log.Lmicroseconds)}
	}
	// The host name asynq registers under (see asynq's heartbeater).
	host, err := os.Hostname()
	if err != nil {
		host = "unknown-host"
	}
	s.host = host
	for _, opt := range opts {
		opt(s)
	}
	return s
}

// Asynq is the underlying asynq server, for what Run does not cover (Ping, for example). Do not
// call its Start, Stop or Shutdown while Run runs: Run owns them.
func (s *Server) Asynq() *asynq.Server { return s.srv }

// ServerID is the asynq server id of this server once Run has found it, "" before.
func (s *Server) ServerID() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.serverID
}

// Run starts the server, reports to the sidecar, waits for SIGTERM or SIGINT (SIGTSTP stops
// fetching new tasks) and shuts the server down gracefully, as asynq's Server.Run does. It
// returns an error only when the server cannot start, as asynq's Run does.
func (s *Server) Run(handler asynq.Handler) error {
	// Before Start: a signal during the start is handled, not fatal.
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGTSTP)
	defer signal.Stop(sigs)
	defer s.inspector.Close()

	s.mu.Lock()
	s.since = time.Now()
	s.mu.Unlock()
	client := lifecycle.Start(s.socket, lifecycle.Hello{Host: s.host, ShutdownTimeout: s.shutdownTimeout},
		lifecycle.Options{Logf: s.infof})
	if err := s.srv.Start(handler); err != nil {
		client.Close(closeTimeout) // without bye: the sidecar counts the worker lost
		return err
	}
	client.Ready()

	stopLookup := make(chan struct{})
	lookupDone := make(chan struct{})
	go func() {
		defer close(lookupDone)
		s.lookup(client, stopLookup)
	}()

	for sig := range sigs {
		if sig == syscall.SIGTSTP {
			s.infof("SIGTSTP received: no new tasks are fetched; SIGTERM or SIGINT shuts down")
			s.srv.Stop()
			continue
		}
		client.Stopping(lifecycle.SignalName(sig))
		break
	}
	close(stopLookup)

	drained := make(chan struct{})
	go func() {
		defer close(drained)
		s.srv.Shutdown()
	}()
	for waiting := true; waiting; {
		select {
		case <-drained:
			waiting = false
		case sig := <-sigs:
			s.warnf("%s received again: already shutting down (at most %v)",
				lifecycle.SignalName(sig), s.shutdownTimeout)
		}
	}
	<-lookupDone // it stops between attempts

	if err := s.checkGone(); err != nil {
		s.errorf("%v; not saying bye: the sidecar removes the registration once it is proven dead", err)
	} else {
		client.Bye()
	}
	client.Close(closeTimeout)
	return nil
}

// lookup finds this server's id through the Inspector and reports it as registered.
func (s *Server) lookup(client *lifecycle.Client, stop <-chan struct{}) {
	deadline := time.Now().Add(lookupFor)
	delay := lookupFirst
	var lastErr error
	for {
		id, err := s.find()
		if err == nil {
			s.mu.Lock()
			s.serverID = id
			s.mu.Unlock()
			client.Registered(id)
			return
		}
		lastErr = err
		if time.Now().After(deadline) {
			s.warnf("server id not found after %v (%v); the sidecar finds the registration by host and pid",
				lookupFor, lastErr)
			return
		}
		select {
		case <-stop:
			return
		case <-time.After(delay):
		}
		delay = min(2*delay, lookupMax)
	}
}

var errNotListed = errors.New("not listed yet")

// find is the id of the one listed server that is this one.
func (s *Server) find() (string, error) {
	servers, err := s.inspector.Servers()
	if err != nil {
		return "", err
	}
	var ids []string
	for _, info := range servers {
		if s.mine(info) {
			ids = append(ids, info.ID)
		}
	}
	switch len(ids) {
	case 0:
		return "", errNotListed
	case 1:
		return ids[0], nil
	default:
		// Several asynq servers of this process started since Run began: which is this one
		// cannot be told apart.
		return "", fmt.Errorf("%d servers of this process (%v) started at the same time", len(ids), ids)
	}
}

// mine says whether info may be this server: this host and pid, started since Run began, and
// the id found, once it is known.
func (s *Server) mine(info *asynq.ServerInfo) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.serverID != "" {
		return info.ID == s.serverID
	}
	return info.Host == s.host && info.PID == os.Getpid() && !info.Started.Before(s.since)
}

// checkGone says, as an error, why the registration cannot be shown to be gone.
func (s *Server) checkGone() error {
	servers, err := s.inspector.Servers()
	if err != nil {
		return fmt.Errorf("cannot check that the registration is gone from Redis: %v", err)
	}
	for _, info := range servers {
		if s.mine(info) {
			return fmt.Errorf("the registration asynq:servers:{%s:%d:%s} is still in Redis after Shutdown",
				info.Host, info.PID, info.ID)
		}
	}
	return nil
}

func (s *Server) infof(format string, args ...any) {
	s.logger.Info("asynq-sidecar: " + fmt.Sprintf(format, args...))
}

func (s *Server) warnf(format string, args ...any) {
	s.logger.Warn("asynq-sidecar: " + fmt.Sprintf(format, args...))
}

func (s *Server) errorf(format string, args ...any) {
	s.logger.Error("asynq-sidecar: " + fmt.Sprintf(format, args...))
}

// stderrLogger is the asynq.Logger of Run's lines when asynq.Config has none.
type stderrLogger struct{ l *log.Logger }

func (l stderrLogger) Debug(args ...any) {}
func (l stderrLogger) Info(args ...any)  { l.l.Print(append([]any{"INFO: "}, args...)...) }
func (l stderrLogger) Warn(args ...any)  { l.l.Print(append([]any{"WARN: "}, args...)...) }
func (l stderrLogger) Error(args ...any) { l.l.Print(append([]any{"ERROR: "}, args...)...) }
func (l stderrLogger) Fatal(args ...any) { l.l.Fatal(append([]any{"FATAL: "}, args...)...) }
