"""The worker lifecycle state machine: pure, no I/O, time passed in.

Sources (socket connections, the in-process launcher, the registration observer) turn what they
see into the events below and put them on one queue; one task calls `Tracker.apply(event, now)`
for each and hands the returned decisions to the sinks (metrics, cleanup). Nothing else writes
worker state.

    starting --ready / registered / registration seen--> running --stopping--> stopping
        \\___________________ exited / bye / connection lost ___________/--> exited (forgotten
                                                                        when the connection closes)
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class State(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    EXITED = "exited"


#: States that a live worker can be in (the `state` label of asynq_sidecar_workers).
LIVE_STATES = (State.STARTING, State.RUNNING, State.STOPPING)

#: Outcomes of an exit (the `outcome` label of asynq_sidecar_worker_exits_total).
OUTCOMES = ("graceful", "error", "killed", "lost")

ConnId = int

#: Server ids one worker may report: a process runs one asynq server, rarely a few.
MAX_SERVER_IDS = 8


# ---------------------------------------------------------------- events (inputs)


@dataclass(frozen=True, slots=True)
class Hello:
    conn: ConnId
    pid: int
    host: str
    server_id: str | None = None
    shutdown_timeout: float | None = None
    protocol: int = 1
    # When the worker process started (Unix seconds, the sender's clock). A launcher that
    # buffered while no sidecar listened delivers hello late; ownership of a registration is
    # judged against this time when it is given, else against the time hello arrived.
    started_at: float | None = None


@dataclass(frozen=True, slots=True)
class Ready:
    conn: ConnId


@dataclass(frozen=True, slots=True)
class Registered:
    """The worker names one of its asynq server ids (known only after asynq's Start)."""

    conn: ConnId
    server_id: str


@dataclass(frozen=True, slots=True)
class Stopping:
    conn: ConnId
    signal: str | None = None


@dataclass(frozen=True, slots=True)
class Exited:
    """Reported by a launcher: exactly one of `code` (exit status) or `signal` (a name)."""

    conn: ConnId
    code: int | None = None
    signal: str | None = None


@dataclass(frozen=True, slots=True)
class Bye:
    """The worker deregistered itself (its asynq Shutdown() returned) and is about to exit."""

    conn: ConnId


@dataclass(frozen=True, slots=True)
class Disconnected:
    conn: ConnId


@dataclass(frozen=True, slots=True)
class RegistrationSeen:
    """The observer saw the worker's registration (`{host:pid:*}`) live in Redis."""

    conn: ConnId
    member: str


Event = Hello | Ready | Registered | Stopping | Exited | Bye | Disconnected | RegistrationSeen


# ---------------------------------------------------------------- the worker record


@dataclass(slots=True)
class Worker:
    conn: ConnId
    host: str
    pid: int
    server_ids: set[str]  # the asynq server ids the worker reported (hello, registered)
    shutdown_timeout: float | None
    hello_at: float
    started_at: float | None = None
    state: State = State.STARTING
    running_at: float | None = None
    stopping_at: float | None = None
    stop_signal: str | None = None
    exited_at: float | None = None
    outcome: str | None = None
    members: set[str] = field(default_factory=set)  # registrations seen for this worker

    @property
    def born_at(self) -> float:
        """The earliest time the worker can have registered: its start, else its hello."""
        return self.hello_at if self.started_at is None else min(self.started_at, self.hello_at)


# ---------------------------------------------------------------- decisions (outputs)


@dataclass(frozen=True, slots=True)
class WorkerStarted:
    worker: Worker


@dataclass(frozen=True, slots=True)
class WorkerRunning:
    worker: Worker
    via: str  # "ready" or "registration"


@dataclass(frozen=True, slots=True)
class ServerIdReported:
    """The worker named one of its server ids: its registration is known exactly from now on."""

    worker: Worker
    server_id: str


@dataclass(frozen=True, slots=True)
class WorkerStopping:
    worker: Worker


@dataclass(frozen=True, slots=True)
class WorkerExited:
    """The worker is gone. `reported` is False for a lost connection (no exit report, no bye):
    the process is probably gone, but cleanup must first let a heartbeat prove it."""

    worker: Worker
    outcome: str
    reported: bool
    shutdown_duration: float | None  # from `stopping` to the exit; None without a `stopping`
    over_budget: bool
    via: str = "exited"  # what told: "exited" (a launcher, after waitpid), "bye" (the worker), "lost"


@dataclass(frozen=True, slots=True)
class WorkerForgotten:
    """The connection closed after the exit; the record is dropped."""

    worker: Worker


@dataclass(frozen=True, slots=True)
class Rejected:
    """An event that is not legal in the worker's state; counted, not trusted."""

    conn: ConnId
    event: str
    state: str  # the state it arrived in, or "unknown" (no hello on that connection)
    reason: str = "out_of_order"


Decision = WorkerStarted | WorkerRunning | ServerIdReported | WorkerStopping | WorkerExited | WorkerForgotten | Rejected


def exit_outcome(code: int | None, signal: str | None) -> str:
    if signal is not None:
        return "killed"
    return "graceful" if code == 0 else "error"


class Tracker:
    """All watched workers, keyed by connection. `apply` is the only mutator."""

    def __init__(self, shutdown_budget: float) -> None:
        self.shutdown_budget = shutdown_budget
        self.workers: dict[ConnId, Worker] = {}

    def counts(self) -> dict[str, int]:
        """Live workers per state, every state present."""
        out = {s.value: 0 for s in LIVE_STATES}
        for w in self.workers.values():
            if w.state in LIVE_STATES:
                out[w.state.value] += 1
        return out

    def apply(self, event: Event, now: float) -> list[Decision]:
        worker = self.workers.get(event.conn)
        if isinstance(event, Hello):
            if worker is not None:
                return [Rejected(event.conn, "hello", worker.state.value)]
            worker = Worker(conn=event.conn, host=event.host, pid=event.pid,
                            server_ids={event.server_id} if event.server_id else set(),
                            shutdown_timeout=event.shutdown_timeout,
                            hello_at=now, started_at=event.started_at)
            self.workers[event.conn] = worker
            return [WorkerStarted(worker)]

        name = type(event).__name__.lower()
        if worker is None:
            if isinstance(event, (Disconnected, RegistrationSeen)):
                return []  # a connection that never said hello, or an observation too late
            return [Rejected(event.conn, name, "unknown")]

        if isinstance(event, RegistrationSeen):
            worker.members.add(event.member)
            if worker.state is State.STARTING:
                return self._to_running(worker, now, "registration")
            return []
        if isinstance(event, Registered):
            if worker.state is State.EXITED or (event.server_id not in worker.server_ids
                                                and len(worker.server_ids) >= MAX_SERVER_IDS):
                return [Rejected(event.conn, name, worker.state.value)]
            worker.server_ids.add(event.server_id)
            decisions: list[Decision] = [ServerIdReported(worker, event.server_id)]
            if worker.state is State.STARTING:
                decisions += self._to_running(worker, now, "registration")
            return decisions
        if isinstance(event, Ready):
            if worker.state is State.STARTING:
                return self._to_running(worker, now, "ready")
            if worker.state is State.RUNNING and worker.running_at is not None:
                return []  # the registration got there first: ready confirms it
            return [Rejected(event.conn, name, worker.state.value)]
        if isinstance(event, Stopping):
            if worker.state in (State.STARTING, State.RUNNING):
                worker.state = State.STOPPING
                worker.stopping_at = now
                worker.stop_signal = event.signal
                return [WorkerStopping(worker)]
            if worker.state is State.STOPPING:
                return []  # a second signal while draining: asynq ignores it too
            return [Rejected(event.conn, name, worker.state.value)]
        if isinstance(event, Exited):
            if worker.state is State.EXITED:
                return [Rejected(event.conn, name, worker.state.value)]
            return [self._exit(worker, now, exit_outcome(event.code, event.signal), via="exited")]
        if isinstance(event, Bye):
            if worker.state is State.EXITED:
                return [Rejected(event.conn, name, worker.state.value)]
            return [self._exit(worker, now, "graceful", via="bye")]
        if isinstance(event, Disconnected):
            decisions = []
            if worker.state is not State.EXITED:
                decisions.append(self._exit(worker, now, "lost", via="lost"))
            del self.workers[event.conn]
            decisions.append(WorkerForgotten(worker))
            return decisions
        raise TypeError(f"not a lifecycle event: {event!r}")  # pragma: no cover

    def _to_running(self, worker: Worker, now: float, via: str) -> list[Decision]:
        worker.state = State.RUNNING
        worker.running_at = now
        return [WorkerRunning(worker, via)]

    def _exit(self, worker: Worker, now: float, outcome: str, via: str) -> WorkerExited:
        worker.state = State.EXITED
        worker.exited_at = now
        worker.outcome = outcome
        duration = None if worker.stopping_at is None else max(0.0, now - worker.stopping_at)
        over = duration is not None and duration > self.shutdown_budget
        return WorkerExited(worker, outcome, via != "lost", duration, over, via)
