// Command asynq-launch starts a worker and reports its life to asynq-sidecar: the static,
// standard-library-only twin of `asynq-sidecar run` (without --serve).
//
//	asynq-launch [--socket PATH] [--hostname NAME] [--] CMD [ARGS...]
//
// It starts CMD as its child (stdin, stdout and stderr are the launcher's) and reports, over
// the lifecycle socket: hello (the child's pid, the host name and the time it was started),
// stopping when SIGTERM or SIGINT arrives (stamped on receipt), and exited with the child's
// exit code or the name of the signal that ended it. It forwards SIGTERM, SIGINT, SIGTSTP,
// SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 to the child and exits with the child's status: its exit
// code, or 128+N when signal N ended it. A CMD that is not found exits 127, one that cannot be
// executed 126; a usage error exits 2.
//
// The child starts whether or not a sidecar listens: events are buffered and delivered in the
// background (retrying every 50 ms, backing off to 1 s), and again in full after a sidecar
// restart. After the child exits, at most 1 s is spent delivering what is left.
//
// As PID 1 of a container it also reaps every orphan re-parented to it, so that zombies do not
// accumulate; it exits when its own child exits.
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/asynq-sidecar/asynq-sidecar/go/lifecycle"
)

// forwarded are the signals passed on to the child.
var forwarded = []os.Signal{syscall.SIGTERM, syscall.SIGINT, syscall.SIGTSTP, syscall.SIGHUP,
	syscall.SIGQUIT, syscall.SIGUSR1, syscall.SIGUSR2}

// flushTimeout bounds the delivery of the last events after the child exits.
const flushTimeout = time.Second

const usageLine = "asynq-launch [--socket PATH] [--hostname NAME] [--] CMD [ARGS...]"

const help = `Start a worker (CMD ARGS...) and report its lifecycle to asynq-sidecar: hello,
stopping on SIGTERM/SIGINT, exited; forward SIGTERM, SIGINT, SIGTSTP, SIGHUP, SIGQUIT,
SIGUSR1 and SIGUSR2; exit with the child's status (128+N when signal N ended it; 127: CMD not
found, 126: CMD cannot be executed, 2: usage error). The child starts at once whether or not
a sidecar listens; events are delivered in the background. As PID 1 it also reaps orphaned
processes. CMD must be the asynq process itself (or exec it): the sidecar finds the
registration by the child's pid.

Options:
  --socket PATH     Unix socket of the sidecar [env ASYNQ_SIDECAR_SOCKET;
                    default /run/asynq-sidecar/lifecycle.sock]
  --hostname NAME   Host name that the worker registers under (os.Hostname() of the worker;
                    in Kubernetes the pod name) [env ASYNQ_SIDECAR_HOSTNAME;
                    default this host's name]
  -h, --help        Show this help.
`

func main() {
	os.Exit(run(os.Args[1:], os.Stderr))
}

// config is what the command line and the environment say.
type config struct {
	socket   string
	hostname string
	cmd      []string
}

// errHelp: --help was asked for.
var errHelp = errors.New("help")

func parseArgs(args []string, lookupEnv func(string) (string, bool)) (config, error) {
	fs := flag.NewFlagSet("asynq-launch", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	socket := fs.String("socket", "", "")
	hostname := fs.String("hostname", "", "")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return config{}, errHelp
		}
		return config{}, err
	}
	cfg := config{cmd: fs.Args()}
	var err error
	if cfg.socket, err = option(fs, "socket", *socket, "ASYNQ_SIDECAR_SOCKET", lookupEnv); err != nil {
		return cfg, err
	}
	if cfg.hostname, err = option(fs, "hostname", *hostname, "ASYNQ_SIDECAR_HOSTNAME", lookupEnv); err != nil {
		return cfg, err
	}
	if cfg.socket == "" {
		cfg.socket = lifecycle.DefaultSocket
	}
	if cfg.hostname == "" {
		if cfg.hostname, err = os.Hostname(); err != nil {
			return cfg, fmt.Errorf("cannot read this host's name (%v): pass --hostname", err)
		}
	}
	if len(cfg.cmd) == 0 {
		return cfg, errors.New("a command is required: " + usageLine)
	}
	return cfg, nil
}

// option is the flag's value if it was given, else the environment variable's if it is set
// ("" if neither); a value given but blank is an error naming where it came from.
func option(fs *flag.FlagSet, name, value, env string, lookupEnv func(string) (string, bool)) (string, error) {
	source := "--" + name
	given := false
	fs.Visit(func(f *flag.Flag) { given = given || f.Name == name })
	if !given {
		var set bool
		if value, set = lookupEnv(env); !set {
			return "", nil
		}
		source = env
	}
	if strings.TrimSpace(value) == "" {
		return "", fmt.Errorf("%s: invalid value %q: must not be empty", source, value)
	}
	return value, nil
}

