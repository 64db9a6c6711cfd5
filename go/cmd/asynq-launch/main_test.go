package main

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/asynq-sidecar/asynq-sidecar/go/internal/sidecartest"
	"github.com/asynq-sidecar/asynq-sidecar/go/lifecycle"
)

// The test binary doubles as the launcher's child: with LAUNCH_TEST_CHILD set it runs child().
var launcher string

func TestMain(m *testing.M) {
	if mode := os.Getenv("LAUNCH_TEST_CHILD"); mode != "" {
		os.Exit(child(mode))
	}
	dir, err := os.MkdirTemp("", "asynq-launch-test")
	if err != nil {
		panic(err)
	}
	launcher = filepath.Join(dir, "asynq-launch")
	build := exec.Command("go", "build", "-o", launcher, ".")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "building asynq-launch: %v\n%s", err, out)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// child prints "pid N", then the name of every forwarded signal it receives; it exits 3 on
// SIGTERM ("signals"), or exits with the code given after "exit:".
func child(mode string) int {
	if code, ok := strings.CutPrefix(mode, "exit:"); ok {
		n, _ := strconv.Atoi(code)
		return n
	}
	sigs := make(chan os.Signal, 16)
	signal.Notify(sigs, forwarded...)
	fmt.Printf("pid %d\n", os.Getpid())
	for sig := range sigs {
		fmt.Println(lifecycle.SignalName(sig))
		if sig == syscall.SIGTERM {
			return 3
		}
	}
	return 0
}

// launch starts the launcher with the test binary as its child in `mode`; stdout is piped.
func launch(t *testing.T, socket, mode string, extra ...string) (*exec.Cmd, *bufio.Reader) {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	args := append([]string{"--socket", socket}, extra...)
	cmd := exec.Command(launcher, append(args, "--", self)...)
	cmd.Env = append(os.Environ(), "LAUNCH_TEST_CHILD="+mode)
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	return cmd, bufio.NewReader(out)
}

func readLine(t *testing.T, r *bufio.Reader) string {
	t.Helper()
	line, err := r.ReadString('\n')
	if err != nil {
		t.Fatalf("reading the child's output: %v (got %q)", err, line)
	}
	return strings.TrimSpace(line)
}

// exitCode runs cmd (or waits for it, once started) and returns its exit status.
func exitCode(t *testing.T, cmd *exec.Cmd) int {
	t.Helper()
	var err error
	if cmd.Process == nil {
		err = cmd.Run()
	} else {
		err = cmd.Wait()
	}
	if ee, ok := err.(*exec.ExitError); ok {
		return ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return 0
}

func socketPath(t *testing.T) string { return filepath.Join(t.TempDir(), "lifecycle.sock") }

func TestReportsTheChildsLifeAndForwardsEverySignal(t *testing.T) {
	s := sidecartest.Listen(t, socketPath(t))
	before := float64(time.Now().UnixMicro()) / 1e6
	cmd, out := launch(t, s.Path, "signals", "--hostname", "pod-7")
	pid := readLine(t, out)
	conn := s.Accept()
	hello := conn.Next(t)
	if fmt.Sprintf("pid %v", hello["pid"]) != pid || hello["host"] != "pod-7" || hello["protocol"] != 1.0 {
		t.Errorf("hello = %v; want the child's %s, host pod-7, protocol 1", hello, pid)
	}
	if at, _ := hello["started_at"].(float64); at < before || at != hello["time"] {
		t.Errorf("hello = %v; want started_at = time, after %f", hello, before)
	}
	for _, sig := range []syscall.Signal{syscall.SIGUSR1, syscall.SIGUSR2, syscall.SIGHUP, syscall.SIGQUIT,
		syscall.SIGTSTP, syscall.SIGINT, syscall.SIGTERM} {
		sent := float64(time.Now().UnixMicro()) / 1e6
		cmd.Process.Signal(sig)
		if got := readLine(t, out); got != lifecycle.SignalName(sig) {
			t.Fatalf("the child got %q; want %s", got, lifecycle.SignalName(sig))
		}
		if sig == syscall.SIGINT { // the first stop signal is reported, stamped on receipt
			stopping := conn.Next(t)
			at, _ := stopping["time"].(float64)
			if stopping["event"] != "stopping" || stopping["signal"] != "SIGINT" || at < sent || at > sent+0.5 {
				t.Errorf("got %v; want stopping SIGINT at about %f", stopping, sent)
			}
		}
	}
	if exited := conn.Next(t); exited["event"] != "exited" || exited["code"] != 3.0 {
		t.Errorf("got %v; want exited with code 3 (a second stop signal is not reported)", exited)
	}
	conn.Closed(t)
	if code := exitCode(t, cmd); code != 3 {
		t.Errorf("the launcher exited %d; want the child's 3", code)
	}
}

func TestExitStatus(t *testing.T) {
	dir := t.TempDir()
	notExec := filepath.Join(dir, "script")
	os.WriteFile(notExec, []byte("#!/bin/sh\n"), 0o644)
	for _, tc := range []struct {
		name string
		args []string
		env  string
		want int
	}{
		{"child's code", []string{"--", "sh", "-c", "exit 7"}, "", 7},
		{"killed by SIGKILL", []string{"sh", "-c", "kill -KILL $$"}, "", 137},
		{"not found", []string{"--", "no-such-command-here"}, "", 127},
		{"not found by path", []string{"--", filepath.Join(dir, "missing")}, "", 127},
		{"not executable", []string{"--", notExec}, "", 126},
		{"a directory", []string{"--", dir}, "", 126},
		{"no command", []string{"--"}, "", 2},
		{"unknown flag", []string{"--sokket", "x", "--", "true"}, "", 2},
		{"blank socket", []string{"--socket", " ", "--", "true"}, "", 2},
		{"blank socket variable", []string{"--", "true"}, "ASYNQ_SIDECAR_SOCKET=", 2},
		{"blank hostname variable", []string{"--", "true"}, "ASYNQ_SIDECAR_HOSTNAME= ", 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := sidecartest.Listen(t, socketPath(t)) // a sidecar that listens: no 1 s of retries at the end
			cmd := exec.Command(launcher, tc.args...)
			cmd.Env = append(os.Environ(), "ASYNQ_SIDECAR_SOCKET="+s.Path)
			if tc.env != "" {
				cmd.Env = append(cmd.Env, tc.env)
			}
			var stderr strings.Builder
			cmd.Stderr = &stderr
			if code := exitCode(t, cmd); code != tc.want {
				t.Errorf("exit %d, want %d; stderr:\n%s", code, tc.want, stderr.String())
			}
			if tc.want == 2 && !strings.Contains(stderr.String(), "usage: asynq-launch") {
				t.Errorf("a usage error without the usage line:\n%s", stderr.String())
			}
		})
	}
}

