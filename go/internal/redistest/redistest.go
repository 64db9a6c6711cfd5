// Package redistest starts a real, private redis-server for tests.
package redistest

import (
	"bufio"
	"net"
	"os"
	"os/exec"
	"strconv"
	"testing"
	"time"
)

// Server is a redis-server child process on 127.0.0.1.
type Server struct {
	Addr   string
	cmd    *exec.Cmd
	exited chan struct{}
}

// Start runs redis-server on a free port until the test ends. Without redis-server on PATH the
// test is skipped, or fails when CI=true.
func Start(t testing.TB) *Server {
	t.Helper()
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("redis-server is not installed (CI=true: every test must run)")
		}
		t.Skip("redis-server is not installed")
	}
	for attempt := 0; ; attempt++ {
		port := freePort(t)
		s := &Server{Addr: "127.0.0.1:" + strconv.Itoa(port)}
		s.cmd = exec.Command(bin, "--port", strconv.Itoa(port), "--bind", "127.0.0.1", "--save", "",
			"--appendonly", "no", "--dir", t.TempDir())
		if err := s.cmd.Start(); err != nil {
			t.Fatal(err)
		}
		s.exited = make(chan struct{})
		go func() { s.cmd.Wait(); close(s.exited) }()
		if s.ready(5 * time.Second) {
			t.Cleanup(s.Stop)
			return s
		}
		s.Stop()
		if attempt == 2 { // the port was taken in between, three times
			t.Fatalf("redis-server did not answer on %s", s.Addr)
		}
	}
}

func freePort(t testing.TB) int {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// ready polls PING until +PONG or the timeout (or the process exited).
func (s *Server) ready(timeout time.Duration) bool {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if conn, err := net.DialTimeout("tcp", s.Addr, time.Second); err == nil {
			conn.SetDeadline(time.Now().Add(time.Second))
			conn.Write([]byte("PING\r\n"))
			line, _ := bufio.NewReader(conn).ReadString('\n')
			conn.Close()
			if line == "+PONG\r\n" {
				return true
			}
		}
		select {
		case <-s.exited:
			return false
		case <-time.After(10 * time.Millisecond):
		}
	}
	return false
}

// Stop kills the server (as a Redis outage would); safe to call twice.
func (s *Server) Stop() {
	s.cmd.Process.Kill()
	<-s.exited
}
