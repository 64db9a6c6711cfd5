package lifecycle

import (
	"log"
	"net"
	"os"
	"sync"
	"time"
)

// Delivery timing, as in the Python client.
const (
	// RetryMin is the first wait between connection attempts; it doubles up to RetryMax.
	RetryMin = 50 * time.Millisecond
	// RetryMax is the longest wait between connection attempts.
	RetryMax = time.Second
	// stableAfter: a connection that lived this long resets the backoff to RetryMin.
	stableAfter = 5 * time.Second
)

// MaxEvents is the most events a Client keeps (and replays on each new connection). A life
// needs 5 to 8 (hello, ready, a few registered, stopping, bye or exited); the sidecar closes a
// connection after 256 lines, so a replay never comes near that. Once 63 are kept, further
// events are dropped (logged once) except one final exited or bye, which always fits.
const MaxEvents = 64

// Options tune a Client; the zero value is right for workers.
type Options struct {
	// Logf writes the client's few log lines (not reachable, connected, lost, dropped).
	// nil: log.Printf with the prefix "asynq-sidecar: ".
	Logf func(format string, args ...any)
	// RetryMax caps the backoff between connection attempts (0: RetryMax).
	RetryMax time.Duration
	// Now is the clock that stamps events (nil: time.Now).
	Now func() time.Time
}

// Client is one worker's connection to the sidecar. Every event method returns at once: the
// event is recorded with its time and delivered by a background goroutine that connects,
// retries with backoff (50 ms doubling to 1 s) while no sidecar listens, and on every new
// connection sends the whole history again, so a worker that starts before its sidecar, or
// outlives a sidecar restart, is tracked with true times. A Client is safe for concurrent use.
//
// Closing without Exited or Bye tells the sidecar the worker is gone without a word (lost).
type Client struct {
	path string
	logf func(string, ...any)
	now  func() time.Time
	max  time.Duration

	mu       sync.Mutex
	lines    [][]byte
	final    bool          // an exited or bye is recorded
	dropped  int           // events not kept (MaxEvents)
	sent     int           // lines written on the current connection
	conn     net.Conn      // the current connection, nil while not connected
	closing  bool          // Close was called: finish delivering, then stop
	stopped  bool          // Close gave up: stop at once
	changed  chan struct{} // closed and replaced whenever sent, lines or conn change
	wake     chan struct{} // buffered(1): a new event or Close wants the goroutine's attention
	finished chan struct{} // closed when the goroutine has returned
}

// Start records hello and starts delivering in the background. path "" means SocketPath().
func Start(path string, hello Hello, opts Options) *Client {
	if path == "" {
		path = SocketPath()
	}
	c := &Client{path: path, logf: opts.Logf, now: opts.Now, max: opts.RetryMax,
		changed: make(chan struct{}), wake: make(chan struct{}, 1), finished: make(chan struct{})}
	if c.logf == nil {
		c.logf = func(format string, args ...any) { log.Printf("asynq-sidecar: "+format, args...) }
	}
	if c.now == nil {
		c.now = time.Now
	}
	if c.max <= 0 {
		c.max = RetryMax
	}
	if hello.PID == 0 {
		hello.PID = os.Getpid()
	}
	if hello.Host == "" {
		hello.Host, _ = os.Hostname()
	}
	at := hello.Time
	if at.IsZero() {
		at = c.now()
	}
	c.lines = append(c.lines, encodeHello(hello, at))
	go c.run()
	return c
}

// Path is the socket the client delivers to.
func (c *Client) Path() string { return c.path }

// Ready records that the worker serves (asynq's srv.Start returned).
func (c *Client) Ready() { c.record(wire{Event: "ready"}, time.Time{}) }

// Registered records the worker's asynq server id (no ':'), once it is known. A process with
// several asynq servers calls it once per server.
func (c *Client) Registered(serverID string) {
	c.record(wire{Event: "registered", ServerID: serverID}, time.Time{})
}

// Stopping records that the worker was asked to stop by signal (its name, "SIGTERM"; "" leaves
// it out) and starts draining. Call it the moment the signal arrives.
func (c *Client) Stopping(signal string) { c.StoppingAt(signal, time.Time{}) }

// StoppingAt is Stopping with the time the signal arrived (zero: now).
func (c *Client) StoppingAt(signal string, at time.Time) {
	c.record(wire{Event: "stopping", Signal: signal}, at)
}

// Exited records, for a launcher, that its child exited with code (0-255) at the given time
// (zero: now).
func (c *Client) Exited(code int, at time.Time) {
	c.record(wire{Event: "exited", Code: &code}, at)
}

// Killed records, for a launcher, that its child was ended by signal (its name, "SIGKILL").
func (c *Client) Killed(signal string, at time.Time) {
	c.record(wire{Event: "exited", Signal: signal}, at)
}

// Bye records that the worker deregistered (asynq's srv.Shutdown returned, its registration is
// gone) and is about to exit.
func (c *Client) Bye() { c.record(wire{Event: "bye"}, time.Time{}) }