func TestChildStartsAtOnceAndExitIsBoundedWithoutSidecar(t *testing.T) {
	start := time.Now()
	cmd, out := launch(t, socketPath(t), "signals") // nothing listens
	readLine(t, out)
	if d := time.Since(start); d > time.Second {
		t.Errorf("the child printed its pid %v after the launch", d)
	}
	cmd.Process.Signal(syscall.SIGTERM)
	readLine(t, out)
	start = time.Now()
	if code := exitCode(t, cmd); code != 3 {
		t.Errorf("exit %d, want 3", code)
	}
	if d := time.Since(start); d > 1500*time.Millisecond {
		t.Errorf("the launcher took %v after its child's exit; at most 1 s is spent delivering", d)
	}
}

func TestLateSidecarGetsEverythingWithTrueTimes(t *testing.T) {
	path := socketPath(t)
	cmd, out := launch(t, path, "signals")
	readLine(t, out)
	sent := float64(time.Now().UnixMicro()) / 1e6
	cmd.Process.Signal(syscall.SIGINT)
	readLine(t, out)
	s := sidecartest.Listen(t, path) // only now
	conn := s.Accept()
	if hello := conn.Next(t); hello["event"] != "hello" {
		t.Fatalf("first line %v", hello)
	}
	stopping := conn.Next(t)
	if at, _ := stopping["time"].(float64); stopping["event"] != "stopping" || at < sent || at > sent+0.5 {
		t.Errorf("got %v; want stopping stamped when SIGINT arrived (%f)", stopping, sent)
	}
	cmd.Process.Signal(syscall.SIGTERM)
	readLine(t, out)
	if exited := conn.Next(t); exited["event"] != "exited" || exited["code"] != 3.0 {
		t.Errorf("got %v", exited)
	}
	exitCode(t, cmd)
}

// As PID 1 of a PID namespace, the launcher reaps orphans re-parented to it.
func TestReapsOrphansAsPid1(t *testing.T) {
	unshare, err := exec.LookPath("unshare")
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("needs unshare (util-linux)")
		}
		t.Skip("needs unshare (util-linux)")
	}
	// The inner shell exits at once, its `sleep` is orphaned to PID 1; once the sleep ends it
	// must vanish from /proc (reaped), not linger as a zombie (state Z).
	script := `sh -c 'sleep 0.05 & echo $! > "$0"' "$1"
orphan=$(cat "$1")
i=0
while [ $i -lt 200 ]; do
  [ -e /proc/$orphan ] || { echo reaped; exit 0; }
  state=$(cut -d' ' -f3 /proc/$orphan/stat)
  i=$((i+1)); sleep 0.02
done
echo "pid $orphan left in state $state"; exit 1`
	s := sidecartest.Listen(t, socketPath(t))
	// -Ur: a user namespace of its own, so that no privilege is needed for the PID namespace.
	cmd := exec.Command(unshare, "-Urpf", "--mount-proc", launcher, "--socket", s.Path, "--",
		"sh", "-c", script, "sh", filepath.Join(t.TempDir(), "orphan"))
	var stderr strings.Builder
	cmd.Stderr = &stderr
	output, err := cmd.Output()
	if err != nil || strings.TrimSpace(string(output)) != "reaped" {
		t.Errorf("%v: %s\n%s", err, output, stderr.String())
	}
}

func TestHelp(t *testing.T) {
	out, err := exec.Command(launcher, "--help").Output()
	if err != nil || !strings.Contains(string(out), "reaps orphaned") {
		t.Errorf("--help: %v\n%s", err, out)
	}
}