func run(args []string, stderr io.Writer) int {
	cfg, err := parseArgs(args, os.LookupEnv)
	if err == errHelp {
		fmt.Fprintf(os.Stdout, "usage: %s\n\n%s", usageLine, help)
		return 0
	}
	if err != nil {
		fmt.Fprintf(stderr, "usage: %s\nasynq-launch: error: %v\n", usageLine, err)
		return 2
	}
	logf := func(format string, args ...any) {
		fmt.Fprintf(stderr, "asynq-launch: "+format+"\n", args...)
	}
	return supervise(cfg, logf)
}

// supervise starts the child, forwards signals to it, reaps it (and any orphan), and reports.
func supervise(cfg config, logf func(string, ...any)) int {
	// Before the child exists: a signal that arrives now is forwarded once it does, and no
	// SIGCHLD is missed.
	sigs := make(chan os.Signal, 64)
	signal.Notify(sigs, append([]os.Signal{syscall.SIGCHLD}, forwarded...)...)
	defer signal.Stop(sigs)

	startedAt := time.Now()
	child, err := start(cfg.cmd)
	if err != nil {
		var pe *fs.PathError
		if errors.As(err, &pe) {
			err = pe.Err // "no such file or directory", as the Python launcher says
		}
		logf("cannot start %s: %v", cfg.cmd[0], err)
		if errors.Is(err, fs.ErrNotExist) {
			return 127
		}
		return 126
	}
	pid := child.Pid
	child.Release() // the launcher reaps with wait4 itself (it may be PID 1)
	logf("started pid %d: %s", pid, strings.Join(cfg.cmd, " "))
	client := lifecycle.Start(cfg.socket, lifecycle.Hello{PID: pid, Host: cfg.hostname, StartedAt: startedAt,
		Time: startedAt}, lifecycle.Options{Logf: logf})

	stopReported := false
	for {
		sig := <-sigs
		at := time.Now()
		if sig == syscall.SIGCHLD {
			if status, ok := reap(pid); ok {
				return exited(client, pid, status, time.Now(), logf)
			}
			continue
		}
		name := lifecycle.SignalName(sig)
		logf("%s received: forwarding to pid %d", name, pid)
		if err := syscall.Kill(pid, sig.(syscall.Signal)); err != nil && err != syscall.ESRCH {
			logf("cannot forward %s to pid %d: %v", name, pid, err)
		}
		if (sig == syscall.SIGTERM || sig == syscall.SIGINT) && !stopReported {
			stopReported = true
			client.StoppingAt(name, at)
		}
	}
}

// reap collects every child that has ended (the worker, and orphans when PID 1); it returns the
// worker's status once the worker is among them.
func reap(pid int) (syscall.WaitStatus, bool) {
	var mine syscall.WaitStatus
	found := false
	for {
		var ws syscall.WaitStatus
		got, err := syscall.Wait4(-1, &ws, syscall.WNOHANG, nil)
		if err == syscall.EINTR {
			continue
		}
		if err != nil || got <= 0 {
			return mine, found
		}
		if got == pid {
			mine, found = ws, true
		}
	}
}

// exited reports the child's end and returns the launcher's exit status.
func exited(client *lifecycle.Client, pid int, ws syscall.WaitStatus, at time.Time, logf func(string, ...any)) int {
	status := ws.ExitStatus()
	if ws.Signaled() {
		name := lifecycle.SignalName(ws.Signal())
		logf("pid %d was ended by %s", pid, name)
		client.Killed(name, at)
		status = 128 + int(ws.Signal())
	} else {
		logf("pid %d exited with code %d", pid, status)
		client.Exited(status, at)
	}
	client.Close(flushTimeout)
	return status
}

// start starts cmd with the launcher's stdio and environment, finding cmd[0] on PATH as
// execvp does. An error wrapping fs.ErrNotExist means not found.
func start(cmd []string) (*os.Process, error) {
	path, err := lookPath(cmd[0])
	if err != nil {
		return nil, err
	}
	return os.StartProcess(path, cmd, &os.ProcAttr{Files: []*os.File{os.Stdin, os.Stdout, os.Stderr}})
}

// lookPath finds name as execvp does: a name with a '/' is used as it is; otherwise the first
// executable file of that name in a PATH directory. A file found but not executable is a
// permission error (126), nothing found is fs.ErrNotExist (127).
func lookPath(name string) (string, error) {
	if strings.Contains(name, "/") {
		return name, nil
	}
	denied := ""
	for _, dir := range filepath.SplitList(os.Getenv("PATH")) {
		if dir == "" {
			dir = "."
		}
		path := filepath.Join(dir, name)
		info, err := os.Stat(path)
		if err != nil {
			continue
		}
		if info.Mode().IsRegular() && info.Mode()&0o111 != 0 {
			return path, nil
		}
		if denied == "" {
			denied = path
		}
	}
	if denied != "" {
		return "", &fs.PathError{Op: "exec", Path: denied, Err: syscall.EACCES}
	}
	return "", &fs.PathError{Op: "exec", Path: name, Err: syscall.ENOENT}
}