func (c *Client) record(w wire, at time.Time) {
	if at.IsZero() {
		at = c.now()
	}
	w.Time = unixSeconds(at)
	line := encode(w)
	final := w.Event == "exited" || w.Event == "bye"
	c.mu.Lock()
	if c.closing {
		c.mu.Unlock()
		c.logf("%s after Close is not delivered", w.Event)
		return
	}
	keep := len(c.lines) < MaxEvents-1 || (final && !c.final && len(c.lines) < MaxEvents)
	if !keep {
		c.dropped++
		first := c.dropped == 1
		c.mu.Unlock()
		if first {
			c.logf("more than %d lifecycle events; %s and later ones are dropped", MaxEvents, w.Event)
		}
		return
	}
	c.final = c.final || final
	c.lines = append(c.lines, line)
	c.notifyLocked()
	c.mu.Unlock()
	c.poke()
}

// notifyLocked wakes every Flush waiter. Call with mu held.
func (c *Client) notifyLocked() {
	close(c.changed)
	c.changed = make(chan struct{})
}

func (c *Client) poke() {
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

// Connected says whether a connection to the sidecar is open.
func (c *Client) Connected() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.conn != nil
}

// Delivered says whether every recorded event has been written to the current connection.
func (c *Client) Delivered() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.conn != nil && c.sent == len(c.lines)
}

// Flush waits, at most timeout, until every recorded event is written to the sidecar. It says
// whether they were.
func (c *Client) Flush(timeout time.Duration) bool {
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	for {
		c.mu.Lock()
		done := c.conn != nil && c.sent == len(c.lines)
		changed := c.changed
		c.mu.Unlock()
		if done {
			return true
		}
		select {
		case <-changed:
		case <-c.finished:
			c.mu.Lock()
			defer c.mu.Unlock()
			return !c.stopped && c.sent == len(c.lines) // Close delivered everything, or not
		case <-timer.C:
			return false
		}
	}
}

// Close delivers what is buffered, waiting at most timeout (it keeps trying to connect
// meanwhile), then disconnects. It says whether everything was delivered. Events recorded
// after Close are dropped. Close may be called more than once.
func (c *Client) Close(timeout time.Duration) bool {
	c.mu.Lock()
	c.closing = true
	c.mu.Unlock()
	c.poke()
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	select {
	case <-c.finished:
	case <-timer.C:
		c.mu.Lock()
		c.stopped = true
		if c.conn != nil {
			c.conn.Close() // unblocks a write the sidecar does not read
		}
		left := len(c.lines) - c.sent
		c.mu.Unlock()
		c.poke()
		<-c.finished
		c.logf("could not deliver %d lifecycle event(s) to the sidecar at %s within %v",
			left, c.path, timeout)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return !c.stopped && c.sent == len(c.lines)
}

// run is the delivery goroutine: connect, pump, reconnect, until Close.
func (c *Client) run() {
	defer close(c.finished)
	delay := RetryMin
	waiting := false
	for {
		if c.isStopped() {
			return
		}
		conn, err := net.Dial("unix", c.path)
		if err != nil {
			if !waiting {
				c.logf("sidecar not reachable at %s (%v); buffering and retrying in the background",
					c.path, err)
				waiting = true
			}
			if !c.pause(delay) {
				return
			}
			delay = min(delay*2, c.max)
			continue
		}
		opened := time.Now()
		c.mu.Lock()
		if c.stopped {
			c.mu.Unlock()
			conn.Close()
			return
		}
		if waiting {
			c.logf("connected to the sidecar at %s; delivering %d buffered event(s)",
				c.path, len(c.lines))
			waiting = false
		}
		c.conn, c.sent = conn, 0
		c.notifyLocked()
		c.mu.Unlock()

		done := c.pump(conn)

		c.mu.Lock()
		c.conn = nil
		c.notifyLocked()
		c.mu.Unlock()
		conn.Close()
		if done {
			return
		}
		c.logf("lost the connection to the sidecar at %s; reconnecting", c.path)
		waiting = true
		if time.Since(opened) > stableAfter {
			delay = RetryMin
		}
		if !c.pause(delay) {
			return
		}
		delay = min(delay*2, c.max)
	}
}

func (c *Client) isStopped() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.stopped
}

// pause waits delay, or less when a new event or Close wants another attempt. False: stop now.
func (c *Client) pause(delay time.Duration) bool {
	timer := time.NewTimer(delay)
	defer timer.Stop()
	select {
	case <-c.wake:
	case <-timer.C:
	}
	return !c.isStopped()
}

// pump writes the history, then each new event, until Close is done with it (true) or the
// sidecar hangs up or a write fails (false).
func (c *Client) pump(conn net.Conn) bool {
	hungUp := make(chan struct{})
	go func() { // the sidecar never writes: any end of the read is a hang-up
		var b [1]byte
		conn.Read(b[:])
		close(hungUp)
	}()
	for {
		c.mu.Lock()
		if c.stopped {
			c.mu.Unlock()
			return true
		}
		pending := c.lines[c.sent:]
		closing := c.closing
		c.mu.Unlock()
		if len(pending) > 0 {
			buf := make([]byte, 0, 256*len(pending))
			for _, line := range pending {
				buf = append(buf, line...)
			}
			if _, err := conn.Write(buf); err != nil {
				return c.isStopped()
			}
			c.mu.Lock()
			c.sent += len(pending)
			c.notifyLocked()
			c.mu.Unlock()
			continue
		}
		if closing {
			return true
		}
		select {
		case <-c.wake:
		case <-hungUp:
			return false
		}
	}
}
