// Package sidecartest is a fake asynq-sidecar for tests: it listens on the lifecycle socket and
// hands over each connection's lines, decoded.
package sidecartest

import (
	"bufio"
	"encoding/json"
	"net"
	"sync"
	"testing"
	"time"
)

// Wait is how long a test waits for something that should happen at once.
const Wait = 5 * time.Second

// Sidecar listens on a Unix socket and collects the lines of each connection.
type Sidecar struct {
	Path  string
	t     testing.TB
	ln    net.Listener
	conns chan *Conn
	wg    sync.WaitGroup
	mu    sync.Mutex
	all   []net.Conn
}

// Conn is one accepted connection.
type Conn struct {
	conn  net.Conn
	lines chan map[string]any
}

// Listen starts a fake sidecar at path; it stops when the test ends (or at Close).
func Listen(t testing.TB, path string) *Sidecar {
	t.Helper()
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	s := &Sidecar{Path: path, t: t, ln: ln, conns: make(chan *Conn, 16)}
	s.wg.Add(1)
	go s.serve()
	t.Cleanup(s.Close)
	return s
}

func (s *Sidecar) serve() {
	defer s.wg.Done()
	for {
		conn, err := s.ln.Accept()
		if err != nil {
			return
		}
		c := &Conn{conn: conn, lines: make(chan map[string]any, 1024)}
		s.mu.Lock()
		s.all = append(s.all, conn)
		s.mu.Unlock()
		s.conns <- c
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			defer close(c.lines)
			sc := bufio.NewScanner(conn)
			for sc.Scan() {
				var m map[string]any
				if err := json.Unmarshal(sc.Bytes(), &m); err != nil {
					s.t.Errorf("not JSON: %q: %v", sc.Text(), err)
					return
				}
				c.lines <- m
			}
		}()
	}
}

// Close stops listening (removing the socket file) and closes every connection, as a
// sidecar that stops does.
func (s *Sidecar) Close() {
	s.ln.Close()
	s.mu.Lock()
	for _, conn := range s.all {
		conn.Close()
	}
	s.mu.Unlock()
	s.wg.Wait()
}

// Accept is the next connection; it fails the test after Wait.
func (s *Sidecar) Accept() *Conn {
	s.t.Helper()
	select {
	case c := <-s.conns:
		return c
	case <-time.After(Wait):
		s.t.Fatal("timed out waiting for a connection to the fake sidecar")
		return nil
	}
}

// Next is the connection's next line; it fails the test after Wait or when the client closed.
func (c *Conn) Next(t testing.TB) map[string]any {
	t.Helper()
	select {
	case m, ok := <-c.lines:
		if !ok {
			t.Fatal("the client closed the connection; expected another line")
		}
		return m
	case <-time.After(Wait):
		t.Fatal("timed out waiting for a line")
		return nil
	}
}

// Events are the names of the next n lines.
func (c *Conn) Events(t testing.TB, n int) []string {
	t.Helper()
	var names []string
	for range n {
		name, _ := c.Next(t)["event"].(string)
		names = append(names, name)
	}
	return names
}

// Closed waits until the client closes the connection, failing on any further line.
func (c *Conn) Closed(t testing.TB) {
	t.Helper()
	select {
	case m, ok := <-c.lines:
		if ok {
			t.Fatalf("unexpected line %v", m)
		}
	case <-time.After(Wait):
		t.Fatal("timed out waiting for the client to disconnect")
	}
}
